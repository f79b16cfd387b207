"""The Train widget, driven as a person drives it: paint a correction into a Labels layer, train a
few seconds from it in a separate process, see the curve, and the new model segment; press Stop
midway and Resume."""
import os

import numpy as np
import pytest

import napari_helpers
from biounet.model.checkpoint import load_checkpoint
from biounet.napari_plugin.model_choice import CHOSEN
from biounet.napari_plugin.segment import SegmentWidget
from biounet.napari_plugin.train import TrainWidget
from conftest import write_dataset
from napari_helpers import em_pair, tiny_model, wait_until_idle

viewer, notifications = napari_helpers.viewer, napari_helpers.notifications  # the shared fixtures


@pytest.fixture
def widgets(viewer, tmp_path):
    CHOSEN.choose(tiny_model(tmp_path / "tiny.npz"))
    segment = viewer.window.add_plugin_dock_widget("biounet", "Segment")[1]  # as Plugins > biounet U-Net does
    train = viewer.window.add_plugin_dock_widget("biounet", "Train")[1]
    assert isinstance(segment, SegmentWidget) and isinstance(train, TrainWidget)
    train.checkpoint_dir.value = str(tmp_path / "runs")
    return segment, train


def corrected_layers(viewer):
    """An EM slice and its labels (1 = cell), one cell painted over by hand as a correction."""
    image, label = em_pair(96)
    viewer.add_image(image, name="em")
    labels = viewer.add_labels((label > 0).astype(np.uint8), name="em mask")
    labels.selected_label, labels.brush_size = 0, 6
    labels.paint((48, 48), 0)  # the eraser over a few pixels
    return labels


def trained(qtbot, train, timeout=180000):
    qtbot.waitUntil(lambda: train.process is None and train.train_button.enabled, timeout=timeout)


def test_training_from_corrected_layers_shows_the_curves_and_its_model_becomes_the_segment_model(
        viewer, widgets, qtbot):
    segment, train = widgets
    corrected_layers(viewer)
    train.image_layer.value, train.label_layer.value, train.minutes.value = "em", "em mask", 0.15
    train.train_button.native.click()
    assert train.process is not None and train.process.poll() is None  # the viewer's process stays free
    trained(qtbot, train)
    assert train.status.value.startswith("done: model") and CHOSEN.checkpoint.endswith("best.npz")
    assert str(segment.checkpoint.value) == CHOSEN.checkpoint
    meta = load_checkpoint(CHOSEN.checkpoint)[0]
    assert meta["model"]["base"] == 4  # fine-tuned from the tiny model that was chosen
    assert train.epochs and any(axes.lines for axes in train.figure.axes) and train.bar.value == train.bar.max
    segment.image.value = "em"
    segment.run_button.native.click()
    wait_until_idle(qtbot, segment)
    assert "em objects" in viewer.layers


def test_stop_midway_keeps_last_npz_and_resume_goes_on_from_it(viewer, widgets, qtbot):
    _, train = widgets
    corrected_layers(viewer)
    train.image_layer.value, train.label_layer.value, train.minutes.value = "em", "em mask", 0.5
    train.train_button.native.click()
    qtbot.waitUntil(lambda: train.bar.value >= 2, timeout=120000)
    train.stop_button.native.click()
    trained(qtbot, train)
    assert train.status.value.startswith("stopped by SIGINT") and train.resume_button.enabled
    folder = train.job["checkpoint_dir"]
    assert os.path.exists(os.path.join(folder, "last.npz"))
    stopped_at = load_checkpoint(os.path.join(folder, "last.npz"))[0]
    train.resume_button.native.click()
    trained(qtbot, train)
    assert train.status.value.startswith("done: model")
    assert load_checkpoint(os.path.join(folder, "last.npz"))[0]["epoch"] >= stopped_at["epoch"]


def test_training_from_a_folder_reads_it_as_the_scripts_do(viewer, widgets, qtbot, tmp_path):
    _, train = widgets
    data = write_dataset(tmp_path / "data", n_train=3, n_test=0, size=64)
    train.source.value, train.folder.value, train.minutes.value = "folder", f"{data}/train_image", 0.1
    assert not train.image_layer.visible and train.folder.visible
    train.train_button.native.click()
    trained(qtbot, train)
    assert train.status.value.startswith("done: model") and CHOSEN.checkpoint.startswith(str(tmp_path / "runs"))
    assert load_checkpoint(CHOSEN.checkpoint)[0]["data"]["format"] == "pairs"


def test_labels_that_do_not_fit_the_image_are_one_line(viewer, widgets, qtbot):
    _, train = widgets
    viewer.add_image(np.zeros((64, 64), np.uint8), name="small")
    viewer.add_labels(np.zeros((32, 32), np.uint8), name="other")
    train.image_layer.value, train.label_layer.value = "small", "other"
    train.train_button.native.click()
    assert train.process is None
    assert train.status.value == "error: the labels are (32, 32), the image (64, 64): draw the labels over the image"
