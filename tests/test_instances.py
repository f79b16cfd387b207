"""Objects from probabilities, their measurements and the DSB 2018 object scores, on label images
whose answers are worked out by hand."""
import csv
import json
import os
import re

import cv2
import numpy as np
import pytest
import roifile
from skimage.draw import polygon2mask
from skimage.morphology import disk

import biounet
from biounet.core.visualize import outline_objects
from biounet.data.labels import connected_objects
from biounet.evaluation.instances import (DISTANCE_LEVELS, cells_of, mask_of, measure, object_class_names,
                                          object_classes, object_method, object_scores, objects_of, roi_set,
                                          split_by_interior, split_objects)
from biounet.model import backend
from biounet.model.checkpoint import load_checkpoint, update_meta
from conftest import run_script, tiny_checkpoint, train_small


def two_touching_disks():
    yy, xx = np.mgrid[:40, :60]
    return ((yy - 20) ** 2 + (xx - 18) ** 2 <= 100) | ((yy - 20) ** 2 + (xx - 36) ** 2 <= 100)


def test_touching_nuclei_are_one_connected_blob_and_two_objects_after_the_watershed():
    mask = two_touching_disks()
    assert connected_objects(mask).max() == 1
    objects = split_objects(mask.astype(np.float32))
    assert objects.dtype == np.uint16 and objects.max() == 2
    assert np.array_equal(objects > 0, mask)
    assert len(np.unique(objects[20, 10:16])) == 1 and objects[20, 12] != objects[20, 42]


def test_holes_are_filled_and_specks_below_min_size_removed():
    prob = np.zeros((30, 30), np.float32)
    prob[5:15, 5:15] = 0.9
    prob[9, 9] = 0.1          # a hole
    prob[25:27, 25:27] = 0.9  # a speck of 4 pixels
    objects = split_objects(prob, min_size=5)
    assert objects.max() == 1 and objects[9, 9] == 1 and objects[25, 25] == 0


def hand_worked_pair():
    truth, pred = np.zeros((40, 40), np.uint16), np.zeros((40, 40), np.uint16)
    truth[0:10, 0:10], truth[20:30, 0:10] = 1, 2
    pred[0:10, 0:10] = 7          # IoU 1
    pred[20:30, 0:7] = 3          # IoU 70/100 = 0.7
    pred[30:35, 30:35] = 9        # a false object of 25 pixels
    return pred, truth


def test_object_scores_of_a_hand_worked_case():
    scores = object_scores(*hand_worked_pair())
    # IoU thresholds 0.50-0.65: TP 2, FP 1, FN 0 -> 2/3; 0.70-0.95 (IoU 0.7 is not > 0.7): TP 1, FP 2, FN 1 -> 1/4
    assert scores["map_05_095"] == pytest.approx((4 * 2 / 3 + 6 * 1 / 4) / 10)
    assert scores["ap50"] == pytest.approx(2 / 3)
    assert scores["f1_50"] == pytest.approx(4 / 5)
    assert scores["aji"] == pytest.approx((100 + 70) / (100 + 100 + 25))
    assert (scores["objects_predicted"], scores["objects_true"]) == (3, 2)


def test_a_perfect_prediction_scores_one_and_merged_objects_lose_both():
    truth = np.zeros((8, 8), np.uint16)
    truth[0:4, 0:4], truth[0:4, 4:8] = 1, 2
    assert object_scores(truth, truth)["map_05_095"] == 1.0
    merged = (truth > 0).astype(np.uint16)  # IoU 0.5 with each: not above 0.5
    assert object_scores(merged, truth)["ap50"] == 0.0
    assert object_scores(np.zeros_like(truth), np.zeros_like(truth))["map_05_095"] == 1.0


def test_measurements_have_one_row_per_object():
    objects = np.zeros((20, 20), np.uint16)
    objects[2:6, 2:12], objects[10:14, 10:14] = 1, 2
    image = np.full((20, 20), 0.5, np.float32)
    table = measure(objects, image)
    assert table["label"] == [1, 2] and table["area"] == [40.0, 16.0]
    assert table["centroid-0"] == [3.5, 11.5] and table["intensity_mean"] == [0.5, 0.5]
    assert table["eccentricity"][1] == pytest.approx(0.0)


def test_evaluate_scores_label_images_against_dsb_masks_per_object(tmp_path):
    pred, truth = hand_worked_pair()
    (tmp_path / "pred").mkdir()
    cv2.imwrite(str(tmp_path / "pred" / "a.png"), pred * 300)  # 16-bit: numbers above 255 survive
    os.makedirs(tmp_path / "dsb" / "a" / "images")
    os.makedirs(tmp_path / "dsb" / "a" / "masks")
    cv2.imwrite(str(tmp_path / "dsb" / "a" / "images" / "a.png"), np.zeros((40, 40), np.uint8))
    for number in (1, 2):
        cv2.imwrite(str(tmp_path / "dsb" / "a" / "masks" / f"m{number}.png"), np.where(truth == number, 255, 0).astype(np.uint8))
    result = run_script("biounet-evaluate", "--instances", tmp_path / "pred", tmp_path / "dsb", "--json",
                        tmp_path / "scores.json", cwd=tmp_path)
    assert "map_05_095" in result.stdout.splitlines()[0]
    mean = json.load(open(tmp_path / "scores.json"))["mean"]
    assert mean["map_05_095"] == pytest.approx(0.416667, abs=1e-6) and mean["aji"] == pytest.approx(170 / 225)
    assert mean["objects_predicted"] == 3 and mean["objects_true"] == 2


def test_prediction_writes_a_16_bit_label_image_per_input_and_a_row_per_object(dataset, tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "tiny.npz")
    out = run_script("predict_unet_test.py", "--checkpoint", checkpoint, "--test-data-path", f"{dataset}/test_image",
                     "--save-res-path", tmp_path / "masks", "--instance-path", tmp_path / "objects", "--no-tta",
                     "--min-size", 1, cwd=tmp_path).stdout
    names = sorted(n for n in os.listdir(tmp_path / "objects") if n.endswith(".png"))
    assert names == sorted(os.listdir(tmp_path / "masks"))
    rows = list(csv.DictReader(open(tmp_path / "objects" / "objects.csv")))
    for name in names:
        objects = cv2.imread(str(tmp_path / "objects" / name), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(tmp_path / "masks" / name), cv2.IMREAD_UNCHANGED)
        assert objects.dtype == np.uint16 and objects.shape == mask.shape
        assert np.all(objects[mask > 0] > 0)  # every mask pixel is in an object (none below --min-size 1; holes filled)
        mine = [row for row in rows if row["image"] == name]
        assert [int(row["label"]) for row in mine] == list(range(1, objects.max() + 1))
        assert [float(row["area"]) for row in mine] == [float(np.sum(objects == k)) for k in range(1, objects.max() + 1)]
        rois = roifile.roiread(str(tmp_path / "objects" / name.replace(".png", "_RoiSet.zip")))
        assert len(rois) == objects.max()
    assert f"{len(rows)} objects: label images and objects.csv in" in out


def test_every_foreground_pixel_of_a_noisy_map_ends_in_an_object_when_nothing_is_too_small():
    rng = np.random.default_rng(0)
    for _ in range(10):  # thin and diagonal-only pieces included: each still gets a seed and is flooded
        prob = rng.random((48, 48)).astype(np.float32)
        objects = split_objects(prob, min_size=1)
        assert np.all(objects[prob > 0.5] > 0)


def test_overlays_outline_each_object_in_its_own_colour():
    objects = np.zeros((20, 30), np.uint16)
    objects[2:10, 2:10], objects[2:10, 12:20] = 1, 2
    picture = np.zeros((20, 30, 3), np.uint8)
    drawn = outline_objects(picture, objects)
    first, second = drawn[2, 5], drawn[2, 15]  # on the top edges
    assert first.any() and second.any() and not np.array_equal(first, second)
    assert not drawn[5, 5].any() and not drawn[15, 25].any()  # insides and background untouched
    assert np.array_equal(drawn[9, 2], first) and np.array_equal(drawn[9, 19], second)


@pytest.mark.skipif(backend.NAME != "torch", reason="validation's scoring, not the framework: checked in the suite's "
                                                 "PyTorch run, which trains the network 5x faster (keeps the suite within "
                                                 "its time)")
def test_validation_scores_objects_where_labels_number_them_and_can_pick_best_by_it(tmp_path, dataset):
    from test_formats import write_dsb
    root = write_dsb(tmp_path / "dsb", sizes=((48, 48),) * 4)
    val = write_dsb(tmp_path / "val", sizes=((48, 48),) * 2, seed=3)
    run_script("TrainUnetDataSet.py", "--data-path", root, "--val-image-path", val, "--checkpoint-dir", "ck", "--log",
               "log.txt", "--progress", "", "--base", 8, "--epochs", 9, "--schedule", "constant", "--crop", 0, "--lr", 0.01,
               "--best-metric", "val_map", cwd=tmp_path)
    scores = [json.loads(line)["val_map"] for line in open(tmp_path / "log.jsonl") if '"epoch"' in line]
    assert scores[0] < 0.5 < 0.9 <= max(scores)  # an untrained network finds few of the nuclei, a trained one all
    best = load_checkpoint(str(tmp_path / "ck" / "best.npz"))[0]
    assert best["epoch"] == 1 + scores.index(max(scores)) and best["scores"]["val_map"] == pytest.approx(max(scores))
    refused = train_small(dataset, tmp_path / "isbi", "--best-metric", "val_map", check=False)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines()[-1].startswith(
        "error: --best-metric val_map scores numbered objects: the labels number none")


def test_a_network_for_objects_learns_each_objects_interior_ringed_by_its_boundary():
    objects = np.zeros((8, 12), np.uint16)
    objects[1:7, 1:6], objects[1:7, 6:11] = 1, 2  # two touching 6 x 5 rectangles
    ring = np.array([[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                     [0, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 0],
                     [0, 2, 1, 1, 1, 2, 2, 1, 1, 1, 2, 0],
                     [0, 2, 1, 1, 1, 2, 2, 1, 1, 1, 2, 0],
                     [0, 2, 1, 1, 1, 2, 2, 1, 1, 1, 2, 0],
                     [0, 2, 1, 1, 1, 2, 2, 1, 1, 1, 2, 0],
                     [0, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 0],
                     [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    assert np.array_equal(object_classes(objects, width=1), ring)
    wide = object_classes(objects, width=2)  # two pixels: each rectangle keeps a 2 x 1 interior
    assert np.array_equal(np.argwhere(wide == 1), [[3, 3], [3, 8], [4, 3], [4, 8]])
    assert np.array_equal(wide == 0, objects == 0)


def test_the_touching_target_marks_only_where_objects_meet_so_a_lone_object_is_all_interior():
    objects = np.zeros((10, 20), np.uint16)
    objects[1:7, 1:6], objects[1:7, 6:11] = 1, 2  # two touching rectangles
    objects[2:8, 14:19] = 3  # a lone one, 3 pixels of background from the second
    touching = object_classes(objects, target="touching", width=1)
    assert np.array_equal(np.argwhere(touching == 2)[:, 1], [5, 6] * 6)  # the two columns where 1 meets 2
    assert np.all(touching[objects == 3] == 1)
    assert np.array_equal(touching == 0, objects == 0)
    near = object_classes(objects, target="touching", width=2)  # a gap of 3 pixels is still apart
    assert np.all(near[objects == 3] == 1) and np.all(near[1:7, 4:8] == 2)
    assert object_method("dsb2018", instances=True, target="touching") == "interior"
    assert object_method("dsb2018", instances=True, target="boundary") == "watershed"


def three_class_map(interiors, mask):
    """H x W x 3 probabilities (background, interior, boundary) sure of each pixel's class."""
    classes = np.where(mask, np.where(interiors, 1, 2), 0)
    return np.eye(3, dtype=np.float32)[classes]


def test_objects_grow_from_the_interiors_the_network_predicts():
    mask = two_touching_disks()
    yy, xx = np.mgrid[:40, :60]
    apart = ((yy - 20) ** 2 + (xx - 18) ** 2 <= 36) | ((yy - 20) ** 2 + (xx - 36) ** 2 <= 36)
    objects = split_by_interior(three_class_map(apart, mask))
    assert objects.max() == 2 and np.array_equal(objects > 0, mask)
    assert objects[20, 12] != objects[20, 42]
    joined = apart | ((abs(yy - 20) <= 1) & (xx > 18) & (xx < 36))  # interiors the network did not part
    assert split_by_interior(three_class_map(joined, mask)).max() == 1
    mask[5:7, 45:59] = True  # a thin piece, all boundary, no interior: one object of its own
    assert split_by_interior(three_class_map(apart, mask)).max() == 3


def test_the_distance_target_counts_up_from_each_objects_edge_and_its_upper_half_seeds_the_objects():
    mask = two_touching_disks()
    objects = connected_objects(mask)  # one object: the target is learnt per numbered object
    yy, xx = np.mgrid[:40, :60]
    two = np.where(mask, np.where(xx < 27, 1, 2), 0)  # the touching disks, numbered apart at their waist
    levels = object_classes(two, target="distance")
    assert set(np.unique(levels)) == {0, 1, 2, 3, 4} and np.array_equal(levels > 0, mask)
    assert levels[20, 18] == 4 and levels[20, 36] == 4 and levels[20, 27] == 1  # centres on top, the waist an edge
    assert object_classes(objects, target="distance")[20, 27] > 1  # one object: its waist is inside
    sure = np.eye(DISTANCE_LEVELS + 1, dtype=np.float32)[levels]  # a network sure of each pixel's level
    split = split_by_interior(sure)
    assert split.max() == 2 and np.array_equal(split > 0, mask) and split[20, 12] != split[20, 42]
    assert object_class_names("distance")[-1] == f"distance {DISTANCE_LEVELS}/{DISTANCE_LEVELS}"


def test_dsb_data_trains_a_network_for_objects_by_default_and_prediction_counts_its_objects(tmp_path):
    from test_formats import write_dsb
    root = write_dsb(tmp_path / "dsb", sizes=((48, 48),) * 4)
    trained = run_script("TrainUnetDataSet.py", "--data-path", root, "--checkpoint-dir", "ck", "--log", "log.txt",
                         "--progress", "", "--base", 4, "--epochs", 2, "--crop", 0, "--val-fraction", 0.5, cwd=tmp_path)
    assert "trained for objects: classes background, interior, boundary" in trained.stdout
    meta = load_checkpoint(str(tmp_path / "ck" / "best.npz"))[0]
    assert meta["model"]["n_classes"] == 3 and meta["data"]["instances"] is True
    assert meta["best_metric"] == "val_map" and 0 <= meta["scores"]["val_map"] <= 1
    assert "val_v_rand" not in meta["scores"]  # membranes' score, ten watersheds an image: not for nuclei
    out = run_script("predict_unet_test.py", "--checkpoint", tmp_path / "ck" / "best.npz", "--test-data-path", root,
                     "--save-res-path", tmp_path / "masks", "--instance-path", tmp_path / "objects", "--no-tta",
                     "--min-size", 1, cwd=tmp_path).stdout
    assert re.search(r", \d+ objects, objects \d+ pixels wide\)", out)  # counted, and their size estimated
    for name in os.listdir(tmp_path / "masks"):
        mask = cv2.imread(str(tmp_path / "masks" / name), cv2.IMREAD_UNCHANGED)
        objects = cv2.imread(str(tmp_path / "objects" / name), cv2.IMREAD_UNCHANGED)
        assert set(np.unique(mask)) <= {0, 255} and objects.dtype == np.uint16
        assert np.all(objects[mask > 0] > 0)  # every pixel of the mask in an object (and holes filled)
    one_class = run_script("TrainUnetDataSet.py", "--data-path", root, "--checkpoint-dir", "ck1", "--log", "log1.txt",
                           "--progress", "", "--base", 4, "--epochs", 1, "--crop", 0, "--no-instances", cwd=tmp_path)
    assert "trained for objects" not in one_class.stdout
    assert load_checkpoint(str(tmp_path / "ck1" / "last.npz"))[0]["model"]["n_classes"] == 1


def test_a_network_for_distance_levels_rescaled_for_its_object_size_gives_objects(tmp_path):
    from test_formats import write_dsb
    root = write_dsb(tmp_path / "dsb", sizes=((48, 48),) * 2)
    data = dict(format="dsb2018", instances=True, object_target="distance", object_size=12)  # images shrink by 2
    checkpoint = tiny_checkpoint(tmp_path / "distance.npz", data=data, n_channels=3, n_classes=5)
    run_script("predict_unet_test.py", "--checkpoint", checkpoint, "--test-data-path", root, "--object-size", 24,
               "--save-res-path", tmp_path / "masks", "--instance-path", tmp_path / "objects", "--no-tta", cwd=tmp_path)
    assert sorted(os.listdir(tmp_path / "objects")) == ["id0.png", "id0_RoiSet.zip", "id1.png", "id1_RoiSet.zip",
                                                        "objects.csv"]


def test_a_run_for_objects_resumes_only_for_the_target_it_was_trained_for(tmp_path):
    from test_formats import write_dsb
    root = write_dsb(tmp_path / "dsb", sizes=((48, 48),) * 2)
    flags = ["--data-path", root, "--progress", "", "--base", 4, "--crop", 0, "--val-fraction", 0.5]
    run_script("TrainUnetDataSet.py", *flags, "--epochs", 1, "--object-target", "boundary", cwd=tmp_path)
    refused = run_script("TrainUnetDataSet.py", *flags, "--epochs", 2, "--resume", cwd=tmp_path, check=False)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines()[-1].endswith(
        "last.npz: trained for --object-target boundary; resume with the same")


def test_training_for_objects_refuses_the_weight_map_in_one_line_and_writes_nothing(dataset, tmp_path):
    refused = train_small(dataset, tmp_path / "run", "--instances", "--weight-map", check=False)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines()[-1].startswith(
        "error: --weight-map weighs the one-class loss; --instances trains three classes")
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "last.npz")


def test_instances_train_on_the_cells_between_membranes(dataset, tmp_path):
    train_small(dataset, tmp_path / "run", "--instances", "--best-metric", "val_map", "--val-fraction", 0.25)
    meta = load_checkpoint(str(tmp_path / "run" / "checkpoints" / "best.npz"))[0]
    assert meta["model"]["n_classes"] == 3 and 0 <= meta["scores"]["val_map"] <= 1


def test_interior_objects_need_a_network_trained_for_objects(dataset, tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "tiny.npz")
    refused = run_script("predict_unet_test.py", "--checkpoint", checkpoint, "--test-data-path", f"{dataset}/test_image",
                         "--save-res-path", tmp_path / "masks", "--instance-path", tmp_path / "objects",
                         "--objects", "interior", cwd=tmp_path, check=False)
    assert refused.returncode == 1
    assert refused.stderr.strip() == (f"error: {checkpoint}: --objects interior needs a network trained for objects "
                                      f"(--instances); this one predicts one class: use --objects watershed")
    assert not os.path.exists(tmp_path / "masks") and not os.path.exists(tmp_path / "objects")


def two_cells_across_a_weak_membrane():
    """Cell probability of two cells (0.95) either side of a membrane column: 0.05, but 0.3 where it is weak."""
    prob = np.full((40, 41), 0.95, np.float32)
    prob[:, 20] = 0.05
    prob[15:25, 20] = 0.3
    return prob


def test_a_membrane_the_threshold_breaks_stays_a_line_between_cells_seeded_above_the_seed_threshold():
    prob = two_cells_across_a_weak_membrane()
    assert mask_of(prob, 0.2)[15:25, 20].all()  # the threshold alone breaks the membrane
    mask, cells = mask_of(prob, 0.2, seeds=(0.9, 0)), cells_of(prob, 0.2, seeds=(0.9, 0))
    assert not mask[:, 20].any() and mask[:, :20].all() and mask[:, 21:].all()
    assert np.array_equal(mask, cells > 0) and len(np.unique(cells[cells > 0])) == 2
    assert objects_of(prob, 0.2, "cells", min_size=1, seeds=(0.9, 0)).max() == 2
    assert objects_of(prob, 0.2, "cells", min_size=1).max() == 1  # seeded at the threshold: one cell


def test_seed_regions_smaller_than_the_least_seed_size_do_not_split_a_cell():
    prob = np.full((40, 41), 0.95, np.float32)
    prob[:, 20] = 0.05  # a membrane between two cells
    prob[10:17, 5:12] = 0.6  # a vesicle's rim inside the left cell, below the seed threshold, around a speck of seed
    prob[11:16, 6:11] = 0.95
    assert cells_of(prob, 0.5, seeds=(0.9, 0)).max() == 3  # the speck seeds a cell of its own
    assert cells_of(prob, 0.5, seeds=(0.9, 50)).max() == 2


def test_a_membrane_network_decides_its_mask_with_the_seed_threshold_of_its_checkpoint(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "tiny.npz", data=dict(format="pairs"))
    prob = two_cells_across_a_weak_membrane()
    model = biounet.load_model(checkpoint, device="cpu")
    assert model.decide(prob, threshold=0.2).objects.max() == 1  # uncalibrated: seeded at the threshold
    update_meta(checkpoint, seed_threshold=0.9)
    model = biounet.load_model(checkpoint, device="cpu")
    decided = model.decide(prob, threshold=0.2)
    assert not decided.mask[:, 20].any() and decided.objects.max() == 2
    assert model.decide(prob, threshold=0.2, seed_threshold=0.2).mask[15:25, 20].all()


def test_imagej_roi_sets_outline_each_object_exactly(tmp_path):
    objects = np.zeros((40, 50), np.uint16)
    objects[2:10, 3:20] = 1
    objects[15:36, 20:41][disk(10) > 0] = 2
    objects[30:33, 2:4] = 3
    (tmp_path / "RoiSet.zip").write_bytes(roi_set(objects))
    rois = roifile.roiread(str(tmp_path / "RoiSet.zip"))
    assert [roi.name for roi in rois] == ["0001", "0002", "0003"]
    for number, roi in enumerate(rois, start=1):
        # ImageJ fills the pixels whose centres (x + 0.5, y + 0.5) lie inside the polygon
        inside = polygon2mask(objects.shape, roi.coordinates()[:, ::-1] - 0.5)
        assert np.array_equal(inside, objects == number)
