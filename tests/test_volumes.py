"""Volumes and slides larger than memory (volumes.py): read lazily, predicted block by block into
OME-Zarr stores, equal to the whole slice predicted at once, objects whole across block borders,
resumable, never written over; and trained from, window by window."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import tifffile
import zarr
from skimage.draw import disk

from biounet.evaluation.instances import objects_of, overlaps
from biounet.model import backend
from biounet.model.checkpoint import build_model, load_checkpoint, network_input
from biounet.prediction import stores, volumes
from biounet.prediction.inference import predict_sample
from conftest import ROOT, run_script, tiny_checkpoint, train_small

stores_not_framework = pytest.mark.skipif(backend.NAME != "oneflow", reason="processes and stores, not the framework: "
                                          "checked in the suite's OneFlow run (keeps the suite within its time)")


def smooth_volume(shape, seed=0):
    from scipy import ndimage
    rng = np.random.default_rng(seed)
    volume = ndimage.gaussian_filter(rng.random(shape), (0,) * (len(shape) - 2) + (2, 2))
    return ((volume - volume.min()) / np.ptp(volume) * 255).astype(np.uint8)


def write_ome_zarr(path, array, axes="zyx", chunks=None):
    group = zarr.open_group(str(path), mode="w")
    group.create_dataset("0", data=array, chunks=chunks or (1,) * (array.ndim - 2) + (64, 64),
                         dimension_separator="/")
    group.attrs.update(stores.ngff_attributes("input", axes, [1.0] * len(axes)))
    return str(path)


@pytest.fixture(scope="module")
def batch_norm_net(tmp_path_factory):
    """A tiny untrained U-Net with batch norm: what each pixel gets depends on its surroundings only."""
    return tiny_checkpoint(tmp_path_factory.mktemp("net") / "net.npz", norm="batch")


def whole_slices(checkpoint, volume, tta=False):
    model, meta = build_model(checkpoint, "cpu")
    return np.stack([predict_sample(model, meta, network_input(meta, page)[0], tile=0, tta=tta) for page in volume])


def read_store(path):
    return zarr.open_array(os.path.join(path, "0"), mode="r")[:]


def predict(volume, out, checkpoint, *extra, check=True):
    """predict_unet_test.py in this process (one worker unless `extra` says otherwise)."""
    workers = [] if "--workers" in extra or "--scheduler" in extra else ["--workers", 1]
    os.makedirs(out, exist_ok=True)
    return run_script("predict_unet_test.py", "--checkpoint", checkpoint, "--test-data-path", volume,
                      "--save-res-path", out / "masks", "--prob-path", out / "prob", *workers, *extra, cwd=out,
                      check=check)


@pytest.mark.parametrize("block", [96, 77])
def test_blocks_of_any_size_equal_the_whole_slice_predicted_at_once(tmp_path, batch_norm_net, block):
    volume = smooth_volume((1, 333, 301))
    path = write_ome_zarr(tmp_path / "vol.ome.zarr", volume)
    predict(path, tmp_path, batch_norm_net, "--block", block, "--save-prob", "--prob-bits", "16", "--no-tta")
    expected = whole_slices(batch_norm_net, volume)
    prob = read_store(tmp_path / "prob" / "vol.ome.zarr")
    assert prob.shape == volume.shape and prob.dtype == np.uint16
    assert np.abs(prob / 65535 - expected).max() <= 1 / 65535
    assert np.array_equal(read_store(tmp_path / "masks" / "vol.ome.zarr"), np.where(expected > 0.5, 255, 0))


def test_a_halo_short_of_the_networks_reach_would_show_at_the_block_borders(tmp_path, batch_norm_net):
    volume = smooth_volume((1, 333, 301))
    path = write_ome_zarr(tmp_path / "vol.ome.zarr", volume)
    predict(path, tmp_path, batch_norm_net, "--block", 96, "--halo", 0, "--save-prob", "--prob-bits", "32", "--no-tta")
    assert np.abs(read_store(tmp_path / "prob" / "vol.ome.zarr") - whole_slices(batch_norm_net, volume)).max() > 1e-4


def test_the_eight_views_of_a_block_equal_those_of_the_whole_slice(tmp_path, batch_norm_net):
    volume = smooth_volume((1, 300, 155))  # sides off the 16-pixel grid: flipped views pool from the far end
    path = write_ome_zarr(tmp_path / "vol.ome.zarr", volume)
    predict(path, tmp_path, batch_norm_net, "--block", 150, "--save-prob", "--prob-bits", "32")
    expected = whole_slices(batch_norm_net, volume, True)
    assert np.abs(read_store(tmp_path / "prob" / "vol.ome.zarr") - expected).max() < 1e-6


def test_outputs_are_ngff_images_that_ome_zarr_readers_open(tmp_path, batch_norm_net):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader
    volume = smooth_volume((2, 100, 90))
    path = write_ome_zarr(tmp_path / "vol.ome.zarr", volume)
    predict(path, tmp_path, batch_norm_net, "--block", 64, "--no-tta", "--save-prob", "--instance-path",
            tmp_path / "objects")
    for folder, spec in (("masks", Multiscales), ("prob", Multiscales), ("objects", Label)):
        nodes = list(Reader(parse_url(str(tmp_path / folder / "vol.ome.zarr")))())
        assert spec in [type(s) for s in nodes[0].specs], folder
        assert nodes[0].data[0].shape == volume.shape
        assert nodes[0].metadata["axes"] == [{"name": a, "type": "space"} for a in "zyx"]
    assert zarr.open_array(str(tmp_path / "masks" / "vol.ome.zarr" / "0")).chunks == (1, 64, 64)


@stores_not_framework
def test_downsampled_levels_hold_every_other_pixel_of_the_level_before_for_viewers(tmp_path, batch_norm_net):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    volume = smooth_volume((2, 140, 100))
    path = write_ome_zarr(tmp_path / "vol.ome.zarr", volume)
    predict(path, tmp_path, batch_norm_net, "--block", 64, "--no-tta", "--save-prob", "--instance-path",
            tmp_path / "objects", "--levels", 2)
    for folder in ("masks", "prob", "objects"):
        store = tmp_path / folder / "vol.ome.zarr"
        full = read_store(store)
        for level in (1, 2):
            step = 2 ** level
            assert np.array_equal(zarr.open_array(str(store / str(level)), mode="r")[:], full[:, ::step, ::step])
        node = list(Reader(parse_url(str(store)))())[0]
        assert [level.shape for level in node.data] == [(2, 140, 100), (2, 70, 50), (2, 35, 25)]
        assert node.metadata["coordinateTransformations"][2] == [{"type": "scale", "scale": [1.0, 4.0, 4.0]}]


def test_by_default_levels_are_added_until_a_slice_fits_in_one_block():
    assert stores.pyramid_levels((512, 512), 1024) == 0
    assert stores.pyramid_levels((1025, 10), 1024) == 1
    assert stores.pyramid_levels((50000, 30000), 1024) == 6


def test_a_tiff_volume_is_read_page_by_page_and_gives_the_masks_of_its_stacks(tmp_path, batch_norm_net):
    volume = smooth_volume((3, 90, 80))
    tifffile.imwrite(tmp_path / "vol.tif", volume, imagej=True, metadata={"axes": "ZYX"})
    predict(tmp_path / "vol.tif", tmp_path, batch_norm_net, "--no-tta", "--save-res-path", tmp_path / "stacks")
    predict(tmp_path / "vol.tif", tmp_path, batch_norm_net, "--no-tta", "--blockwise", "--block", 48)
    assert np.array_equal(read_store(tmp_path / "masks" / "vol.ome.zarr"),
                          tifffile.imread(tmp_path / "stacks" / "vol.tif"))


def disks_across_borders(size=300, block=100):
    """A probability map of disks, many cut by the borders of blocks of `block` pixels, some touching."""
    prob = np.zeros((size, size), np.float32)
    rng = np.random.default_rng(1)
    centres = [(b + rng.integers(-8, 9), c) for b in range(block, size, block) for c in range(20, size - 20, 45)]
    centres += [(c, b + rng.integers(-8, 9)) for b in range(block, size, block) for c in range(45, size - 20, 45)]
    centres += [(block, block), (block - 22, 2 * block), (block + 6, 2 * block)]  # a corner; two touching
    for y, x in centres:
        prob[disk((y, x), int(rng.integers(9, 14)), shape=prob.shape)] = 0.9
    return prob


def blockwise_objects(prob, slices, tmp_path, checkpoint, monkeypatch):
    """The objects store of `slices` slices predicted in blocks of 100 as if the network gave `prob`."""
    path = write_ome_zarr(tmp_path / "vol.ome.zarr", np.zeros((slices,) + prob.shape, np.uint8))
    monkeypatch.setattr(volumes, "crop_maps", lambda job, key, crop: prob[slice(*crop[0]), slice(*crop[1])])
    predict(path, tmp_path, checkpoint, "--block", 100, "--halo", 48, "--instance-path", tmp_path / "objects",
            "--objects", "watershed")
    return read_store(tmp_path / "objects" / "vol.ome.zarr")


def test_objects_cut_by_block_borders_are_merged_back_whole(tmp_path, batch_norm_net, monkeypatch):
    prob = disks_across_borders()
    objects = blockwise_objects(prob, 1, tmp_path, batch_norm_net, monkeypatch)
    blockwise = objects[0]
    whole = objects_of(prob, 0.5, "watershed")
    inter, whole_area, block_area = overlaps(blockwise, whole)
    iou = inter / (whole_area[:, None] + block_area[None, :] - inter)
    assert blockwise.dtype == np.uint32 and blockwise.max() == whole.max() == len(np.unique(blockwise)) - 1
    assert iou.max(axis=1).min() >= 0.99 and iou.max(axis=0).min() >= 0.99


def test_labels_are_unique_over_the_whole_volume(tmp_path, batch_norm_net, monkeypatch):
    prob = disks_across_borders()
    objects = blockwise_objects(prob, 2, tmp_path, batch_norm_net, monkeypatch)
    labels = objects
    per_slice = int(objects_of(prob, 0.5, "watershed").max())
    assert set(np.unique(labels[0])) & set(np.unique(labels[1])) == {0}
    assert labels.max() == 2 * per_slice


def store_files(path):
    files = {}
    for folder, _, names in os.walk(path):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                files[os.path.relpath(os.path.join(folder, name), path)] = f.read()
    return files


@stores_not_framework
def test_a_run_killed_midway_is_finished_by_the_same_command_byte_for_byte(tmp_path, batch_norm_net):
    volume = smooth_volume((6, 96, 96))
    path = write_ome_zarr(tmp_path / "vol.ome.zarr", volume)
    args = [sys.executable, os.path.join(ROOT, "predict_unet_test.py"), "--checkpoint", batch_norm_net,
            "--test-data-path", path, "--block", 48, "--no-tta", "--save-prob", "--workers", 1]
    out, whole = tmp_path / "out", tmp_path / "uninterrupted"
    command = [str(a) for a in args + ["--save-res-path", out / "masks", "--prob-path", out / "prob"]]
    run_script("predict_unet_test.py", *command[2:], cwd=tmp_path)
    os.rename(out, whole)
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = out / "masks" / "vol.ome.zarr" / ".unet" / "done"
    deadline = time.time() + 120
    while (not done.is_dir() or len(os.listdir(done)) < 5) and time.time() < deadline and run.poll() is None:
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert 0 < len(os.listdir(done)) < 24, "killed before the end"
    finished = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "done before" in finished.stdout
    for kind in ("masks", "prob"):
        assert store_files(out / kind / "vol.ome.zarr") == store_files(whole / kind / "vol.ome.zarr"), kind


def test_a_store_written_with_other_settings_is_never_written_into(tmp_path, batch_norm_net):
    volume = smooth_volume((1, 64, 64))
    path = write_ome_zarr(tmp_path / "vol.ome.zarr", volume)
    predict(path, tmp_path, batch_norm_net, "--no-tta")
    before = store_files(tmp_path / "masks" / "vol.ome.zarr")
    result = predict(path, tmp_path, batch_norm_net, "--no-tta", "--threshold", "0.7", check=False)
    assert result.returncode != 0
    assert result.stderr.strip() == (f"error: {tmp_path}/masks/vol.ome.zarr: holds a prediction with other settings "
                                     f"(threshold 0.5 there, 0.7 now); --overwrite replaces it, or give another "
                                     f"--save-res-path")
    assert store_files(tmp_path / "masks" / "vol.ome.zarr") == before
    predict(path, tmp_path, batch_norm_net, "--no-tta", "--threshold", "0.7", "--overwrite")
    settings = json.loads((tmp_path / "masks" / "vol.ome.zarr" / ".unet" / "settings.json").read_text())
    assert settings["threshold"] == 0.7


def test_a_second_prediction_into_other_mask_folders_names_the_object_store_it_shares_and_why(tmp_path, batch_norm_net):
    path = write_ome_zarr(tmp_path / "vol.ome.zarr", smooth_volume((1, 64, 64)))
    objects = tmp_path / "objects"
    predict(path, tmp_path / "first", batch_norm_net, "--no-tta", "--instance-path", objects)
    result = predict(path, tmp_path / "second", batch_norm_net, "--no-tta", "--instance-path", objects, check=False)
    assert result.returncode != 0
    assert result.stderr.strip() == (
        f"error: {objects}/vol.ome.zarr: holds a prediction with other settings (outputs.masks "
        f"{tmp_path}/first/masks/vol.ome.zarr there, {tmp_path}/second/masks/vol.ome.zarr now); --overwrite replaces "
        f"it, or give another --instance-path")
    assert not (tmp_path / "second" / "masks").exists()  # every store is checked before any is written


def test_a_folder_of_the_users_is_not_removed_even_with_overwrite(tmp_path, batch_norm_net):
    path = write_ome_zarr(tmp_path / "vol.ome.zarr", smooth_volume((1, 64, 64)))
    (tmp_path / "masks" / "vol.ome.zarr").mkdir(parents=True)
    (tmp_path / "masks" / "vol.ome.zarr" / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        result = predict(path, tmp_path, batch_norm_net, "--no-tta", *extra, check=False)
        assert result.returncode != 0 and "vol.ome.zarr" in result.stderr
    assert (tmp_path / "masks" / "vol.ome.zarr" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("damage, message", [
    ("missing chunk", "chunk 0/0/0 of 0 is missing"),
    ("corrupt chunk", "a chunk could not be read"),
    ("not zarr", "not a zarr store"),
    ("four channels", "the network takes 1"),
    ("5-d", "the network takes"),
])
def test_bad_input_stops_with_one_line_naming_the_store_and_block(tmp_path, batch_norm_net, damage, message):
    path = write_ome_zarr(tmp_path / "vol.ome.zarr", smooth_volume((1, 64, 64)))
    chunk = tmp_path / "vol.ome.zarr" / "0" / "0" / "0" / "0"
    if damage == "missing chunk":
        chunk.unlink()
    elif damage == "corrupt chunk":
        chunk.write_bytes(b"\x00garbage" * 8)
    elif damage == "not zarr":
        for name in (".zgroup", ".zattrs"):
            (tmp_path / "vol.ome.zarr" / name).unlink()
        (tmp_path / "vol.ome.zarr" / "0" / ".zarray").write_text("{not json")
    elif damage == "four channels":
        path = write_ome_zarr(tmp_path / "four.ome.zarr", smooth_volume((4, 1, 64, 64)), axes="czyx",
                              chunks=(4, 1, 64, 64))
    else:
        zarr.save_array(str(tmp_path / "vol5.zarr"), np.zeros((2, 2, 2, 32, 32), np.uint8))
        path = str(tmp_path / "vol5.zarr")
    result = predict(path, tmp_path, batch_norm_net, "--no-tta", check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr
    assert os.path.basename(path) in lines[0]
    if damage == "missing chunk":
        assert "block z0-y0-x0" in lines[0]


def edit_json(path, edit):
    values = json.loads(path.read_text())
    edit(values)
    path.write_text(json.dumps(values))


@pytest.mark.parametrize("edit, message", [
    (("0/.zarray", lambda a: a["compressor"].update(id="zstdx")), "vol.ome.zarr/0: not a readable zarr array "
                                                                  "(ValueError: codec not available: 'zstdx')"),
    ((".zattrs", lambda g: g["multiscales"][0]["datasets"][0].update(path="9")), "vol.ome.zarr: its multiscales "
                                                                                 "name level '9', which is not in "
                                                                                 "the store"),
    ((".zattrs", lambda g: g.update(multiscales="x")), "vol.ome.zarr: damaged NGFF multiscales metadata"),
    (("0/.zarray", lambda a: a.update(shape=[1, 64])), "vol.ome.zarr: 3 axes (zyx) for an array of 2 dimensions"),
])
def test_an_input_store_whose_metadata_was_edited_stops_with_one_line_naming_it(tmp_path, batch_norm_net, edit,
                                                                                message):
    path = write_ome_zarr(tmp_path / "vol.ome.zarr", smooth_volume((1, 64, 64)))
    edit_json(tmp_path / "vol.ome.zarr" / edit[0], edit[1])
    for run in (lambda: predict(path, tmp_path, batch_norm_net, "--no-tta", check=False),
                lambda: train_small(tmp_path, tmp_path / "run", "--data-path", path, "--label-path", "", check=False)):
        result = run()
        assert result.returncode != 0 and result.stderr.strip().splitlines()[-1].startswith("error: ")
        assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "masks").exists() and not list((tmp_path / "run").glob("checkpoints/*.npz"))


@stores_not_framework
def test_an_output_store_whose_array_metadata_was_edited_is_not_resumed_into(tmp_path, batch_norm_net):
    path = write_ome_zarr(tmp_path / "vol.ome.zarr", smooth_volume((1, 64, 64)))
    predict(path, tmp_path, batch_norm_net, "--no-tta")
    edit_json(tmp_path / "masks" / "vol.ome.zarr" / "0" / ".zarray", lambda a: a.update(shape=[1, 32, 32]))
    result = predict(path, tmp_path, batch_norm_net, "--no-tta", check=False)
    assert result.stderr.strip() == (f"error: {tmp_path}/masks/vol.ome.zarr: its array 0 is (1, 32, 32) of uint8, not "
                                     f"the (1, 64, 64) of uint8 this prediction writes (its metadata was changed); "
                                     f"--overwrite replaces it")
    predict(path, tmp_path, batch_norm_net, "--no-tta", "--overwrite")
    assert read_store(tmp_path / "masks" / "vol.ome.zarr").shape == (1, 64, 64)


@contextlib.contextmanager
def started_cluster(folder, env=None):
    """A real Dask cluster on 127.0.0.1: `dask scheduler` and two `dask worker` processes started in
    `folder` (not the project's) as README starts them, with the environment's own Python."""
    from distributed import Client
    dask = os.path.join(os.path.dirname(sys.executable), "dask")
    os.makedirs(folder, exist_ok=True)
    scheduler_file = os.path.join(folder, "scheduler.json")
    processes = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                   "--scheduler-file", scheduler_file], env=env, cwd=folder, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.time() + 60
        while not os.path.exists(scheduler_file) and time.time() < deadline:
            time.sleep(0.1)
        address = json.loads(open(scheduler_file).read())["address"]
        processes += [subprocess.Popen([dask, "worker", address, "--nthreads", "1", "--no-dashboard", "--name",
                                        f"worker-{i}"], env=env, cwd=folder, stderr=subprocess.DEVNULL)
                      for i in range(2)]
        with Client(address) as client:
            client.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for process in processes[::-1]:
            process.terminate()
            process.wait(timeout=30)


@pytest.fixture
def dask_cluster(tmp_path):
    with started_cluster(tmp_path / "elsewhere", env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}) \
            as address:
        yield address


@stores_not_framework
def test_a_dask_cluster_of_two_workers_gives_what_one_process_gives(tmp_path, batch_norm_net, dask_cluster):
    volume = smooth_volume((4, 100, 90))
    path = write_ome_zarr(tmp_path / "vol.ome.zarr", volume)
    extra = ["--block", 48, "--no-tta", "--save-prob", "--instance-path"]
    predict(path, tmp_path / "here", batch_norm_net, *extra, tmp_path / "here" / "objects", "--objects", "watershed")
    # Paths relative to this folder, which the workers do not run in
    result = run_script("predict_unet_test.py", "--checkpoint", os.path.relpath(batch_norm_net, tmp_path),
                        "--test-data-path", "vol.ome.zarr", "--save-res-path", "cluster/masks", "--prob-path",
                        "cluster/prob", *extra, "cluster/objects", "--objects", "watershed", "--scheduler", dask_cluster,
                        cwd=tmp_path)
    assert "dask: 2 workers" in result.stdout
    for kind in ("masks", "objects"):
        assert np.array_equal(read_store(tmp_path / "cluster" / kind / "vol.ome.zarr"),
                              read_store(tmp_path / "here" / kind / "vol.ome.zarr")), kind
    # PyTorch's last float bit can follow its thread count (Dask's workers run one thread each)
    prob = [read_store(tmp_path / where / "prob" / "vol.ome.zarr").astype(int) for where in ("cluster", "here")]
    assert np.abs(prob[0] - prob[1]).max() <= 1


def test_a_full_disk_names_the_store_and_block_and_leaves_the_block_not_done(tmp_path, batch_norm_net, monkeypatch):
    import errno
    path = write_ome_zarr(tmp_path / "vol.ome.zarr", smooth_volume((1, 64, 64)))
    write = zarr.storage.DirectoryStore.__setitem__

    def full_disk(store, key, value):
        if key.endswith("0/0/1") and "prob" in store.path:  # the second block's probability chunk
            raise OSError(errno.ENOSPC, "No space left on device")
        write(store, key, value)
    monkeypatch.setattr(zarr.storage.DirectoryStore, "__setitem__", full_disk)
    result = predict(path, tmp_path, batch_norm_net, "--no-tta", "--block", 32, "--save-prob", check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and "No space left on device" in lines[0]
    assert "prob/vol.ome.zarr" in lines[0] and "block z0-y0-x32" in lines[0]
    assert sorted(os.listdir(tmp_path / "masks" / "vol.ome.zarr" / ".unet" / "done")) == ["z0-y0-x0"]
    monkeypatch.setattr(zarr.storage.DirectoryStore, "__setitem__", write)
    assert "1 done before" in predict(path, tmp_path, batch_norm_net, "--no-tta", "--block", 32, "--save-prob").stdout


# ---- training from stores ---------------------------------------------------------------------

def write_labelled_store(path, images, labels):
    """An OME-Zarr image with its labels in its NGFF labels/ group, as napari and ome-zarr-py write them."""
    write_ome_zarr(path, images)
    zarr.open_group(str(path)).require_group("labels").attrs["labels"] = ["cells"]
    write_ome_zarr(path / "labels" / "cells", labels)
    zarr.open_group(str(path / "labels" / "cells")).attrs["image-label"] = {"version": "0.4"}
    return str(path)


def folder_as_store(data, path):
    """The slices of a folder dataset (train_image/, train_label/) as one labelled OME-Zarr volume."""
    names = sorted(os.listdir(f"{data}/train_image"))
    read = lambda folder: np.stack(  # noqa: E731
        [cv2.imread(f"{data}/{folder}/{n}", cv2.IMREAD_UNCHANGED) for n in names])
    return write_labelled_store(path, read("train_image"), read("train_label"))


def test_training_on_an_ome_zarr_volume_equals_training_on_its_slices_as_files(dataset, tmp_path):
    store = folder_as_store(dataset, tmp_path / "train.ome.zarr")
    train_small(dataset, tmp_path / "files", "--weight-map")
    train_small(dataset, tmp_path / "store", "--weight-map", "--data-path", store, "--label-path", "")
    from_files, from_store = (load_checkpoint(str(tmp_path / run / "checkpoints" / "last.npz"))
                              for run in ("files", "store"))
    assert from_store[0]["config"]["data_format"] == "zarr"
    assert from_store[0]["data"]["input_levels"] == from_files[0]["data"]["input_levels"]
    assert len(from_files[1]) == len(from_store[1]) > 20  # every layer's weights
    for name, weights in from_files[1].items():
        assert np.allclose(from_store[1][name], weights, atol=1e-6), name


@stores_not_framework
def test_a_store_is_read_window_by_window_never_whole(tmp_path, monkeypatch):
    from biounet.data import datasets
    images, labels = smooth_volume((2, 150, 130)), np.zeros((2, 150, 130), np.uint8)
    labels[:, 40:110, 30:100] = 255
    store = write_labelled_store(tmp_path / "big.ome.zarr", images, labels)
    monkeypatch.setattr(datasets, "STORE_WINDOW", 64)  # 3 x 3 windows a slice
    reads = []
    read = volumes.Volume.read
    monkeypatch.setattr(volumes.Volume, "read", lambda self, z, rows, cols, *more: reads.append(
        (rows.stop - rows.start) * (cols.stop - cols.start)) or read(self, z, rows, cols, *more))
    result = train_small(tmp_path, tmp_path / "run", "--data-path", store, "--label-path", "", "--weight-map",
                         "--val-fraction", 0.2, "--epochs", 1)
    assert "data: 14 training pairs" in result.stdout and "4 for validation" in result.stdout
    assert reads and max(reads) <= 50 * 44


def test_lazy_arrays_keep_no_more_than_their_budget():
    from biounet.data.loader import LazyArrays, lazy_map
    computed = []
    arrays = LazyArrays(lambda i: computed.append(i) or np.full((10, 10), i, np.float32), 8, budget=1000)
    doubled = lazy_map(lambda a: 2 * a, arrays)
    assert [float(a[0, 0]) for a in doubled] == [2.0 * i for i in range(8)]
    assert arrays.kept_bytes <= 1000 and len(arrays.kept) == 2 and computed == list(range(8))
    assert float(arrays.subset([5, 1])[1][0, 0]) == 1.0


@stores_not_framework
@pytest.mark.parametrize("damage, message", [
    ("labels 7", "train.ome.zarr/labels/cells: label is not binary: values 0, 7"),
    ("no labels", "train.ome.zarr: no labels: give LABEL_PATH"),
    ("other shape", "labels of shape (2, 40, 40), the image"),
])
def test_bad_training_stores_stop_with_one_line_naming_the_store(tmp_path, damage, message):
    labels = np.zeros((2, 48, 48), np.uint8)
    labels[:, 10:30, 10:30] = 7 if damage == "labels 7" else 255
    store = write_labelled_store(tmp_path / "train.ome.zarr", smooth_volume((2, 48, 48)), labels)
    if damage == "no labels":
        shutil.rmtree(tmp_path / "train.ome.zarr" / "labels")
    if damage == "other shape":
        write_ome_zarr(tmp_path / "train.ome.zarr" / "labels" / "cells", labels[:, :40, :40])
    result = train_small(tmp_path, tmp_path / "run", "--data-path", store, "--label-path", "", check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@stores_not_framework
def test_a_dask_cluster_without_the_package_installed_is_named_in_one_line(tmp_path, batch_norm_net):
    hidden = tmp_path / "hidden" / "biounet"  # stands before the environment's own: as if it lacked the package
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'biounet'\", name='biounet')\n")
    path = write_ome_zarr(tmp_path / "vol.ome.zarr", smooth_volume((1, 64, 64)))
    with started_cluster(tmp_path / "elsewhere", env=dict(os.environ, PYTHONPATH=str(hidden.parent))) as address:
        result = run_script("predict_unet_test.py", "--checkpoint", batch_norm_net, "--test-data-path", path,
                            "--save-res-path", tmp_path / "masks", "--no-tta", "--scheduler", address, cwd=tmp_path,
                            check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: the Dask cluster at {address} cannot import biounet: install it where the scheduler and the "
        f"workers run (pip install 'biounet[dask]', or pip install -e on the project), then run the same command"]
