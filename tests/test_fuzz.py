"""Fuzzing what reads files a user or a download hands us: images, labels, TIFF stacks, our
checkpoints (bytes and metadata) and the original OneFlow folders. Random bytes, truncations,
flipped bytes and good headers with garbage behind them may only end in a correct read or in the
project's own one-line error (DataError, CheckpointError), never in another exception.

The suite runs a bounded number of cases; for a longer run:
    FUZZ_EXAMPLES=2000 bash run_tests.sh tests/test_fuzz.py
"""
import atexit
import io
import json
import os
import shutil
import tempfile

import cv2
import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st

from biounet.core.files import DataError
from biounet.data.datasets import read_tiff_stack
from biounet.data.loader import label_to_classes, read_image, read_label_array
from biounet.model.checkpoint import CheckpointError, build_model, load_checkpoint, save_checkpoint
from biounet.model.unet import UNet

fuzz = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "25")), deadline=None, derandomize=True)


def _png():
    rng = np.random.default_rng(0)
    return cv2.imencode(".png", rng.integers(0, 256, (24, 20, 3), dtype=np.uint8))[1].tobytes()


def _tiff():
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.arange(3 * 16 * 12, dtype=np.uint8).reshape(3, 16, 12), photometric="minisblack")
    return buffer.getvalue()


def _checkpoint():
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.npz")
        save_checkpoint(path, UNet(base=2), epoch=1)
        return open(path, "rb").read()


GOOD = {"png": _png(), "tiff": _tiff(), "npz": _checkpoint()}


@st.composite
def damaged(draw, kind):
    """Bytes that look more or less like a good file of `kind`."""
    good = GOOD[kind]
    how = draw(st.sampled_from(["random", "truncated", "flipped", "header"]))
    if how == "random":
        return draw(st.binary(max_size=4096))
    if how == "truncated":
        return good[:draw(st.integers(0, len(good) - 1))]
    if how == "flipped":
        data = bytearray(good)
        for position in draw(st.lists(st.integers(0, len(good) - 1), min_size=1, max_size=16)):
            data[position] = draw(st.integers(0, 255))
        return bytes(data)
    return good[:draw(st.integers(1, 200))] + draw(st.binary(max_size=1024))


WORK = tempfile.mkdtemp(prefix="unet-fuzz-")
atexit.register(shutil.rmtree, WORK, ignore_errors=True)


def written(data, name):
    path = os.path.join(WORK, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def read_or_own_error(read, path, error):
    """What read(path) gives, or None when it stops with the project's own `error` naming `path`;
    any other exception fails the test."""
    try:
        return read(path)
    except error as err:
        assert str(err).startswith(path)
        return None


@fuzz
@given(damaged("png") | damaged("tiff"), st.sampled_from(["x.png", "x.tif", "x.jpg"]))
def test_reading_a_damaged_image_gives_an_image_or_a_data_error(data, name):
    path = written(data, name)
    image = read_or_own_error(read_image, path, DataError)
    assert image is None or image.dtype == np.float32 and image.ndim in (2, 3) and 0 <= image.min() and image.max() <= 1


@fuzz
@given(damaged("png") | damaged("tiff"), st.sampled_from(["x.png", "x.tif"]))
def test_reading_a_damaged_label_gives_classes_or_a_data_error(data, name):
    path = written(data, name)
    label = read_or_own_error(lambda p: label_to_classes(read_label_array(p), p, classes=3), path, DataError)
    assert label is None or label.dtype == np.uint8


@fuzz
@given(damaged("tiff"))
def test_reading_a_damaged_tiff_stack_gives_pages_or_a_data_error(data):
    path = written(data, "volume.tif")
    pages = read_or_own_error(read_tiff_stack, path, DataError)
    assert pages is None or pages.ndim in (3, 4)


@fuzz
@given(damaged("npz"))
def test_loading_a_damaged_checkpoint_gives_a_network_or_a_checkpoint_error(data):
    path = written(data, "model.npz")
    built = read_or_own_error(lambda p: build_model(p, "cpu"), path, CheckpointError)
    assert built is None or built[1]["model"] == built[0].config()


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
META_KEYS = ["format", "model", "data", "output_shift", "input_scale", "epoch", "args"]
MODEL_KEYS = ["n_channels", "n_classes", "bilinear", "base", "norm", "padding", "dropout"]


@fuzz
@given(st.sampled_from(META_KEYS + [f"model.{k}" for k in MODEL_KEYS]), JSON, JSON)
def test_random_checkpoint_metadata_gives_a_network_or_a_checkpoint_error(key, value, whole):
    path = written(GOOD["npz"], "model.npz")
    meta, weights, _ = load_checkpoint(path)
    if key.startswith("model."):
        meta["model"][key[len("model."):]] = value
    else:
        meta[key] = value
    for changed in (meta, whole):  # one value replaced, or the metadata as a whole
        np.savez(path, __meta__=np.array(json.dumps(changed)), **{f"model/{k}": v for k, v in weights.items()})
        built = read_or_own_error(lambda p: build_model(p, "cpu"), path, CheckpointError)
        assert built is None or built[1]["model"] == built[0].config()


@fuzz
@given(st.binary(max_size=2048) | damaged("npz"))
def test_a_damaged_oneflow_checkpoint_folder_gives_a_checkpoint_error(data):
    folder = os.path.join(WORK, "oneflow_checkpoint")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "pickled_data"), "wb") as f:
        f.write(data)
    # No bytes make a network here: its tensors' folders are missing, so the only outcome is the one line.
    with pytest.raises(CheckpointError) as refused:
        build_model(folder, "cpu")
    assert str(refused.value).startswith(folder)
