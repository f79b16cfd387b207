"""Objects measured in units of their own diameter: training rescales each image so that its objects
are STANDARD_DIAMETER pixels wide, prediction estimates a new image's object size, rescales it, and
maps the result back to the image's own pixels; the watershed's settings follow the diameter."""
import os

import cv2
import numpy as np
import pytest

from biounet.data.labels import connected_objects
from biounet.data.loader import SegmentationDataset, resize
from biounet.evaluation.instances import STANDARD_DIAMETER, estimate_diameter, in_diameters, median_diameter
from biounet.model import backend
from biounet.model.checkpoint import load_checkpoint
from biounet.prediction.inference import predict_at_object_size
from conftest import run_script


def discs(shape, radius, spacing):
    """Numbered discs of `radius` on a grid `spacing` pixels apart."""
    objects = np.zeros(shape, np.int32)
    for number, (y, x) in enumerate(((y, x) for y in range(spacing // 2, shape[0] - radius, spacing)
                                     for x in range(spacing // 2, shape[1] - radius, spacing)), 1):
        cv2.circle(objects, (x, y), radius, number, -1)
    return objects


def test_the_median_diameter_is_that_of_a_disc_of_each_objects_area():
    assert median_diameter(discs((120, 120), 10, 30)) == pytest.approx(20, abs=1)
    assert median_diameter(np.zeros((8, 8), np.int32)) is None


def test_the_smallest_object_and_the_seed_distance_follow_the_diameter_unless_given():
    assert in_diameters(None) == (16, 10)  # the size unknown: pixels, as before
    assert in_diameters(20) == (16, 10) and in_diameters(40) == (63, 20)
    assert in_diameters(40, min_size=5, min_distance=3) == (5, 3)


@pytest.mark.parametrize("radius", [4, 9, 20])
def test_an_images_object_size_is_estimated_from_what_is_found_at_its_own_scale_and_at_the_standard(radius):
    def foreground_at(scale):  # a perfect network: the discs, drawn at the scale asked for
        return (discs((int(400 * scale), int(400 * scale)), round(radius * scale), round(3 * radius * scale)) > 0) * 1.0
    assert estimate_diameter(foreground_at) == (pytest.approx(2 * radius, rel=0.15), None)
    assert estimate_diameter(lambda scale: np.zeros((50, 50))) == (None, None)


def test_an_estimate_that_sees_the_image_as_one_blob_is_overruled_by_the_scale_whose_objects_come_out_at_the_standard():
    def foreground_at(scale):  # nuclei 12 wide in a 300 x 300 tissue, found only when the image is enlarged
        side = int(300 * scale)
        if scale < 2:
            return cv2.circle(np.zeros((side, side)), (side // 2, side // 2), int(140 * scale), 1.0, -1)
        return (discs((side, side), round(6 * scale), round(18 * scale)) > 0) * 1.0
    diameter, warning = estimate_diameter(foreground_at)
    assert diameter == pytest.approx(12, rel=0.15)
    assert warning.startswith("objects estimated 280 pixels wide at first, overruled: at x2 they come out 24")


def test_without_a_plausible_scale_the_image_is_predicted_at_its_own_scale_with_a_warning():
    def foreground_at(scale):  # one blob, whatever the scale
        side = int(300 * scale)
        return cv2.circle(np.zeros((side, side)), (side // 2, side // 2), int(140 * scale), 1.0, -1)
    diameter, warning = estimate_diameter(foreground_at)
    assert diameter is None and "at no scale tried" in warning and "predicted at the image's own scale" in warning


class Brightness(backend.nn.Module):
    """A stand-in network for objects: bright pixels are object; it records the sizes it was given."""
    n_channels, padding, norm = 1, "same", "batch"

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(tuple(x.shape[2:]))
        object_logit = 20 * (x - 0.5)
        return backend.flow.cat([-object_logit, object_logit, -object_logit], dim=1)


def test_prediction_sees_the_image_at_the_trained_object_size_and_answers_at_the_images_own_size():
    image = (discs((150, 200), 6, 30) > 0).astype(np.float32)
    net, meta = Brightness(), dict(data=dict(object_size=STANDARD_DIAMETER))
    prob, diameter = predict_at_object_size(net, meta, image, device="cpu", object_size="auto")
    assert diameter == pytest.approx(13, rel=0.1) and prob.shape == (150, 200, 3)  # cv2's discs of radius 6
    assert net.seen[-1] == (round(150 * 24 / diameter), round(200 * 24 / diameter))  # the last pass: objects 24 wide
    assert np.mean((prob[..., 1] > 0.5) == (image > 0)) > 0.98
    net.seen.clear()
    _, given = predict_at_object_size(net, meta, image, device="cpu", object_size=6.0)  # said to be 6 wide: 4x
    assert given == 6.0 and net.seen == [(600, 800)]
    net.seen.clear()
    unscaled = predict_at_object_size(net, meta, image, device="cpu", object_size="off")
    assert unscaled[1] is None and net.seen == [(150, 200)]
    own = predict_at_object_size(net, dict(data={}), image, device="cpu", object_size=12.0)  # a network of one scale
    assert own[1] == 12.0 and net.seen[-1] == (150, 200)


def test_training_rescales_each_image_so_that_its_objects_have_the_standard_diameter():
    from biounet.training.flags import parse_args
    from biounet.training.data import at_object_size
    small, large = discs((60, 80), 6, 30), discs((200, 160), 24, 80)  # objects 12 and 48 pixels wide
    data = SegmentationDataset([(o > 0).astype(np.float32) for o in (small, large)],
                               [(o > 0).astype(np.uint8) for o in (small, large)], instances=[small, large])
    train, val, size = at_object_size(parse_args([]), data, data.subset([1]))
    assert size == STANDARD_DIAMETER and train.shapes == [(120, 160), (100, 80)] and val.shapes == [(100, 80)]
    for image, label, objects in zip(train.images, train.labels, train.instances):
        assert image.shape == label.shape == objects.shape
        assert median_diameter(objects) == pytest.approx(STANDARD_DIAMETER, rel=0.1)
    halved = at_object_size(parse_args(["--object-size", "48"]), data, None)[0]  # said to be 48 wide: all halved
    assert halved.shapes == [(32, 40), (100, 80)]  # (no side below the smallest the network takes, 32)
    assert at_object_size(parse_args(["--no-object-size"]), data, None)[2] == 0
    unnumbered = SegmentationDataset(data.images, data.labels)  # ISBI-like labels: each image at its own scale
    assert at_object_size(parse_args([]), unnumbered, None)[0] is unnumbered


def membranes(shape, spacing):
    """ISBI-like labels: cells (1) spacing pixels apart between membranes (0) 2 pixels thin."""
    label = np.ones(shape, np.uint8)
    label[::spacing], label[1::spacing], label[:, ::spacing], label[:, 1::spacing] = 0, 0, 0, 0
    return label


def test_for_membranes_the_diameter_is_the_cells_and_images_are_brought_to_the_training_median():
    from biounet.training.flags import parse_args
    from biounet.training.data import at_object_size
    fine, mid, coarse = membranes((120, 120), 20), membranes((120, 120), 30), membranes((120, 120), 40)
    data = SegmentationDataset([label.astype(np.float32) for label in (fine, mid, coarse)], [fine, mid, coarse])
    train, _, size = at_object_size(parse_args(["--object-size", "auto"]), data, None)
    assert size == pytest.approx(median_diameter(connected_objects(mid, connectivity=1)), abs=0.5)  # about 31
    (fine_side, _), (mid_side, _), (coarse_side, _) = train.shapes  # cells about 20, 30, 40 wide: to the middle's
    assert fine_side > 180 and abs(mid_side - 120) <= 3 and coarse_side < 95
    for label in train.labels:
        assert median_diameter(connected_objects(label, connectivity=1)) == pytest.approx(size, rel=0.1)
    given = at_object_size(parse_args(["--object-size", "40"]), data, None)  # said to be 40 wide: kept as they are
    assert given[2] == 40 and given[0].shapes == data.shapes

    def cell_probability_at(scale):  # a perfect network for membranes, on the coarse image rescaled
        return resize(coarse.astype(np.float32), (round(120 * scale), round(120 * scale)))
    assert estimate_diameter(cell_probability_at, size, "cells")[0] == pytest.approx(
        median_diameter(connected_objects(coarse, connectivity=1)), rel=0.1)


def test_a_network_trained_at_an_object_size_keeps_it_and_predicts_at_each_images_own_size(tmp_path):
    from test_formats import write_dsb
    root = write_dsb(tmp_path / "dsb", sizes=((48, 48), (40, 56)))  # discs of radius 6
    flags = ["--data-path", root, "--progress", "", "--base", 4, "--epochs", 1, "--crop", 0, "--val-fraction", 0]
    out = run_script("TrainUnetDataSet.py", *flags, "--checkpoint-dir", "sized", cwd=tmp_path).stdout
    assert f"each image rescaled to {STANDARD_DIAMETER}" in out
    assert load_checkpoint(str(tmp_path / "sized" / "last.npz"))[0]["data"]["object_size"] == STANDARD_DIAMETER
    refused = run_script("TrainUnetDataSet.py", *flags, "--object-size", 12, "--img-size", 64, cwd=tmp_path,
                         check=False)
    assert refused.returncode != 0 and "--img-size" in refused.stderr and "--object-size" in refused.stderr
    test = write_dsb(tmp_path / "test", sizes=((36, 52),), masks=False, seed=1)
    run_script("predict_unet_test.py", "--checkpoint", tmp_path / "sized" / "last.npz", "--test-data-path", test,
               "--no-tta", "--save-res-path", "pred", cwd=tmp_path)
    assert os.listdir(tmp_path / "pred") == ["id0.png"]
    assert cv2.imread(str(tmp_path / "pred" / "id0.png"), 0).shape == (36, 52)


def test_specks_around_the_objects_hardly_move_their_median_diameter():
    objects = discs((120, 120), 10, 30)
    specks = np.zeros_like(objects)
    specks[::7, ::7] = np.arange(1, specks[::7, ::7].size + 1).reshape(specks[::7, ::7].shape) + objects.max()
    assert median_diameter(np.where(objects > 0, objects, specks)) == pytest.approx(20, abs=1.5)
