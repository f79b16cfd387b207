import errno
import gc
import io
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from biounet.model import backend
from biounet.model.checkpoint import CheckpointError, build_model, load_checkpoint, read_oneflow_folder, save_checkpoint
from biounet.model.unet import UNet
from conftest import ROOT

ONEFLOW_PYTHON = os.path.join(ROOT, ".venv", "bin", "python")


def outputs(model, x):
    model.eval()
    with backend.flow.no_grad():
        return backend.to_numpy(model(backend.to_tensor(x)))


def test_a_checkpoint_rebuilds_the_same_network_without_being_told_its_shape(tmp_path):
    backend.seed_everything(0)
    model = UNet(n_channels=1, n_classes=2, bilinear=True, base=4)
    path = str(tmp_path / "model.npz")
    save_checkpoint(path, model, epoch=3)
    rebuilt, meta = build_model(path, "cpu")
    assert meta["model"] == dict(n_channels=1, n_classes=2, bilinear=True, base=4, norm="batch", padding="same",
                                 dropout=0.0)
    assert meta["epoch"] == 3
    x = np.random.default_rng(0).random((1, 1, 32, 32))
    np.testing.assert_array_equal(outputs(rebuilt, x), outputs(model, x))


def test_an_instance_norm_network_round_trips_too(tmp_path):
    backend.seed_everything(0)
    model = UNet(base=4, norm="instance")
    save_checkpoint(str(tmp_path / "m.npz"), model)
    rebuilt, meta = build_model(str(tmp_path / "m.npz"), "cpu")
    assert meta["model"]["norm"] == "instance"
    x = np.random.default_rng(0).random((1, 1, 32, 48))
    np.testing.assert_array_equal(outputs(rebuilt, x), outputs(model, x))


# The metadata of checkpoints written by earlier versions of train.sh (read off checkpoints they wrote).
FLAGS_OF_THE_FIRST_VERSION = dict(base=4, batch_size=1, bilinear=False, crop=32, epochs=1, lr=1e-3, preset="cpu")
EARLIER_METADATA = {
    "first version: no norm, padding or dropout (batch norm), flags as args": dict(
        model=dict(n_channels=1, n_classes=1, bilinear=False, base=4), epoch=1, best=0.73, input_scale=1.0,
        scores=dict(train_loss=0.73, val_loss=0.73, val_accuracy=0.41), args=FLAGS_OF_THE_FIRST_VERSION),
    "instance norm, best metric, no padding or dropout": dict(
        model=dict(n_channels=1, n_classes=1, bilinear=False, base=4, norm="instance"), epoch=1, best=0.62,
        best_metric="val_v_rand", stale_epochs=0, input_scale=1.0, args=dict(FLAGS_OF_THE_FIRST_VERSION, norm=None)),
    "calibrated, data described, flags as args": dict(
        model=dict(n_channels=1, n_classes=1, bilinear=False, base=4, norm="instance", padding="same", dropout=0.0),
        epoch=1, best=0.60, best_metric="val_v_rand", stale_epochs=0, input_scale=1.0, args=FLAGS_OF_THE_FIRST_VERSION,
        data=dict(format="pairs", img_size=0, ignore_index=255, instance_labels=False), output_shift=-0.405,
        calibrated_threshold=0.4),
}


@pytest.mark.parametrize("era", EARLIER_METADATA)
def test_checkpoints_of_earlier_versions_keep_loading_as_the_network_they_were(tmp_path, era):
    meta = dict(format="unet-npz/1", backend=backend.NAME, **EARLIER_METADATA[era])
    model = UNet(**{"norm": "batch", **meta["model"]})
    arrays = {f"model/{k}": backend.to_numpy(v) for k, v in model.state_dict().items()}
    path = str(tmp_path / "earlier.npz")
    np.savez(path, __meta__=np.array(json.dumps(meta)), **arrays)
    rebuilt, loaded = build_model(path, "cpu")
    assert loaded["model"] == model.config()
    x = np.random.default_rng(0).random((1, 1, 32, 32))
    shift = meta.get("output_shift", 0.0)
    np.testing.assert_allclose(outputs(rebuilt, x), outputs(model, x) - shift, atol=1e-5)


def test_a_checkpoint_is_an_npz_that_loads_without_pickle(tmp_path):
    path = str(tmp_path / "model.npz")
    save_checkpoint(path, UNet(base=4))
    with np.load(path, allow_pickle=False) as npz:
        assert "model/inc.double_conv.0.weight" in npz.files


def test_a_damaged_checkpoint_stops_with_an_error_naming_the_file(tmp_path):
    path = tmp_path / "model.npz"
    save_checkpoint(str(path), UNet(base=4))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model\.npz: damaged or not a U-Net checkpoint"):
        load_checkpoint(str(path))


def test_a_missing_checkpoint_says_so(tmp_path):
    with pytest.raises(CheckpointError, match=r"nothing\.npz: checkpoint not found"):
        load_checkpoint(str(tmp_path / "nothing.npz"))


def test_a_checkpoint_that_does_not_fit_the_model_names_the_file_and_the_weight(tmp_path):
    path = str(tmp_path / "model.npz")
    save_checkpoint(path, UNet(base=4))
    meta, weights, arrays = load_checkpoint(path)
    from biounet.model.checkpoint import load_weights
    with pytest.raises(CheckpointError, match=r"model\.npz: does not fit the model: .*inc\.double_conv\.0\.weight: "
                                              r"\(4, 1, 3, 3\) in the file, \(8, 1, 3, 3\) in the model"):
        load_weights(UNet(base=8), weights, path)


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = str(tmp_path / "last.npz")
    save_checkpoint(path, UNet(base=4), epoch=1)
    before = open(path, "rb").read()

    class FillsUp(io.FileIO):  # a disk that is full after 20 kB
        def write(self, data):
            if self.tell() + len(data) > 20_000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(data)

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FillsUp(fd, mode))
    with pytest.raises(OSError, match=r"last\.npz: could not be written \(No space left on device\)"):
        save_checkpoint(path, UNet(base=4), epoch=2)
    gc.collect()
    assert unraisable == []  # no second traceback from a half-closed zip
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["last.npz"]


WRITE_ORIGINAL_FORMAT = """
import sys
import numpy as np
import oneflow as flow
from biounet.model.unet import UNet
from parity_helpers import outputs, trained_a_little
folder, x = sys.argv[1], np.load(sys.argv[2])
model = trained_a_little(UNet(n_channels=1, n_classes=1, bilinear=False, base=4), seed=0)
optimizer = flow.optim.Adam(model.parameters())
flow.save({"net": model.state_dict(), "opt": optimizer.state_dict(), "epoch": 39}, folder)
np.save(sys.argv[3], outputs(model, x))
"""


@pytest.mark.skipif(not os.path.exists(ONEFLOW_PYTHON), reason="writing flow.save's format needs OneFlow's .venv")
def test_the_original_oneflow_checkpoint_folder_loads_with_the_original_input_scale(tmp_path):
    x = np.random.default_rng(0).random((1, 1, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    folder = tmp_path / "checkpoints"
    env = {**os.environ, "UNET_BACKEND": "oneflow", "PYTHONPATH": os.path.join(ROOT, "tests") + os.pathsep + ROOT}
    subprocess.run([ONEFLOW_PYTHON, "-c", WRITE_ORIGINAL_FORMAT, str(folder), str(tmp_path / "x.npy"),
                    str(tmp_path / "y.npy")], env=env, check=True, timeout=300)
    assert (folder / "pickled_data").exists()
    rebuilt, meta = build_model(str(folder), "cpu")
    assert meta["input_scale"] == 255.0
    assert meta["model"] == dict(n_channels=1, n_classes=1, bilinear=False, base=4, norm="batch", padding="same",
                                 dropout=0.0)
    assert np.abs(outputs(rebuilt, x) - np.load(tmp_path / "y.npy")).max() <= 1e-4


class _RunsACommand:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_oneflow_checkpoint_cannot_run_code(tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    payload = _RunsACommand()
    payload.marker = tmp_path / "pwned"
    (folder / "pickled_data").write_bytes(pickle.dumps({"protocol_version": 1, "data": {"net": payload}}))
    with pytest.raises(CheckpointError, match=r"pickled_data: unsafe or damaged .*refusing to load posix\.system"):
        read_oneflow_folder(str(folder))
    assert not payload.marker.exists()


def test_checkpoints_are_written_off_the_steps_path_from_a_copy_of_the_weights(tmp_path, monkeypatch):
    import threading

    from biounet.model import checkpoint
    from biounet.model.checkpoint import RunFolder
    started, release = threading.Event(), threading.Event()
    write = checkpoint.write_checkpoint

    def slow_write(path, arrays):
        started.set()
        release.wait(10)
        write(path, arrays)
    monkeypatch.setattr(checkpoint, "write_checkpoint", slow_write)
    model = UNet(base=4, norm="instance")
    folder = RunFolder(str(tmp_path))
    folder.save(str(tmp_path / "last.npz"), model, epoch=1)
    assert started.wait(10) and not (tmp_path / "last.npz").exists()  # save returned; the write goes on
    saved = {k: backend.to_numpy(v).copy() for k, v in model.state_dict().items()}
    with backend.flow.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)  # the next steps change the weights meanwhile
    release.set()
    folder.close()
    weights = load_checkpoint(str(tmp_path / "last.npz"))[1]
    assert all(np.array_equal(weights[k], saved[k]) for k in saved)


def test_a_background_write_that_fails_stops_the_run_at_the_next_save_in_one_line(tmp_path, monkeypatch):
    from biounet.model import checkpoint
    from biounet.model.checkpoint import RunFolder

    def full_disk(path, arrays):
        raise OSError(f"{path}: could not be written (No space left on device); it is as it was before")
    monkeypatch.setattr(checkpoint, "write_checkpoint", full_disk)
    folder = RunFolder(str(tmp_path))
    folder.save(str(tmp_path / "last.npz"), UNet(base=4), epoch=1)
    with pytest.raises(OSError, match="last.npz: could not be written"):
        folder.flush()
    folder.close()
