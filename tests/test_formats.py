"""Datasets in the layouts users bring (DSB 2018, VOC, TIFF stacks, labelme), RGB and several classes."""
import base64
import json
import os

import cv2
import numpy as np
import pytest
import roifile
import tifffile
from PIL import Image

from biounet.core.files import DataError, write_png
from biounet.core.visualize import voc_palette
from biounet.data.datasets import detect_format, find_samples, load_dataset
from biounet.data.loader import SegmentationDataset, read_label
from biounet.evaluation.metrics import confusion_matrix, confusion_scores
from biounet.evaluation.scores import score_folder
from biounet.model.checkpoint import load_checkpoint
from conftest import run_script, write_dataset

TINY = ["--base", 4, "--crop", 32, "--epochs", 1, "--progress", ""]


def blobs(shape, rng, count):
    """Numbered non-overlapping discs (0 = background)."""
    instances = np.zeros(shape, np.int32)
    for number in range(1, count + 1):
        y, x = rng.integers(8, shape[0] - 8), rng.integers(8, shape[1] - 8)
        disc = np.zeros(shape, np.uint8)
        cv2.circle(disc, (int(x), int(y)), 6, 1, -1)
        instances[(disc > 0) & (instances == 0)] = number
    return instances


def write_dsb(root, sizes=((40, 48), (64, 56), (48, 48)), masks=True, seed=0):
    """DSB 2018 layout: RGBA images (nuclei bright on a tinted background), one PNG per nucleus."""
    rng = np.random.default_rng(seed)
    for i, shape in enumerate(sizes):
        sample = os.path.join(root, f"id{i}")
        instances = blobs(shape, rng, 3)
        rgba = np.zeros(shape + (4,), np.uint8)
        rgba[..., :3] = np.where(instances[..., None] > 0, (200, 180, 255), (40, 20, 60))
        rgba[..., 3] = 255
        write_png(os.path.join(sample, "images", f"id{i}.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
        for number in range(1, instances.max() + 1) if masks else []:
            write_png(os.path.join(sample, "masks", f"m{number}.png"), np.where(instances == number, 255, 0).astype(np.uint8))
    return str(root)


def write_palette_png(path, indices):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    picture = Image.fromarray(indices.astype(np.uint8), mode="P")
    picture.putpalette(voc_palette().ravel().tolist())
    picture.save(path)


def three_class_pair(rng, size=64):
    """An RGB image whose class (0 background, 1 red squares, 2 green discs) shows in its colour;
    labels with 255 (ignore) on a one-pixel ring around every object, as VOC's."""
    label = np.zeros((size, size), np.uint8)
    for _ in range(3):
        y, x = rng.integers(4, size - 16, 2)
        label[y:y + 12, x:x + 12] = 1
        cv2.circle(label, (int(rng.integers(8, size - 8)), int(rng.integers(8, size - 8))), 6, 2, -1)
    image = np.zeros((size, size, 3), np.uint8)
    image[label == 0] = (60, 60, 60)
    image[label == 1] = (220, 40, 40)
    image[label == 2] = (40, 220, 40)
    ring = cv2.dilate((label > 0).astype(np.uint8), np.ones((3, 3), np.uint8)) - (label > 0)
    return image, np.where(ring > 0, 255, label).astype(np.uint8)


def write_voc(root, n_train=4, n_val=2, seed=0):
    rng = np.random.default_rng(seed)
    names = [f"2007_{i:06d}" for i in range(n_train + n_val)]
    for name in names:
        image, label = three_class_pair(rng)
        os.makedirs(os.path.join(root, "JPEGImages"), exist_ok=True)
        Image.fromarray(image).save(os.path.join(root, "JPEGImages", name + ".jpg"), quality=95)
        write_palette_png(os.path.join(root, "SegmentationClass", name + ".png"), label)
    split_dir = os.path.join(root, "ImageSets", "Segmentation")
    os.makedirs(split_dir, exist_ok=True)
    for split, members in (("train", names[:n_train]), ("val", names[n_train:])):
        with open(os.path.join(split_dir, split + ".txt"), "w") as f:
            f.write("".join(n + "\n" for n in members))
    return str(root)


def write_tiff(folder, n=4, size=64):
    """ISBI-style volume + labels TIFFs from the synthetic EM slices."""
    data = write_dataset(os.path.join(folder, "png"), n_train=n, n_test=0, size=size)
    read = lambda sub: np.stack([cv2.imread(os.path.join(data, sub, f"{i}.png"), 0) for i in range(n)])  # noqa: E731
    tifffile.imwrite(os.path.join(folder, "train-volume.tif"), read("train_image"), photometric="minisblack")
    tifffile.imwrite(os.path.join(folder, "train-labels.tif"), read("train_label"), photometric="minisblack")
    return os.path.join(folder, "train-volume.tif")


# ---- readers ----------------------------------------------------------------------------------

def test_the_layout_is_detected_from_the_path(tmp_path, dataset):
    assert detect_format(write_dsb(tmp_path / "dsb")) == "dsb2018"
    assert detect_format(write_voc(tmp_path / "voc")) == "voc"
    assert detect_format(write_tiff(str(tmp_path / "tif"))) == "tiff"
    assert detect_format(f"{dataset}/train_image") == "pairs"
    with pytest.raises(DataError, match="nowhere: no such file or folder"):
        detect_format(str(tmp_path / "nowhere"))


def test_dsb2018_masks_are_merged_into_one_foreground_and_numbered_as_instances(tmp_path):
    root = write_dsb(tmp_path / "dsb")
    data = load_dataset(find_samples(root))
    assert data.names == ["id0", "id1", "id2"] and data.channels == 3
    assert data.images[0].shape == (40, 48, 3)  # RGBA read as RGB, sizes kept
    for i, (label, instances) in enumerate(zip(data.labels, data.instances)):
        masks = sorted(os.listdir(f"{root}/id{i}/masks"))
        union = np.zeros_like(label)
        for number, name in enumerate(masks, start=1):
            mask = cv2.imread(f"{root}/id{i}/masks/{name}", 0) > 0
            union |= mask
            assert np.all(instances[mask] == number)
        np.testing.assert_array_equal(label, union)


def test_voc_palette_labels_are_read_as_class_indices_with_255_kept_for_ignoring(tmp_path):
    root = write_voc(tmp_path / "voc")
    path = f"{root}/SegmentationClass/2007_000000.png"
    assert Image.open(path).mode == "P"
    label = read_label(path, classes=3)
    assert set(np.unique(label)) == {0, 1, 2, 255}
    assert [s.name for s in find_samples(root, split="val")] == ["2007_000004", "2007_000005"]
    assert len(find_samples(root, split="train")) == 4


def test_tiff_volumes_give_one_sample_per_page_with_labels_found_by_name(tmp_path):
    volume = write_tiff(str(tmp_path))
    samples = find_samples(volume)
    assert [s.name for s in samples] == ["train-volume_00", "train-volume_01", "train-volume_02", "train-volume_03"]
    png = cv2.imread(str(tmp_path / "png" / "train_label" / "2.png"), 0)
    np.testing.assert_array_equal(read_label_of(samples[2]), png == 255)


def read_label_of(sample):
    return load_dataset([sample]).labels[0]


def test_images_of_one_dataset_share_channels_rgb_when_any_is_colour(tmp_path):
    write_png(str(tmp_path / "img" / "grey.png"), np.full((32, 32), 100, np.uint8))
    write_png(str(tmp_path / "img" / "colour.png"), np.full((32, 32, 3), (10, 100, 200), np.uint8))
    for name in ["grey", "colour"]:
        write_png(str(tmp_path / "lab" / f"{name}.png"), np.zeros((32, 32), np.uint8))
    data = load_dataset(find_samples(str(tmp_path / "img"), label_path=str(tmp_path / "lab")))
    assert [im.shape for im in data.images] == [(32, 32, 3), (32, 32, 3)]
    colour = data.images[data.names.index("colour")]
    np.testing.assert_allclose(colour[0, 0], np.array([200, 100, 10]) / 255, rtol=1e-6)  # RGB order, not OpenCV's BGR


# ---- label values -----------------------------------------------------------------------------

def test_label_values_that_do_not_fit_the_classes_stop_with_an_error_naming_file_and_values(tmp_path):
    path = str(tmp_path / "bad.png")
    write_palette_png(path, np.array([[0, 1, 2, 5]] * 8))
    with pytest.raises(DataError, match=r"bad\.png: label values 5 do not fit --classes 3"):
        read_label(path, classes=3)
    with pytest.raises(DataError, match=r"bad\.png: label is not binary: values 0, 1, 2, 5"):
        read_label(path)


def test_binary_masks_trained_as_several_classes_stop_instead_of_learning_nothing(tmp_path, dataset):
    samples = find_samples(f"{dataset}/train_image", label_path=f"{dataset}/train_label")
    with pytest.raises(DataError, match="binary 0/255 masks\\? train them with --classes 1"):
        load_dataset(samples, classes=2)


def test_a_colour_label_stops_with_an_error_naming_it(tmp_path):
    path = str(tmp_path / "colour.png")
    write_png(path, np.dstack([np.zeros((8, 8), np.uint8), np.full((8, 8), 128, np.uint8), np.zeros((8, 8), np.uint8)]))
    with pytest.raises(DataError, match=r"colour\.png: label is a colour image"):
        read_label(path, classes=3)


# ---- labelme ----------------------------------------------------------------------------------

def labelme_json(folder, name, shapes, size=(48, 64), embed=False):
    image = np.full(size + (3,), 90, np.uint8)
    ok, png = cv2.imencode(".png", image)
    annotation = dict(shapes=shapes, imagePath=f"{name}.png", imageHeight=size[0], imageWidth=size[1],
                      imageData=base64.b64encode(png.tobytes()).decode() if embed else None)
    if not embed:
        cv2.imwrite(os.path.join(folder, f"{name}.png"), image)
    with open(os.path.join(folder, f"{name}.json"), "w") as f:
        json.dump(annotation, f)


def test_labelme_annotations_become_a_voc_dataset_with_class_index_palette_labels(tmp_path):
    src = tmp_path / "labelme"
    src.mkdir()
    labelme_json(str(src), "a", [dict(label="cat", shape_type="polygon", points=[[5, 5], [25, 5], [25, 25], [5, 25]]),
                                 dict(label="dog", shape_type="rectangle", points=[[40, 30], [60, 44]]),
                                 dict(label="__ignore__", shape_type="point", points=[[2, 40]])])
    labelme_json(str(src), "b", [dict(label="dog", shape_type="circle", points=[[30, 24], [30, 34]])], embed=True)
    out = run_script("biounet-labelme2voc", src, tmp_path / "voc", "--val-fraction", 0.5, cwd=tmp_path).stdout
    assert "3 classes: 0 background, 1 cat, 2 dog" in out
    label = read_label(str(tmp_path / "voc" / "SegmentationClass" / "a.png"), classes=3)
    assert label[15, 15] == 1 and label[37, 50] == 2 and label[40, 2] == 255 and label[45, 30] == 0
    assert read_label(str(tmp_path / "voc" / "SegmentationClass" / "b.png"), classes=3)[24, 30] == 2
    assert detect_format(str(tmp_path / "voc")) == "voc"
    assert sorted(s.name for s in find_samples(str(tmp_path / "voc"), split="trainval")) == ["a", "b"]


def test_labelme_shapes_with_unknown_labels_stop_the_conversion(tmp_path):
    src = tmp_path / "labelme"
    src.mkdir()
    labelme_json(str(src), "a", [dict(label="cow", shape_type="polygon", points=[[5, 5], [25, 5], [25, 25]])])
    result = run_script("biounet-labelme2voc", src, tmp_path / "voc", "--labels", "background,cat", cwd=tmp_path, check=False)
    assert result.returncode != 0 and "a.json: label 'cow' is not one of the classes" in result.stderr.strip().splitlines()[-1]


# ---- several classes --------------------------------------------------------------------------

def test_mean_iou_and_accuracy_follow_the_confusion_matrix():
    truth = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 0, 2]])
    matrix = confusion_matrix(pred, truth, 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]  # the two ignored pixels left out
    scores = confusion_scores(matrix)
    assert scores["pixel_accuracy"] == pytest.approx(4 / 6)
    assert scores["iou_0"] == pytest.approx(1 / 3) and scores["iou_1"] == pytest.approx(2 / 3)
    assert scores["iou_2"] == pytest.approx(1 / 2)
    assert scores["mean_iou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert scores["mean_accuracy"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)


def test_a_class_absent_from_truth_and_prediction_has_no_iou_and_is_null_in_json(tmp_path):
    from biounet.evaluation.scores import score_multiclass, write_json
    truth = np.array([[0, 0, 1, 1]])
    scores = score_multiclass([("a.png", truth.copy(), truth)], classes=3)
    assert np.isnan(scores["mean"]["iou_2"]) and scores["mean"]["mean_iou"] == 1.0
    write_json(str(tmp_path / "s.json"), scores)
    assert json.load(open(tmp_path / "s.json"))["mean"]["iou_2"] is None


def test_auto_class_weights_are_median_frequency_over_frequency_ignoring_255():
    from biounet.training.config import data_facts, settle
    from biounet.training.flags import parse_args
    labels = [np.array([([0] * 6 + [1] * 3 + [2] * 1 + [255] * 5) * 3] * 32, np.uint8)]
    data = SegmentationDataset([np.zeros(labels[0].shape, np.float32)], labels, classes=3)
    facts = data_facts("voc", data, None)
    auto = settle(parse_args(["--classes", "3", "--class-weights", "auto"]), facts, "cpu", "oneflow")
    np.testing.assert_allclose(auto.class_weights, [0.5, 1.0, 3.0], rtol=1e-6)
    listed = settle(parse_args(["--classes", "3", "--class-weights", "1,2,3"]), facts, "cpu", "oneflow")
    assert listed.class_weights == (1.0, 2.0, 3.0)


def test_cross_entropy_leaves_ignored_pixels_out():
    from biounet.model.backend import to_tensor
    from biounet.model.losses import multiclass_loss
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1, 3, 4, 4)).astype(np.float32)
    target = rng.integers(0, 3, (1, 4, 4))
    target[0, 0] = 255
    changed = logits.copy()
    changed[0, :, 0] += 5.0  # only the ignored row differs
    for dice_weight in (0.0, 1.0):
        losses = [float(multiclass_loss(to_tensor(x), to_tensor(target, dtype=np.int64), dice_weight).item())
                  for x in (logits, changed)]
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)


# ---- train and predict, one run per layout ----------------------------------------------------

def test_dsb2018_trains_on_rgb_and_predicts_one_mask_per_id_at_each_images_size(tmp_path):
    root = write_dsb(tmp_path / "dsb")
    out = run_script("TrainUnetDataSet.py", "--data-path", root, "--checkpoint-dir", "ck", "--log", "log.txt", "--progress", "",
                     "--base", 4, "--epochs", 1, "--crop", 0, "--batch-size", 2, "--val-fraction", 0, "--no-object-size",
                     cwd=tmp_path).stdout
    assert "images of 3 sizes: batches of random 32x32 crops" in out
    assert load_checkpoint(str(tmp_path / "ck" / "last.npz"))[0]["config"]["weight_map"] is False  # nuclei: off
    test = write_dsb(tmp_path / "test", sizes=((36, 52), (60, 44)), masks=False, seed=1)
    run_script("predict_unet_test.py", "--checkpoint", "ck/best.npz", "--test-data-path", test, "--no-tta",
               "--save-res-path", "pred", "--overlay-path", "overlay", cwd=tmp_path)
    assert sorted(os.listdir(tmp_path / "pred")) == ["id0.png", "id1.png"]
    assert cv2.imread(str(tmp_path / "pred" / "id0.png"), 0).shape == (36, 52)
    assert cv2.imread(str(tmp_path / "overlay" / "id1.png")).shape == (60, 44, 3)


def test_a_dsb2018_folder_with_masks_is_scored_when_predicted(tmp_path):
    root = write_dsb(tmp_path / "dsb")
    run_script("TrainUnetDataSet.py", "--data-path", root, "--checkpoint-dir", "ck", "--log", "log.txt", "--progress", "", *TINY,
               "--img-size", 32, cwd=tmp_path)
    out = run_script("predict_unet_test.py", "--checkpoint", "ck/best.npz", "--test-data-path", root, "--no-tta",
                     "--save-res-path", "pred", "--scores-json", "scores.json", cwd=tmp_path).stdout
    assert out.strip().splitlines()[-1].startswith("mean")
    assert cv2.imread(str(tmp_path / "pred" / "id1.png"), 0).shape == (64, 56)  # resized back from 32x32
    scores = json.load(open(tmp_path / "scores.json"))
    assert set(scores["images"]) == {"id0.png", "id1.png", "id2.png"}
    assert scores["mean"]["dice"] == pytest.approx(np.mean([row["dice"] for row in scores["images"].values()]))
    # the masks written score as the probabilities did
    assert score_folder(str(tmp_path / "pred"), root)["mean"]["iou"] == pytest.approx(scores["mean"]["iou"])


def test_voc_trains_several_classes_and_predicts_class_indices_and_colours(tmp_path):
    root = write_voc(tmp_path / "voc")
    out = run_script("TrainUnetDataSet.py", "--data-path", root, "--classes", 3, "--checkpoint-dir", "ck", "--progress", "",
                     "--log", "log.txt", "--base", 4, "--crop", 32, "--epochs", 2, cwd=tmp_path).stdout
    assert "(voc, 3 channels, 3 classes, normalized by range), 2 for validation" in out and "val_miou" in out
    out = run_script("predict_unet_test.py", "--checkpoint", "ck/best.npz", "--test-data-path", root, "--no-tta",
                     "--save-res-path", "pred", "--color-path", "color", cwd=tmp_path).stdout
    assert "class   2: IoU" in out
    assert sorted(os.listdir(tmp_path / "pred")) == ["2007_000004.png", "2007_000005.png"]
    pred = cv2.imread(str(tmp_path / "pred" / "2007_000004.png"), cv2.IMREAD_UNCHANGED)
    assert pred.shape == (64, 64) and set(np.unique(pred)) <= {0, 1, 2}
    colour = cv2.imread(str(tmp_path / "color" / "2007_000004.png"))
    np.testing.assert_array_equal(colour[pred == 1][:1], voc_palette()[[1]][:, ::-1])
    scores = run_script("biounet-evaluate", "pred", root, "--classes", 3, cwd=tmp_path).stdout
    assert "mean_iou" in scores


@pytest.mark.learning
def test_several_classes_are_learned_from_rgb(tmp_path):
    """Colour tells the three classes apart, so a tiny net must get them nearly all right."""
    root = write_voc(tmp_path / "voc", n_train=6, n_val=2)
    run_script("TrainUnetDataSet.py", "--data-path", root, "--classes", 3, "--checkpoint-dir", "ck", "--progress", "",
               "--log", "log.txt", "--base", 8, "--crop", 0, "--epochs", 6, "--lr", 2e-2, cwd=tmp_path)
    run_script("predict_unet_test.py", "--checkpoint", "ck/best.npz", "--test-data-path", root, "--no-tta",
               "--save-res-path", "pred", cwd=tmp_path)
    assert score_folder(str(tmp_path / "pred"), root, classes=3)["mean"]["mean_iou"] > 0.8


def test_tiff_volumes_train_and_predict_a_stack_or_on_request_one_png_per_page(tmp_path):
    volume = write_tiff(str(tmp_path))
    run_script("TrainUnetDataSet.py", "--data-path", volume, "--checkpoint-dir", "ck", "--log", "log.txt", "--progress", "", *TINY,
               cwd=tmp_path)
    predict = ("predict_unet_test.py", "--checkpoint", "ck/best.npz", "--test-data-path", volume, "--no-tta")
    run_script(*predict, "--save-res-path", "pred", "--save-prob", "--prob-path", "prob", "--prob-bits", 32,
               "--instance-path", "objects", cwd=tmp_path)
    run_script(*predict, "--save-res-path", "slices", "--slices", "--save-prob", "--prob-path", "prob_slices",
               "--instance-path", "objects_slices", cwd=tmp_path)
    assert os.listdir(tmp_path / "pred") == ["train-volume.tif"]
    assert sorted(os.listdir(tmp_path / "slices")) == [f"train-volume_0{i}.png" for i in range(4)]
    with tifffile.TiffFile(tmp_path / "pred" / "train-volume.tif") as tif:
        assert tif.is_imagej and tif.imagej_metadata["images"] == 4
        masks = tif.asarray()
    assert masks.dtype == np.uint8 and masks.shape == (4, 64, 64)
    for i in range(4):
        assert np.array_equal(masks[i], cv2.imread(str(tmp_path / "slices" / f"train-volume_0{i}.png"), 0))
    prob = tifffile.imread(tmp_path / "prob" / "train-volume.tif")
    assert prob.dtype == np.float32 and prob.shape == (4, 64, 64)
    prob_16bit = cv2.imread(str(tmp_path / "prob_slices" / "train-volume_02.png"), cv2.IMREAD_UNCHANGED)
    assert np.abs(prob[2] - prob_16bit / 65535).max() <= 0.5 / 65535 + 1e-6
    objects = tifffile.imread(tmp_path / "objects" / "train-volume.tif")
    assert objects.dtype == np.uint16 and np.array_equal(
        objects[3], cv2.imread(str(tmp_path / "objects_slices" / "train-volume_03.png"), cv2.IMREAD_UNCHANGED))
    stack_scores = run_script("biounet-evaluate", "pred", volume, cwd=tmp_path).stdout
    assert "train-volume_03.png" in stack_scores
    assert stack_scores == run_script("biounet-evaluate", "slices", volume, cwd=tmp_path).stdout
    rois = roifile.roiread(tmp_path / "objects" / "train-volume_RoiSet.zip")
    assert len(rois) == sum(int(page.max()) for page in objects)
    assert sorted({roi.position for roi in rois}) == [i + 1 for i in range(4) if objects[i].max()]


def write_glas(folder, n=3, seed=0):
    """GlaS layout: RGB train_<i>.bmp with train_<i>_anno.bmp beside it, numbering the glands."""
    rng = np.random.default_rng(seed)
    for i in range(1, n + 1):
        shape = (48 + 8 * i, 64)
        instances = blobs(shape, rng, 3)
        image = np.where(instances[..., None] > 0, (150, 60, 160), (230, 200, 230)).astype(np.uint8)
        os.makedirs(folder, exist_ok=True)
        cv2.imwrite(os.path.join(folder, f"train_{i}.bmp"), image)
        cv2.imwrite(os.path.join(folder, f"train_{i}_anno.bmp"), instances.astype(np.uint8))
    return str(folder)


def test_glas_labels_beside_their_images_numbering_objects_train_and_predict(tmp_path):
    root = write_glas(tmp_path / "glas")
    assert [s.name for s in find_samples(root)] == ["train_1", "train_2", "train_3"]
    with pytest.raises(DataError, match=r"train_1_anno\.bmp: label is not binary: values 0, 1, 2, 3 .*--instance-labels"):
        load_dataset(find_samples(root))
    data = load_dataset(find_samples(root), instance_labels=True)
    assert set(np.unique(data.labels[0])) == {0, 1} and data.instances[0].max() == 3
    run_script("TrainUnetDataSet.py", "--data-path", root, "--instance-labels", "--img-size", 32,
               "--checkpoint-dir", "ck", "--log", "log.txt", "--progress", "", "--base", 4, "--epochs", 1, cwd=tmp_path)
    out = run_script("predict_unet_test.py", "--checkpoint", "ck/best.npz", "--test-data-path", root, "--no-tta",
                     "--save-res-path", "pred", cwd=tmp_path).stdout
    assert sorted(os.listdir(tmp_path / "pred")) == ["train_1.png", "train_2.png", "train_3.png"]
    assert cv2.imread(str(tmp_path / "pred" / "train_3.png"), 0).shape == (72, 64)
    assert out.strip().splitlines()[-1].startswith("mean")  # the labels beside the images are scored
