"""The plugin as napari finds it (its npe2 manifest): a checkpoint dragged onto the viewer becomes
the model, a Labels layer saved is a label file training reads, the sample images open (fetched
once, from a local server here), and offline the sample is one line."""
import functools
import http.server
import io
import threading
import zipfile

import numpy as np
import pytest
from PIL import Image

import napari_helpers
from biounet.data.loader import label_to_classes, read_label_array
from biounet.napari_plugin.model_choice import CHOSEN
from biounet.napari_plugin.samples import SampleUnavailable
from napari_helpers import em_pair, tiny_model

viewer, notifications = napari_helpers.viewer, napari_helpers.notifications  # the shared fixtures


@pytest.fixture
def server(tmp_path):
    """A local HTTP server of tmp_path/www; its address."""
    (tmp_path / "www").mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()


def test_a_checkpoint_opened_in_napari_becomes_the_model_and_adds_no_layer(viewer, tmp_path):
    path = tiny_model(tmp_path / "dragged.npz")
    viewer.open(path, plugin="biounet")
    assert CHOSEN.checkpoint == path and len(viewer.layers) == 0


def test_a_damaged_checkpoint_opened_is_one_notification_and_the_model_stays(viewer, tmp_path, notifications):
    CHOSEN.choose(tiny_model(tmp_path / "good.npz"))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    viewer.open(str(tmp_path / "bad.npz"), plugin="biounet")
    errors = [n.message for n in notifications if n.message.startswith("biounet")]
    assert len(errors) == 1 and "bad.npz" in errors[0] and CHOSEN.checkpoint.endswith("good.npz")


def test_a_corrected_mask_layer_saves_as_the_label_file_training_reads(viewer, tmp_path):
    _, label = em_pair(64)
    layer = viewer.add_labels((label > 0).astype(np.uint8), name="em mask")
    viewer.layers.save(str(tmp_path / "em.png"), selected=False, plugin="biounet")
    saved = read_label_array(str(tmp_path / "em.png"))
    assert set(np.unique(saved)) == {0, 255}
    np.testing.assert_array_equal(label_to_classes(saved, "em.png"), layer.data)


def test_numbered_objects_save_with_their_numbers(viewer, tmp_path):
    objects = np.zeros((32, 32), np.uint16)
    objects[2:10, 2:10], objects[20:30, 5:15] = 7, 300
    viewer.add_labels(objects, name="objects")
    viewer.layers.save(str(tmp_path / "objects.tif"), selected=False, plugin="biounet")
    np.testing.assert_array_equal(read_label_array(str(tmp_path / "objects.tif")), objects)


def test_the_isbi_sample_opens_from_the_data_the_scripts_fetch(viewer, tmp_path, monkeypatch):
    image, _ = em_pair(64)
    (tmp_path / "isbi" / "test_image").mkdir(parents=True)
    Image.fromarray(image).save(tmp_path / "isbi" / "test_image" / "0.png")
    monkeypatch.setenv("ISBI_DATA_DIR", str(tmp_path / "isbi"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    viewer.open_sample("biounet", "isbi2012")
    np.testing.assert_array_equal(viewer.layers["ISBI 2012 EM slice"].data, image)


def test_the_dsb_sample_is_downloaded_once(viewer, tmp_path, monkeypatch, server):
    nucleus = np.zeros((40, 50, 4), np.uint8)
    nucleus[10:20, 10:30] = 200
    encoded = io.BytesIO()
    Image.fromarray(nucleus).save(encoded, format="png")
    with zipfile.ZipFile(tmp_path / "www" / "stage1_test.zip", "w") as archive:
        archive.writestr("abc/images/abc.png", encoded.getvalue())
    monkeypatch.setenv("DSB_SAMPLE_URL", f"{server}/stage1_test.zip")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    viewer.open_sample("biounet", "dsb2018")
    (tmp_path / "www" / "stage1_test.zip").unlink()  # the second time comes from the cache
    viewer.open_sample("biounet", "dsb2018")
    assert [layer.data.shape for layer in viewer.layers] == [(40, 50, 3)] * 2  # RGB, as the scripts read it


def test_offline_the_sample_is_one_line_and_no_layer(viewer, tmp_path, monkeypatch):
    monkeypatch.setenv("DSB_SAMPLE_URL", "http://127.0.0.1:9/stage1_test.zip")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(SampleUnavailable) as said:  # napari's notification shows its message
        viewer.open_sample("biounet", "dsb2018")
    assert str(said.value).startswith("biounet: DSB 2018 nuclei: could not download "
                                      "http://127.0.0.1:9/stage1_test.zip") and "\n" not in str(said.value)
    assert len(viewer.layers) == 0
