"""The Segment widget, driven as a person drives it in a shown napari viewer (under Xvfb): add an
image layer, choose it and a model, press Run, wait for the layers; change the threshold; press
Cancel midway; give a damaged checkpoint."""
import dask.array as da
import numpy as np
import pytest
from PIL import Image

import napari_helpers
from biounet.api import load_model
from biounet.napari_plugin.model_choice import CHOSEN
from biounet.napari_plugin.segment import SegmentWidget
from napari_helpers import coloured_share, em_slice, tiny_model, wait_until_idle

viewer, notifications = napari_helpers.viewer, napari_helpers.notifications  # the shared fixtures


@pytest.fixture
def segment(viewer, tmp_path):
    _, widget = viewer.window.add_plugin_dock_widget("biounet", "Segment")  # as Plugins > biounet U-Net does
    assert isinstance(widget, SegmentWidget)
    CHOSEN.choose(tiny_model(tmp_path / "tiny.npz"))
    return widget


def run(qtbot, widget):
    widget.run_button.native.click()
    wait_until_idle(qtbot, widget)


def test_segmenting_an_image_layer_adds_probabilities_mask_and_objects_drawn_over_it(viewer, segment, qtbot,
                                                                                      tmp_path):
    image = em_slice(160)
    viewer.add_image(image, name="em")
    before = viewer.screenshot(canvas_only=True)
    model = load_model(CHOSEN.checkpoint)
    threshold = float(np.median(model.predict(image).probabilities))  # a random network: half the pixels cells
    segment.threshold.value = round(threshold, 2)
    segment.image.value = "em"
    run(qtbot, segment)
    assert [layer.name for layer in viewer.layers] == ["em", "em probabilities", "em mask", "em objects"]
    expected = model.predict(image, threshold=segment.threshold.value)  # the API's result, the scripts'
    np.testing.assert_array_equal(viewer.layers["em mask"].data, expected.mask > 0)
    np.testing.assert_array_equal(viewer.layers["em objects"].data, expected.objects)
    assert segment.estimate.value.startswith(f"{expected.objects.max()} objects")
    after = viewer.screenshot(canvas_only=True)
    Image.fromarray(after).save(tmp_path / "segmented.png")
    assert coloured_share(before) < 0.01 and coloured_share(after) > 0.2  # the objects drawn over the grey image


def test_the_threshold_and_object_size_decide_again_without_predicting_again(viewer, segment, qtbot, monkeypatch):
    viewer.add_image(em_slice(96), name="em")
    run(qtbot, segment)
    calls = []
    monkeypatch.setattr(segment.model, "probability_maps", lambda *a, **k: calls.append(1))
    probabilities = viewer.layers["em probabilities"].data
    for threshold in (0.2, 0.8):
        segment.threshold.value = threshold
        np.testing.assert_array_equal(viewer.layers["em mask"].data, probabilities > threshold)
    segment.object_size.value = 30
    assert "(as given)" in segment.estimate.value and calls == []


def test_a_stack_is_segmented_slice_by_slice_and_cancel_stops_it_leaving_the_layers_as_they_were(
        viewer, segment, qtbot, notifications):
    stack = np.stack([em_slice(96, seed) for seed in range(12)])
    viewer.add_image(stack, name="stack")
    segment.run_button.native.click()
    qtbot.waitUntil(lambda: segment.bar is not None and segment.bar.n >= 1, timeout=60000)
    segment.cancel_button.native.click()
    wait_until_idle(qtbot, segment)
    assert [layer.name for layer in viewer.layers] == ["stack"] and segment.status.value.startswith("cancelled")
    run(qtbot, segment)
    assert viewer.layers["stack objects"].data.shape == stack.shape
    assert viewer.layers["stack mask"].data.shape == stack.shape


def test_a_dask_layer_is_predicted_block_by_block_as_the_api_does(viewer, segment, qtbot):
    volume = np.stack([em_slice(128, seed) for seed in range(2)])
    viewer.add_image(da.from_array(volume, chunks=(1, 64, 64)), name="volume")
    run(qtbot, segment)
    expected = load_model(CHOSEN.checkpoint).predict_blocks(volume)
    np.testing.assert_array_equal(np.asarray(viewer.layers["volume mask"].data), expected["masks"][:])
    assert "block by block" in segment.estimate.value


def test_a_damaged_checkpoint_is_one_notification_and_the_viewer_keeps_its_layers(viewer, segment, qtbot, tmp_path,
                                                                                  notifications):
    viewer.add_image(em_slice(64), name="em")
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(b"PK\x03\x04 not a checkpoint")
    CHOSEN.choose(damaged)
    run(qtbot, segment)
    errors = [n.message for n in notifications if "biounet" in n.message]
    assert len(errors) == 1 and "damaged.npz" in errors[0] and "\n" not in errors[0]
    assert [layer.name for layer in viewer.layers] == ["em"]


def test_an_image_of_the_wrong_channels_is_one_notification(viewer, segment, qtbot, notifications):
    viewer.add_image(np.zeros((4, 4, 64, 64), np.uint8), name="4d")
    run(qtbot, segment)
    errors = [n.message for n in notifications if "biounet" in n.message]
    assert errors == ["biounet: 4d: 4 dimensions (4, 4, 64, 64): segment a 2D image, a stack of slices, or an image "
                      "with channels"]


def test_the_published_model_offline_is_one_notification_and_the_model_stays(viewer, segment, qtbot, tmp_path,
                                                                              monkeypatch, notifications):
    monkeypatch.setenv("ISBI_BASE_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    chosen = CHOSEN.checkpoint
    segment.pretrained.native.click()
    qtbot.waitUntil(lambda: segment.status.value.startswith("error"), timeout=30000)
    errors = [n.message for n in notifications if n.message.startswith("biounet")]
    assert len(errors) == 1 and "http://127.0.0.1:9/checkpoints.tar.gz" in errors[0] and "\n" not in errors[0]
    assert CHOSEN.checkpoint == chosen



def test_one_view_unticked_predicts_as_the_api_does_without_the_flips(viewer, segment, qtbot):
    image = em_slice(64)
    viewer.add_image(image, name="em")
    segment.tta.value = False
    run(qtbot, segment)
    expected = load_model(CHOSEN.checkpoint).predict(image, tta=False)
    np.testing.assert_array_equal(viewer.layers["em mask"].data, expected.mask > 0)
    assert not np.array_equal(expected.mask, load_model(CHOSEN.checkpoint).predict(image).mask)
