"""Volumes and slides larger than memory: read lazily from OME-Zarr, zarr or TIFF, predicted block by
block into OME-Zarr stores, in this process or on a Dask cluster, resumable.

    python predict_unet_test.py --test-data-path volume.ome.zarr      # -> predict_image/volume.ome.zarr
    python predict_unet_test.py --test-data-path slide.tif --blockwise --workers 2
    python predict_unet_test.py --test-data-path volume.ome.zarr --scheduler tcp://HOST:8786

The network is 2D: every z slice is cut into blocks of --block pixels, each read with a halo of
--halo pixels around it (more than the network's reach) widened to the slice's pooling grid, so a
block's pixels get what the whole slice predicted at once would give them. Outputs are NGFF 0.4
stores (zarr format 2) chunked like the blocks, so each chunk is written once, by its block's task,
with downsampled levels for viewing written once level 0 is whole.

A block is done once its chunks are written (a marker in the mask store's .unet/done/): the same
command after a crash finishes the rest, and a store written with other settings is left alone.
Objects are found in each block's halo'd crop; those cut by a block border are merged where the
neighbours' crops overlap, then numbered over the whole volume.
"""
import json
import os
import shutil
import sys
from concurrent.futures import CancelledError
from functools import partial

import numpy as np

from biounet.core.files import DataError, atomic_write
from biounet.core.processes import WorkersDied
from biounet.data.loader import match_channels
from biounet.data.volumes import Volume, slice_sample, volume_name
from biounet.evaluation.instances import foreground, in_diameters, mask_of, objects_of
from biounet.model import backend
from biounet.model.checkpoint import CheckpointError, build_model, input_mapping, map_input, predicted_classes
from biounet.model.meta import TrainingData
from biounet.prediction.inference import predict_sample, probability_values
from biounet.prediction.segment import PredictionSettings, object_method_for, seeds_for
from biounet.prediction.stores import (objects_dir, open_store, prepare_stores, progress_dir, pyramid_levels, read_json,
                                       write_file, write_region)

ALIGN = 16  # the U-Net's four 2x2 poolings: a crop on this grid pools as the whole slice does
HALO = 128  # more than the network's reach (unet.VALID_MARGIN = 92 pixels, plus a pooling cell), on the grid


# ---- inputs, read lazily --------------------------------------------------------------------


# ---- the blocks -----------------------------------------------------------------------------

def crop_range(start, end, length, halo):
    """What to read for [start, end) of an axis of `length`: `halo` more each side, widened to the
    pooling grid of the whole axis seen from either end (the flipped views of --tta see it from the end)."""
    low = max(0, (start - halo) // ALIGN * ALIGN)
    high = min(length, length - (length - end - halo) // ALIGN * ALIGN)
    return low, high


def block_grid(shape, block):
    """The (z, y, x) corners of the blocks of a (slices, height, width) volume."""
    slices, height, width = shape
    return [(z, y, x) for z in range(slices) for y in range(0, height, block) for x in range(0, width, block)]


def block_name(key):
    return f"z{key[0]}-y{key[1]}-x{key[2]}"


def block_extent(job, key):
    """((y0, y1), (x0, x1)) of a block, and of the crop read for it."""
    _, height, width = job["shape"]
    z, y, x = key
    core = ((y, min(y + job["block"], height)), (x, min(x + job["block"], width)))
    crop = (crop_range(*core[0], height, job["halo"]), crop_range(*core[1], width, job["halo"]))
    return core, crop


def _region(job, key, core):
    (y0, y1), (x0, x1) = core
    return (key[0], slice(y0, y1), slice(x0, x1)) if job["has_z"] else (slice(y0, y1), slice(x0, x1))


# ---- what each worker process holds ---------------------------------------------------------

_held = {}


def _model(job):
    """The network (loaded once per process) and its metadata."""
    device = job["device"]
    if device.startswith("cuda") and ":" not in device and job.get("gpus", 0) > 1:
        device = f"cuda:{_worker_number() % job['gpus']}"  # --workers N with CUDA: one worker per GPU
    if ("model", job["checkpoint"], device) not in _held:
        if job.get("threads"):
            backend.set_threads(job["threads"])
        _held[("model", job["checkpoint"], device)] = build_model(job["checkpoint"], device) + (device,)
    return _held[("model", job["checkpoint"], device)]


def _worker_number():
    from distributed import get_worker
    try:
        return int(get_worker().name)
    except (ValueError, TypeError):
        return 0


def _volume(path):
    if ("volume", path) not in _held:
        _held[("volume", path)] = Volume(path)
    return _held[("volume", path)]


# ---- one block ------------------------------------------------------------------------------

def predict_block(job, key):
    """Predict block `key`, write its chunks into every output store, then mark it done; returns its counts."""
    core, crop = block_extent(job, key)
    (cy0, _), (cx0, _) = crop
    name = block_name(key)
    maps = crop_maps(job, key, crop)
    inside = (slice(core[0][0] - cy0, core[0][1] - cy0), slice(core[1][0] - cx0, core[1][1] - cx0))
    prob = foreground(maps) if job["object_network"] else maps
    if prob.ndim == 3:
        mask = prob.argmax(axis=2)
    else:
        mask = np.where(mask_of(prob, job["threshold"], job["seeds"]), 255, 0)
    mask, region = mask[inside].astype(np.uint8), _region(job, key, core)
    counts = dict(pixels=int(mask.size), cell=int(np.count_nonzero(mask)), objects=0)
    write_region(job["stores"]["masks"], region, mask, name)
    if job["stores"].get("prob"):
        write_region(job["stores"]["prob"], region, probability_values(prob[inside], job["prob_bits"]), name)
    if job["stores"].get("instances"):
        crop_objects, counts["objects"] = _block_objects(job, maps, inside)
        write_region(objects_dir(job), region, crop_objects[inside], name, array="local")
        write_file(os.path.join(objects_dir(job), name + ".npy"), lambda f: np.save(f, crop_objects), name)
    write_file(os.path.join(progress_dir(job, "done"), name), lambda f: f.write(json.dumps(counts).encode()), name)
    return counts


def crop_maps(job, key, crop):
    """The network's probabilities (H x W, or H x W x N) of the crop read for block `key`."""
    model, meta, device = _model(job)
    (cy0, cy1), (cx0, cx1) = crop
    raw = _volume(job["volume"]).read(key[0], slice(cy0, cy1), slice(cx0, cx1), block_name(key))
    with backend.autocast(device, job["amp"]):
        return predict_sample(model, meta, map_input(raw, job["mappings"][key[0]]), device=device, tile=0,
                              tta=job["tta"], source=f"{job['volume']} {block_name(key)}")


def _block_objects(job, maps, inside):
    """(numbered objects of a block's crop, their count): those in the block 1..n, the rest of the crop 0."""
    settings = job["objects"]
    crop = objects_of(maps, job["threshold"], settings["method"], min_size=settings["min_size"],
                      min_distance=settings["min_distance"], seeds=job["seeds"])
    kept = np.unique(crop[inside])
    kept = kept[kept > 0]
    numbers = np.zeros(int(crop.max()) + 1, np.uint16)
    numbers[kept] = np.arange(1, len(kept) + 1)
    return numbers[crop], len(kept)


# ---- objects across block borders -----------------------------------------------------------

NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def block_pairs(job, key):
    """[(key, number, other key, its number)]: the objects of block `key` that are objects of a
    neighbouring block, seen where the block's crop overlaps the neighbour's pixels. Two are one
    where they share more than half of the smaller one's pixels there (an object cut by the border
    is whole in both crops; two touching objects share at most their outlines)."""
    _, ((cy0, cy1), (cx0, cx1)) = block_extent(job, key)
    crop_objects = np.load(os.path.join(objects_dir(job), block_name(key) + ".npy"))
    pairs = []
    for dy, dx in NEIGHBOURS:
        other = (key[0], key[1] + dy * job["block"], key[2] + dx * job["block"])
        if not (0 <= other[1] < job["shape"][1] and 0 <= other[2] < job["shape"][2]):
            continue
        (oy0, oy1), (ox0, ox1) = block_extent(job, other)[0]
        y0, y1, x0, x1 = max(oy0, cy0), min(oy1, cy1), max(ox0, cx0), min(ox1, cx1)
        if y0 >= y1 or x0 >= x1:
            continue
        mine = crop_objects[y0 - cy0:y1 - cy0, x0 - cx0:x1 - cx0].astype(np.int64)
        theirs = open_store(objects_dir(job), "local")[_region(job, other, ((y0, y1), (x0, x1)))].astype(np.int64)
        both = (mine > 0) & (theirs > 0)
        shared, count = np.unique(mine[both] * 65536 + theirs[both], return_counts=True)
        mine_area, theirs_area = np.bincount(mine.ravel()), np.bincount(theirs.ravel())
        for code, n in zip(shared.tolist(), count.tolist()):
            a, b = divmod(code, 65536)
            if n > 0.5 * min(mine_area[a], theirs_area[b]):
                pairs.append((key, a, other, b))
    return pairs


def object_numbers(keys, counts, pairs):
    """{block key: array from its numbers 0..n to the volume's}: objects merged across borders share
    a number; objects numbered 1..N in block order."""
    offsets = dict(zip(keys, np.cumsum([0] + [counts[k] for k in keys])[:-1].tolist()))
    parent = list(range(sum(counts.values()) + 1))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    for key, a, other, b in pairs:
        first, second = sorted((root(offsets[key] + a), root(offsets[other] + b)))
        parent[second] = first
    numbers, final = {}, {}
    for key in keys:
        lut = np.zeros(counts[key] + 1, np.uint32)
        for a in range(1, counts[key] + 1):
            lut[a] = final.setdefault(root(offsets[key] + a), len(final) + 1)
        numbers[key] = lut
    return numbers


def relabel_block(job, key, numbers):
    """Write block `key`'s objects, numbered over the volume, into the objects store."""
    name, region = block_name(key), _region(job, key, block_extent(job, key)[0])
    write_region(job["stores"]["instances"], region, numbers[open_store(objects_dir(job), "local")[region]], name)
    write_file(os.path.join(progress_dir(job, "numbered"), name), lambda f: f.write(b"{}"), name)
    return key


def number_objects(job, client, keys, counts):
    """Number the objects over the volume (merged across block borders) and write them."""
    todo = [k for k in keys if not os.path.exists(os.path.join(progress_dir(job, "numbered"), block_name(k)))]
    if todo:
        pairs = run_tasks(client, partial(block_pairs, job), keys, "objects across borders")
        numbers = object_numbers(keys, counts, [pair for found in pairs for pair in found])
        run_tasks(client, partial(relabel_block, job), todo, "numbering objects", [numbers[k] for k in todo])
        atomic_write(os.path.join(progress_dir(job, "numbered"), "objects"),
                     lambda f: f.write(str(max(int(n.max()) for n in numbers.values())).encode()))
        shutil.rmtree(objects_dir(job), ignore_errors=True)
    with open(os.path.join(progress_dir(job, "numbered"), "objects")) as f:
        return int(f.read())


# ---- output stores --------------------------------------------------------------------------


def write_levels(job):
    """The downsampled levels of every output store (every other pixel of the level before: masks and
    labels keep their values), written chunk by chunk after level 0 is whole."""
    if not job["levels"] or os.path.exists(os.path.join(progress_dir(job, "numbered"), "levels")):
        return
    from tqdm import tqdm
    for path in job["stores"].values():
        for level in tqdm(range(1, job["levels"] + 1), desc=f"levels of {os.path.basename(path)}", unit="level",
                          file=sys.stderr, disable=None, leave=False):
            source, target = open_store(path, str(level - 1)), open_store(path, str(level))
            chunk = target.chunks[-1]
            for z in range(job["shape"][0]) if job["has_z"] else [None]:
                for y in range(0, target.shape[-2], chunk):
                    for x in range(0, target.shape[-1], chunk):
                        rows, cols = slice(y, y + chunk), slice(x, x + chunk)
                        wide = (slice(2 * y, 2 * (y + chunk), 2), slice(2 * x, 2 * (x + chunk), 2))
                        where, read = ((z, rows, cols), (z,) + wide) if job["has_z"] else ((rows, cols), wide)
                        write_region(path, where, source[read], f"level {level} y{y}-x{x}", array=str(level))
    os.makedirs(progress_dir(job, "numbered"), exist_ok=True)
    atomic_write(os.path.join(progress_dir(job, "numbered"), "levels"), lambda f: f.write(b"{}"))


# ---- the run --------------------------------------------------------------------------------

def slice_mappings(volume, meta):
    """Per slice, how its raw values are normalized for the network (checkpoint.input_mapping): from
    the whole slice up to SAMPLE_PIXELS pixels, from every n-th row and column of a larger one; a
    network that divides integers by their type's range needs no look at the slices at all."""
    probe = np.zeros((1, 1) + ((volume.channels,) if volume.channels > 1 else ()), volume.dtype)
    mapping = input_mapping(meta, probe, volume.path)
    if TrainingData.of(meta).normalize == "range" and mapping[1] is None and volume.dtype.kind in "ui":
        return [mapping] * volume.shape[0]
    return [input_mapping(meta, slice_sample(volume, z), f"{volume.path} slice {z}") for z in range(volume.shape[0])]


def check_blockwise(volume, meta, checkpoint, halo):
    """Stop in one line unless the network can predict the volume block by block with this halo."""
    data = TrainingData.of(meta)
    if data.img_size or data.object_size:
        raise CheckpointError(f"{checkpoint}: trained on images " + (
            f"resized to {data.img_size} pixels" if data.img_size else "rescaled for their objects' size "
            "(--object-size)") + "; blocks are predicted at the volume's own scale: train with --no-object-size "
            "and without --img-size for volumes")
    if halo % ALIGN:
        raise ValueError(f"--halo must be a multiple of {ALIGN} (the network's pooling grid), not {halo}")
    match_channels(np.zeros((2, 2, volume.channels), volume.dtype).squeeze(axis=2) if volume.channels == 1
                   else np.zeros((2, 2, volume.channels), volume.dtype), meta["model"]["n_channels"], volume.path)


def object_settings(meta, settings, *, checkpoint, diameter):
    """How a block's objects are found: the method and the sizes in pixels."""
    min_size, min_distance = in_diameters(diameter, settings.min_size, settings.min_distance)
    return dict(method=object_method_for(meta, settings.objects, checkpoint), min_size=min_size,
                min_distance=min_distance)


def predict_volume(path, checkpoint, outputs, *, settings=PredictionSettings(), block=1024, halo=HALO, workers=0,
                   scheduler=None, overwrite=False, meta=None, levels=None, progress=None):
    """Predict the volume (or slide) at `path` block by block, as `settings` say, into OME-Zarr stores
    named after it in the folders of `outputs` (masks, prob with prob_bits, instances), over `workers`
    local processes (0: backend.default_workers) or the Dask cluster at `scheduler`. `meta`: the
    checkpoint's, where the caller has loaded it; `levels`: downsampled levels (None: as many as
    bring a slice within one block); `progress(done, total)` is called after each block (an
    exception it raises stops the run there: the blocks done are kept). Returns the stores' paths."""
    volume = Volume(path)
    meta = meta or build_model(checkpoint, "cpu")[1]  # a damaged checkpoint stops here, before any worker starts
    check_blockwise(volume, meta, checkpoint, halo)
    data, classes = TrainingData.of(meta), predicted_classes(meta)
    diameter = settings.object_size if isinstance(settings.object_size, (int, float)) else None
    name = volume_name(path) + ".ome.zarr"
    stores = dict(masks=os.path.join(outputs["masks"], name))
    if outputs.get("prob") and classes == 1:
        stores["prob"] = os.path.join(outputs["prob"], name)
    if outputs.get("instances") and classes == 1:
        stores["instances"] = os.path.join(outputs["instances"], name)
    # Absolute paths: a Dask cluster's workers may run in another folder than this process.
    checkpoint = tuple(map(os.path.abspath, checkpoint)) if isinstance(checkpoint, tuple) else os.path.abspath(checkpoint)
    job = dict(volume=os.path.abspath(path), checkpoint=checkpoint, device=settings.device,
               amp=settings.amp, tta=settings.tta, threshold=settings.threshold,
               seeds=seeds_for(meta, settings), block=block, halo=halo, shape=volume.shape,
               levels=pyramid_levels(volume.shape[1:], block) if levels is None else levels, has_z=volume.has_z,
               stores={kind: os.path.abspath(store) for kind, store in stores.items()},
               prob_bits=outputs.get("prob_bits", 16) if "prob" in stores else None, object_network=data.instances,
               gpus=backend.flow.cuda.device_count() if settings.device.startswith("cuda") else 0,
               objects=object_settings(meta, settings, checkpoint=checkpoint, diameter=diameter)
               if "instances" in stores else None)
    prepare_stores(job, volume, overwrite)
    keys = block_grid(volume.shape, block)
    todo = [k for k in keys if not os.path.exists(os.path.join(progress_dir(job, "done"), block_name(k)))]
    print(f"{path}: {' x '.join(map(str, volume.shape))} (slices x height x width, {volume.dtype}), {len(keys)} "
          f"blocks of {block} pixels with a halo of {halo}" + (f", {len(keys) - len(todo)} done before" if
                                                               len(todo) < len(keys) else ""))
    client = dask_client(workers or backend.default_workers(len(todo)), scheduler, job) if todo or \
        "instances" in stores else None
    try:
        if todo:
            job["mappings"] = slice_mappings(volume, meta)
            run_tasks(client, partial(predict_block, job), todo, "blocks", progress=progress)
        counts = {k: read_json(os.path.join(progress_dir(job, "done"), block_name(k))) for k in keys}
        objects = number_objects(job, client, keys, {k: c["objects"] for k, c in counts.items()}) \
            if "instances" in stores else None
        write_levels(job)
    finally:
        if client is not None:
            client.close()
        _held.clear()  # the network and open stores are not kept after the run
    cell = sum(c["cell"] for c in counts.values()) / max(1, sum(c["pixels"] for c in counts.values()))
    notes = dict(masks=f"cell {cell:.1%}" if classes == 1 else f"{classes} classes", prob=f"{job['prob_bits']}-bit",
                 instances=f"{objects} objects")
    for kind, store in stores.items():
        print(f"{path} -> {store} ({kind}: {notes[kind]}" + (f"; {job['levels']} downsampled levels" if job["levels"]
                                                              else "") + ")")
    return list(stores.values())


# ---- Dask -----------------------------------------------------------------------------------

def dask_client(workers, scheduler, job):
    """None (this process computes) for one local worker; else a client of a local Dask cluster of
    `workers` processes, or of the cluster at `scheduler`."""
    if not scheduler and workers <= 1:
        return None
    import logging

    import dask
    from distributed import Client

    # Dask's profiler samples each worker's stack every 10 ms, its monitors wake every 20-500 ms: on
    # 2 cores they cost OneFlow's blocks 15% (measured), so they look less often here
    dask.config.set({"distributed.worker.profile.enabled": False, "distributed.admin.tick.interval": "1s",
                     "distributed.admin.system-monitor.interval": "5s",
                     "distributed.worker.memory.monitor-interval": "1s"})
    if scheduler:
        # The client logs its reconnection attempts as tracebacks; a lost cluster is said in one line (run_tasks).
        for name in [name for name in logging.root.manager.loggerDict if name.startswith("distributed")]:
            logging.getLogger(name).setLevel(logging.CRITICAL)
        try:
            client = Client(scheduler, timeout="10s")
        except (OSError, TimeoutError) as err:
            raise DataError(f"--scheduler {scheduler}: no Dask scheduler answers there ({err})") from None
    else:
        backend.before_processes_share_the_cores()
        job["threads"] = max(1, backend.cores() // workers)
        client = Client(n_workers=workers, threads_per_worker=1, processes=True, silence_logs=logging.CRITICAL,
                        dashboard_address=":0")
    print(f"dask: {len(client.scheduler_info()['workers'])} workers at {client.scheduler.address}, "
          f"dashboard {client.dashboard_link}")
    return client


def run_tasks(client, function, keys, what, *more, progress=None):
    """[function(key, *more ...)] for every key, here or on the cluster, with a progress bar (and
    `progress(done, total)` after each)."""
    from tqdm import tqdm
    results = []
    with tqdm(total=len(keys), desc=what, unit="block", file=sys.stderr, disable=None, leave=False) as bar:
        if client is None:
            for args in zip(keys, *more):
                results.append(function(*args))
                bar.update()
                if progress:
                    progress(len(results), len(keys))
            return results
        from distributed import KilledWorker, as_completed
        futures = client.map(function, keys, *more, pure=False)
        try:
            for future in as_completed(futures):
                results.append(future.result())
                bar.update()
                if progress:
                    progress(len(results), len(keys))
        except (ModuleNotFoundError, RuntimeError) as err:
            # Workers without the package fail to import it; a scheduler without it cannot read the task graph.
            if not isinstance(err, ModuleNotFoundError) and "deserializ" not in str(err):
                raise
            raise DataError(f"the Dask cluster at {client.scheduler.address} cannot import biounet: install it where "
                            f"the scheduler and the workers run (pip install 'biounet[dask]', or pip install -e on "
                            f"the project), then run the same command") from None
        except CancelledError as err:  # the scheduler lost (killed, its machine gone): Dask cancels every task
            raise WorkersDied(f"the Dask cluster at {client.scheduler.address} stopped answering "
                              f"({str(err).splitlines()[0]}): the {what} done are kept, and the same command goes on "
                              f"with the rest") from None
        except KilledWorker as err:  # Dask gives a dead worker's task to another, up to allowed-failures times
            key = dict(zip((future.key for future in futures), keys)).get(err.task, err.task)
            raise WorkersDied(f"Dask workers kept dying on the {what} (the last try was {key}'s; out of memory?): "
                              f"the {what} done are kept, and the same command goes on with the rest") from None
        finally:
            client.cancel(futures)
    return results
