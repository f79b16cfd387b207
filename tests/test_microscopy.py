"""Microscopy images as they come: bit depths, float, compressed TIFFs, any channel count, intensities
normalized as the checkpoint says, and the nnU-Net and Cellpose dataset layouts."""
import json
import os

import cv2
import numpy as np
import pytest
import tifffile

from biounet.core.files import DataError
from biounet.data.datasets import detect_format, find_samples, load_dataset, read_tiff_stack
from biounet.data.fetch import synthetic_em_slice
from biounet.data.loader import intensity_levels, normalize, read_image, read_raw_image
from biounet.model.checkpoint import build_model, update_meta
from biounet.prediction.inference import predict_sample
from conftest import run_script, tiny_checkpoint, write_dataset


def twelve_bit_image(seed=0, shape=(64, 64)):
    """Values 0..4095, as a 12-bit camera writes them into a 16-bit file."""
    return np.random.default_rng(seed).integers(0, 4096, shape).astype(np.uint16)


# ---- intensities ------------------------------------------------------------------------------

def test_a_12_bit_image_in_16_bits_fills_0_to_1_with_percentiles_and_stays_dark_by_range(tmp_path):
    path = str(tmp_path / "12bit.png")
    image = twelve_bit_image()
    cv2.imwrite(path, image)
    by_range = read_image(path, "range")
    assert by_range.max() == pytest.approx(image.max() / 65535) and by_range.max() < 0.07
    by_percentile = read_image(path, "percentile")
    low, high = np.percentile(image, (1, 99.8))
    assert np.allclose(by_percentile, (image - low) / (high - low), atol=1e-6)
    assert np.percentile(by_percentile, 1) == pytest.approx(0, abs=1e-6)
    assert np.percentile(by_percentile, 99.8) == pytest.approx(1, abs=1e-6)


def test_zscore_gives_each_channel_mean_0_and_deviation_1():
    image = np.stack([twelve_bit_image(1), twelve_bit_image(2) // 16 + 100], axis=-1)
    scaled = normalize(image, "zscore")
    assert scaled.dtype == np.float32
    assert np.allclose(scaled.mean(axis=(0, 1)), 0, atol=1e-5) and np.allclose(scaled.std(axis=(0, 1)), 1, atol=1e-5)


def test_percentiles_normalize_each_channel_on_its_own_and_a_flat_channel_to_zero():
    bright, dim = twelve_bit_image(3).astype(np.float32), twelve_bit_image(4).astype(np.float32) / 100
    scaled = normalize(np.stack([bright, dim, np.full_like(dim, 7)], axis=-1), "percentile", (0, 100))
    assert np.allclose(scaled[..., 0], (bright - bright.min()) / np.ptp(bright), atol=1e-6)
    assert np.allclose(scaled[..., 1], (dim - dim.min()) / np.ptp(dim), atol=1e-6)
    assert np.array_equal(scaled[..., 2], np.zeros_like(dim))


def test_float_tiffs_are_read_as_they_are_and_by_range_only_within_0_to_1(tmp_path):
    values = np.linspace(-5, 300, 64 * 64, dtype=np.float32).reshape(64, 64)
    tifffile.imwrite(tmp_path / "float.tif", values)
    assert np.array_equal(read_raw_image(str(tmp_path / "float.tif")), values)
    low, high = np.percentile(values, (1, 99.8))
    assert read_image(str(tmp_path / "float.tif"), "percentile").max() == pytest.approx((300 - low) / (high - low))
    with pytest.raises(DataError, match=r"float\.tif: float image with values in \[-5, 300\], not \[0, 1\]"):
        read_image(str(tmp_path / "float.tif"), "range")


@pytest.mark.parametrize("compression", ["lzw", "zlib", "zstd"])
def test_compressed_tiffs_read_as_images_and_as_volumes(tmp_path, compression):
    pages = np.stack([twelve_bit_image(seed) for seed in range(3)])
    tifffile.imwrite(tmp_path / "image.tif", pages[0], compression=compression)
    tifffile.imwrite(tmp_path / "volume.tif", pages, compression=compression, photometric="minisblack")
    assert np.array_equal(read_raw_image(str(tmp_path / "image.tif")), pages[0])
    assert np.array_equal(read_tiff_stack(str(tmp_path / "volume.tif")), pages)
    samples = find_samples(str(tmp_path / "volume.tif"))
    assert np.array_equal(samples[2].read_image(), pages[2])


# ---- channels -----------------------------------------------------------------------------------

def test_multichannel_tiffs_read_channel_last_whether_written_channel_first_or_last(tmp_path):
    channels = np.stack([twelve_bit_image(seed) for seed in range(3)], axis=-1)  # 64 x 64 x 3
    tifffile.imwrite(tmp_path / "last.tif", channels)
    tifffile.imwrite(tmp_path / "first.tif", np.moveaxis(channels, -1, 0), photometric="minisblack")  # no metadata
    tifffile.imwrite(tmp_path / "imagej.tif", np.moveaxis(channels, -1, 0), imagej=True, metadata={"axes": "CYX"})
    tifffile.imwrite(tmp_path / "two.tif", channels[..., :2])
    for name in ("last", "first", "imagej"):
        assert np.array_equal(read_raw_image(str(tmp_path / f"{name}.tif")), channels), name
    assert np.array_equal(read_raw_image(str(tmp_path / "two.tif")), channels[..., :2])


def test_an_imagej_hyperstack_gives_pages_of_its_channels(tmp_path):
    hyperstack = np.stack([np.stack([twelve_bit_image(10 * z + c) for c in range(2)]) for z in range(3)])  # ZCYX
    tifffile.imwrite(tmp_path / "stack.tif", hyperstack, imagej=True, metadata={"axes": "ZCYX"})
    pages = read_tiff_stack(str(tmp_path / "stack.tif"))
    assert pages.shape == (3, 64, 64, 2) and np.array_equal(pages[1, ..., 0], hyperstack[1, 0])


def write_two_channel_dataset(folder, n=4, scale=1):
    """ISBI-like pairs whose images are 16-bit two-channel TIFFs: the slice, and its inverse."""
    data = write_dataset(os.path.join(folder, "png"), n_train=n, n_test=0)
    for i in range(n):
        grey = cv2.imread(os.path.join(data, "train_image", f"{i}.png"), 0).astype(np.uint16) * 16 * scale
        os.makedirs(os.path.join(folder, "train_image"), exist_ok=True)
        tifffile.imwrite(os.path.join(folder, "train_image", f"{i}.tif"), np.stack([grey, 4095 * scale - grey]),
                         compression="zlib")
    return os.path.join(folder, "train_image"), os.path.join(data, "train_label")


def test_a_two_channel_16_bit_network_keeps_its_input_in_the_checkpoint_and_predicts_alike_at_any_brightness(tmp_path):
    images, labels = write_two_channel_dataset(str(tmp_path / "data"))
    out = tmp_path / "run"
    os.makedirs(out)
    run_script("TrainUnetDataSet.py", "--data-path", images, "--label-path", labels, "--checkpoint-dir", "ck",
               "--log", "log.txt", "--progress", "", "--base", 4, "--crop", 32, "--epochs", 1, "--no-calibrate", cwd=out)
    meta = json.loads(str(np.load(out / "ck" / "best.npz")["__meta__"]))
    assert meta["model"]["n_channels"] == 2
    assert meta["data"]["normalize"] == "percentile" and meta["data"]["percentiles"] == [1.0, 99.8]
    brighter, _ = write_two_channel_dataset(str(tmp_path / "brighter"), scale=4)  # 4x the signal: 14-bit
    for name, folder in (("dim", images), ("bright", brighter)):
        run_script("predict_unet_test.py", "--checkpoint", "ck/best.npz", "--test-data-path", folder, "--no-tta",
                   "--save-res-path", name, "--save-prob", "--prob-path", f"{name}_prob", "--overlay-path",
                   f"{name}_overlay", cwd=out)
    dim = cv2.imread(str(out / "dim_prob" / "0.png"), cv2.IMREAD_UNCHANGED).astype(int)
    bright = cv2.imread(str(out / "bright_prob" / "0.png"), cv2.IMREAD_UNCHANGED).astype(int)
    assert np.abs(dim - bright).max() <= 1  # percentiles: the same input, whatever the brightness
    assert cv2.imread(str(out / "dim_overlay" / "0.png")).shape == (64, 64, 3)  # the first channel, tinted


def dice(a, b):
    return 2 * np.sum(a & b) / (np.sum(a) + np.sum(b))


def masks_of_one_slice_in_three_bit_depths(tmp_path, checkpoint, slice_8bit):
    """Masks predicted from one slice stored as an 8-bit PNG, as 12 bits in a 16-bit TIFF and as full-range 16 bits."""
    folder = tmp_path / "slices"
    os.makedirs(folder, exist_ok=True)
    cv2.imwrite(str(folder / "eight.png"), slice_8bit)
    tifffile.imwrite(folder / "twelve.tif", slice_8bit.astype(np.uint16) * 16)
    tifffile.imwrite(folder / "sixteen.tif", slice_8bit.astype(np.uint16) * 257)
    result = run_script("predict_unet_test.py", "--checkpoint", checkpoint, "--test-data-path", folder, "--no-tta",
                        "--save-res-path", tmp_path / "masks", cwd=tmp_path)
    masks = [cv2.imread(str(tmp_path / "masks" / f"{name}.png"), cv2.IMREAD_UNCHANGED) > 0
             for name in ("eight", "twelve", "sixteen")]
    return masks, result.stdout


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_a_network_trained_on_8_bit_images_predicts_a_slice_alike_whether_stored_in_8_12_or_16_bits(tmp_path, norm):
    rng = np.random.default_rng(0)
    slices = [synthetic_em_slice(128, rng, cell_size=16)[0] for _ in range(4)]
    trained_on = dict(normalize="range", input_types=["uint8"],
                      input_levels=intensity_levels([s / 255 for s in slices[1:]]))
    checkpoint = tiny_checkpoint(tmp_path / "net.npz", norm=norm, data=trained_on)
    model, meta = build_model(checkpoint, "cpu")
    prob = predict_sample(model, meta, slices[0] / 255, device="cpu")
    update_meta(checkpoint, output_shift=float(np.log(np.median(prob) / (1 - np.median(prob)))))  # half the slice cell
    (eight, twelve, sixteen), out = masks_of_one_slice_in_three_bit_depths(tmp_path, checkpoint, slices[0])
    assert 0.3 < eight.mean() < 0.7
    assert min(dice(eight, twelve), dice(eight, sixteen), dice(twelve, sixteen)) >= 0.95
    assert out.count("uint16 image, the network was trained on uint8: its 1-99.8 percentiles mapped onto the "
                     "training images' levels") == 2
    assert "uint8" not in next(line for line in out.splitlines() if "eight.png ->" in line)  # 8-bit: as before
    if norm == "batch":  # divided by the 16-bit range instead, the 12-bit slice reaches this network 16x too dark
        update_meta(checkpoint, data=dict(normalize="range"))
        (eight, twelve, _), _ = masks_of_one_slice_in_three_bit_depths(tmp_path, checkpoint, slices[0])
        assert dice(eight, twelve) < 0.9


def test_three_planes_tagged_rgb_predicted_by_a_grey_network_say_so_in_one_line_and_how_to_save_slices(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "grey.npz", data=dict(normalize="range", input_types=["uint8"],
                                                                  input_levels=[[0.0, 1.0]]))
    planes = np.random.default_rng(0).integers(0, 256, (3, 64, 64)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", planes, photometric="rgb", planarconfig="separate")  # tifffile's default
    tifffile.imwrite(tmp_path / "slices.tif", planes, photometric="minisblack")
    rgb = run_script("predict_unet_test.py", "--checkpoint", checkpoint, "--test-data-path", "rgb.tif", "--no-tta",
                     "--save-res-path", "rgb", cwd=tmp_path)
    assert rgb.stderr.count("warning: rgb.tif: 3 planes tagged RGB are read as one colour image and predicted as one "
                            "grey image (the network takes one channel); to predict them as 3 slices, save them "
                            "with tifffile.imwrite(path, array, photometric='minisblack')") == 1
    assert tifffile.imread(tmp_path / "rgb" / "rgb.tif").shape == (64, 64)
    slices = run_script("predict_unet_test.py", "--checkpoint", checkpoint, "--test-data-path", "slices.tif",
                        "--no-tta", "--save-res-path", "slices", cwd=tmp_path)
    assert "warning" not in slices.stderr and tifffile.imread(tmp_path / "slices" / "slices.tif").shape == (3, 64, 64)


def test_prediction_images_with_another_channel_count_stop_with_one_line(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "two.npz", n_channels=2, data=dict(normalize="percentile"))
    os.makedirs(tmp_path / "rgb")
    cv2.imwrite(str(tmp_path / "rgb" / "a.png"), np.zeros((40, 40, 3), np.uint8))
    result = run_script("predict_unet_test.py", "--checkpoint", checkpoint, "--test-data-path", tmp_path / "rgb",
                        "--save-res-path", tmp_path / "pred", cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {tmp_path}/rgb/a.png: image has 3 channels, the network takes 2"
    assert not os.path.exists(tmp_path / "pred" / "a.png")


# ---- layouts ------------------------------------------------------------------------------------

def write_nnunet(root, cases=3, size=48):
    """nnU-Net's raw layout: two channels as _0000/_0001 PNGs, labels 0/1, two test cases."""
    rng = np.random.default_rng(0)
    for part, count in (("Tr", cases), ("Ts", 2)):
        for i in range(count):
            label = np.zeros((size, size), np.uint8)
            label[8 + i:30 + i, 10:34] = 1
            nuclei = (label * 3000 + rng.integers(0, 200, label.shape)).astype(np.uint16)
            for channel, plane in enumerate((nuclei, 4000 - nuclei)):
                write_png_at(root / f"images{part}" / f"case_{i:03d}_{channel:04d}.png", plane)
            if part == "Tr":
                write_png_at(root / "labelsTr" / f"case_{i:03d}.png", label)
    (root / "dataset.json").write_text(json.dumps(dict(channel_names={"0": "DAPI", "1": "inverse"},
                                                       labels=dict(background=0, nucleus=1),
                                                       numTraining=cases, file_ending=".png")))
    return str(root)


def write_png_at(path, array):
    os.makedirs(path.parent, exist_ok=True)
    cv2.imwrite(str(path), array)


def test_nnunet_raw_datasets_stack_a_case_s_channel_files_in_order(tmp_path):
    root = write_nnunet(tmp_path / "Dataset001_Nuclei")
    assert detect_format(root) == "nnunet"
    samples = find_samples(root, split="train")
    assert [s.name for s in samples] == ["case_000", "case_001", "case_002"]
    image = samples[1].read_image()
    first = cv2.imread(f"{root}/imagesTr/case_001_0000.png", cv2.IMREAD_UNCHANGED)
    assert image.shape == (48, 48, 2) and np.array_equal(image[..., 0], first)
    assert np.array_equal(image[..., 1], 4000 - first)
    data = load_dataset(samples)
    assert data.channels == 2 and data.normalization[0] == "percentile" and data.labels[1].sum() == 22 * 24
    assert [s.name for s in find_samples(root)] == ["case_000", "case_001"]  # imagesTs, for prediction
    out = run_script("dataloader.py", root, "--split", "train", cwd=tmp_path).stdout
    assert "nnunet, 3 images (3 labelled)\nsizes: 48x48 uint16 x 2 channels (3)\n" in out
    assert "dataset.json: channels 0 DAPI, 1 inverse; labels background = 0, nucleus = 1\nlabel values: 0, 1" in out
    os.remove(f"{root}/imagesTr/case_002_0001.png")
    with pytest.raises(DataError, match="case case_002 has no channel file case_002_0001.png"):
        find_samples(root, split="train")


def test_nnunet_datasets_train_and_predict_imagests(tmp_path):
    root = write_nnunet(tmp_path / "Dataset001_Nuclei")
    run_script("TrainUnetDataSet.py", "--data-path", root, "--checkpoint-dir", "ck", "--log", "log.txt",
               "--progress", "", "--base", 4, "--crop", 32, "--epochs", 1, cwd=tmp_path)
    run_script("predict_unet_test.py", "--checkpoint", "ck/best.npz", "--test-data-path", root, "--no-tta",
               "--save-res-path", "pred", cwd=tmp_path)
    assert sorted(os.listdir(tmp_path / "pred")) == ["case_000.png", "case_001.png"]


def write_cellpose(folder, n=3):
    """Cellpose's layout: img.tif (two channels) beside img_masks.tif numbering the cells."""
    os.makedirs(folder)
    for i in range(n):
        masks = np.zeros((48, 48), np.uint16)
        masks[5:20, 5:20], masks[5:20, 20:40], masks[25:45, 10:30] = 1, 2, 3 + i
        image = np.stack([(masks > 0) * 1000 + 50, np.full(masks.shape, 10)]).astype(np.uint16)
        tifffile.imwrite(os.path.join(folder, f"img{i}.tif"), image)
        tifffile.imwrite(os.path.join(folder, f"img{i}_masks.tif"), masks)
    return str(folder)


def test_cellpose_folders_pair_images_with_their_numbered_masks(tmp_path):
    folder = write_cellpose(tmp_path / "cellpose")
    assert detect_format(folder) == "cellpose"
    samples = find_samples(folder)
    assert [s.name for s in samples] == ["img0", "img1", "img2"]
    assert samples[2].read_image().shape == (48, 48, 2)
    numbered = samples[2].read_instances()
    assert sorted(np.unique(numbered).tolist()) == [0, 1, 2, 5]
    assert np.array_equal(samples[2].read_label(), (numbered > 0).astype(np.uint8))
    data = load_dataset(samples)
    assert data.instances is not None and data.channels == 2
    binary = np.zeros((48, 48), np.uint8)
    binary[5:20, 5:20], binary[30:40, 30:40] = 255, 255  # 0/255 masks: their regions are the objects
    tifffile.imwrite(os.path.join(folder, "img0_masks.tif"), binary)
    assert sorted(np.unique(find_samples(folder)[0].read_instances()).tolist()) == [0, 1, 2]


def test_cellpose_folders_train_for_objects_scored_by_val_map(tmp_path):
    folder = write_cellpose(tmp_path / "cellpose", n=4)
    result = run_script("TrainUnetDataSet.py", "--data-path", folder, "--checkpoint-dir", "ck", "--log", "log.txt",
                        "--progress", "", "--base", 4, "--crop", 32, "--epochs", 1, cwd=tmp_path)
    assert "(cellpose, 2 channels, 1 class, normalized by percentile)" in result.stdout
    assert "trained for objects" in result.stdout and "best val_map" in result.stdout
