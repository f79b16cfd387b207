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
import glob
import hashlib
import json
import math
import os
import shutil
import sys
from concurrent.futures import CancelledError
from functools import partial

import numpy as np
import tifffile
import zarr

import backend
from checkpoint import CheckpointError, build_model, input_mapping, map_input, predicted_classes
from dataloader import match_channels
from files import DataError, atomic_write, is_zarr  # noqa: F401 (is_zarr: predict_unet_test.py's)
from inference import predict_sample, probability_values
from instances import foreground, objects_of
from processes import WorkersDied

ALIGN = 16  # the U-Net's four 2x2 poolings: a crop on this grid pools as the whole slice does
HALO = 128  # more than the network's reach (unet.VALID_MARGIN = 92 pixels, plus a pooling cell), on the grid
SAMPLE_PIXELS = 16 * 2 ** 20  # normalization statistics of a slice from at most this many of its pixels
TIFF_AXES = {"Z": "z", "I": "z", "Q": "z", "T": "t", "C": "c", "S": "c", "Y": "y", "X": "x"}
ZARR_SUFFIXES = (".ome.zarr", ".zarr")
OUTPUT_FLAGS = dict(masks="--save-res-path", prob="--prob-path", instances="--instance-path")  # where each store goes


# ---- inputs, read lazily --------------------------------------------------------------------

def volume_name(path):
    """The outputs' name: vol for vol.ome.zarr, vol.zarr, vol.tif, vol.ome.tif."""
    name = os.path.basename(path.rstrip("/"))
    for suffix in ZARR_SUFFIXES + (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return name


class Volume:
    """An image store opened for reading: `shape` (slices, height, width), `channels`, `dtype`,
    `read(z, rows, cols)` the raw H x W (x C) values of a region of slice z; nothing read before."""

    def __init__(self, path):
        self.path = path
        self.array, axes, self.scale = _open_tiff(path) if os.path.isfile(path) else _open_zarr(path)
        self.axes = "".join(axes)
        if len(self.axes) != self.array.ndim:
            raise DataError(f"{path}: {len(self.axes)} axes ({self.axes}) for an array of {self.array.ndim} "
                            f"dimensions {self.array.shape}")
        sizes = dict(zip(self.axes, self.array.shape))
        if sorted(self.axes) not in (sorted(a) for a in ("yx", "zyx", "cyx", "czyx", "tyx", "tzyx", "tcyx", "tczyx")) \
                or sizes.get("t", 1) != 1:
            raise DataError(f"{path}: axes {self.axes} of shape {self.array.shape}: the network takes yx, zyx, cyx "
                            f"or czyx images (t of length 1)")
        self.has_z = "z" in sizes
        self.shape = (sizes.get("z", 1), sizes["y"], sizes["x"])
        self.channels = sizes.get("c", 1)
        self.dtype = self.array.dtype

    def read(self, z, rows, cols, block=None):
        index = tuple({"t": 0, "z": z, "c": slice(None), "y": rows, "x": cols}[a] for a in self.axes)
        where = f"block {block}" if block else f"slice {z}"
        self._check_chunks(index, where)
        try:
            values = np.asarray(self.array[index])
        except Exception as err:  # numcodecs and tifffile raise many kinds for a damaged chunk
            raise DataError(f"{self.path}: {where}: a chunk could not be read ({type(err).__name__}: {err})") from None
        kept = [a for a in self.axes if a in "cyx"]
        values = values.transpose([kept.index(a) for a in "yxc" if a in kept])
        return values[..., 0] if values.ndim == 3 and values.shape[2] == 1 else values

    def _check_chunks(self, index, where):
        """zarr reads a missing chunk as zeros: in an input store that is damage, not data."""
        store = self.array.chunk_store or self.array.store
        if not isinstance(store, zarr.storage.DirectoryStore):
            return
        ranges = []
        for i, chunk, length in zip(index, self.array.chunks, self.array.shape):
            if isinstance(i, slice):
                start, stop, _ = i.indices(length)
                ranges.append(range(start // chunk, max(start, stop - 1) // chunk + 1))
            else:
                ranges.append(range(i // chunk, i // chunk + 1))
        separator = getattr(self.array, "_dimension_separator", None) or "."
        for chunk in np.ndindex(*[len(r) for r in ranges]):
            key = separator.join(str(r[c]) for r, c in zip(ranges, chunk))
            if not os.path.exists(os.path.join(store.path, self.array.path, key)):
                raise DataError(f"{self.path}: {where}: chunk {key} of {self.array.path or 'the array'} is missing")


def _open_zarr(path):
    """(array, axes, scale) of level 0 of an OME-Zarr image, or of a plain zarr array (axes by its dimensions)."""
    if os.path.exists(os.path.join(path, "zarr.json")):
        raise DataError(f"{path}: a zarr format 3 store (OME-Zarr 0.5): zarr-python 2 (this environment: "
                        f"Python 3.10 for OneFlow) reads format 2 only (NGFF 0.4)")
    try:
        node = zarr.open(zarr.storage.DirectoryStore(path), mode="r")
    except Exception as err:
        raise DataError(f"{path}: not a zarr store ({type(err).__name__}: {err})") from None
    if isinstance(node, zarr.Array):
        axes = {2: "yx", 3: "zyx", 4: "czyx"}.get(node.ndim)
        if axes is None:
            raise DataError(f"{path}: a zarr array of {node.ndim} dimensions {node.shape}: the network takes "
                            f"yx, zyx or czyx")
        return node, axes, None
    multiscales = node.attrs.get("multiscales")
    if not multiscales:
        arrays = list(node.array_keys())
        raise DataError(f"{path}: a zarr group without NGFF multiscales metadata"
                        + (f"; give one of its arrays: {os.path.join(path, arrays[0])}" if arrays else ""))
    try:  # metadata edited by hand or written by another tool may take any shape
        level = multiscales[0]["datasets"][0]
        name, axes = str(level["path"]), multiscales[0].get("axes")
        axes = None if axes is None else [str(a["name"] if isinstance(a, dict) else a).lower() for a in axes]
        scale = next((t["scale"] for t in level.get("coordinateTransformations", []) if t.get("type") == "scale"), None)
    except Exception as err:
        raise DataError(f"{path}: damaged NGFF multiscales metadata ({type(err).__name__}: {err})") from None
    if name not in node:
        raise DataError(f"{path}: its multiscales name level {name!r}, which is not in the store")
    try:
        array = node[name]
    except Exception as err:  # an unknown codec, a damaged .zarray
        raise DataError(f"{path}/{name}: not a readable zarr array ({type(err).__name__}: {err})") from None
    return array, axes or list("tczyx"[-array.ndim:]), scale


def _open_tiff(path):
    """(array, axes, None) of a TIFF's first series through tifffile's zarr interface (pages read when asked)."""
    try:
        with tifffile.TiffFile(path) as tif:
            axes = tif.series[0].axes
        array = zarr.open(tifffile.imread(path, aszarr=True, series=0, level=0), mode="r")
    except Exception as err:
        raise DataError(f"{path}: not a readable TIFF ({type(err).__name__}: {err})") from None
    unknown = [a for a in axes if a not in TIFF_AXES]
    if unknown:
        raise DataError(f"{path}: TIFF axes {axes}: {''.join(unknown)} is none of the network's (z, c, y, x)")
    return array, [TIFF_AXES[a] for a in axes], None


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
    mask = prob.argmax(axis=2) if prob.ndim == 3 else np.where(prob > job["threshold"], 255, 0)
    mask, region = mask[inside].astype(np.uint8), _region(job, key, core)
    counts = dict(pixels=int(mask.size), cell=int(np.count_nonzero(mask)), objects=0)
    _write_region(job["stores"]["masks"], region, mask, name)
    if job["stores"].get("prob"):
        _write_region(job["stores"]["prob"], region, probability_values(prob[inside], job["prob_bits"]), name)
    if job["stores"].get("instances"):
        crop_objects, counts["objects"] = _block_objects(job, maps, inside)
        _write_region(_objects_dir(job), region, crop_objects[inside], name, array="local")
        _write_file(os.path.join(_objects_dir(job), name + ".npy"), lambda f: np.save(f, crop_objects), name)
    _write_file(os.path.join(_progress_dir(job, "done"), name), lambda f: f.write(json.dumps(counts).encode()), name)
    return counts


def crop_maps(job, key, crop):
    """The network's probabilities (H x W, or H x W x N) of the crop read for block `key`."""
    model, meta, device = _model(job)
    (cy0, cy1), (cx0, cx1) = crop
    raw = _volume(job["volume"]).read(key[0], slice(cy0, cy1), slice(cx0, cx1), block_name(key))
    with backend.autocast(device, job["amp"]):
        return predict_sample(model, meta, map_input(raw, job["mappings"][key[0]]), device, 0, 0, job["tta"],
                              f"{job['volume']} {block_name(key)}")


def _block_objects(job, maps, inside):
    """(numbered objects of a block's crop, their count): those in the block 1..n, the rest of the crop 0."""
    settings = job["objects"]
    crop = objects_of(maps, job["threshold"], settings["method"], settings["min_size"], settings["min_distance"])
    kept = np.unique(crop[inside])
    kept = kept[kept > 0]
    numbers = np.zeros(int(crop.max()) + 1, np.uint16)
    numbers[kept] = np.arange(1, len(kept) + 1)
    return numbers[crop], len(kept)


def _write_region(path, region, values, name, array="0"):
    try:
        _store(path, array)[region] = values
    except OSError as err:  # a full disk ...
        raise DataError(f"{path}: block {name} could not be written ({err.strerror or err}); it is not done, "
                        f"the next run predicts it again") from None


def _write_file(path, write, name):
    try:
        atomic_write(path, write)
    except OSError as err:
        raise DataError(f"{err}; block {name} is not done, the next run predicts it again") from None


def _store(path, array="0"):
    if ("store", path, array) not in _held:
        _held[("store", path, array)] = zarr.open_array(zarr.storage.DirectoryStore(os.path.join(path, array)),
                                                        mode="r+")
    return _held[("store", path, array)]


def _progress_dir(job, stage):
    return os.path.join(job["stores"]["masks"], ".unet", stage)


def _objects_dir(job):
    return os.path.join(job["stores"]["masks"], ".unet", "objects")


# ---- objects across block borders -----------------------------------------------------------

NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def block_pairs(job, key):
    """[(key, number, other key, its number)]: the objects of block `key` that are objects of a
    neighbouring block, seen where the block's crop overlaps the neighbour's pixels. Two are one
    where they share more than half of the smaller one's pixels there (an object cut by the border
    is whole in both crops; two touching objects share at most their outlines)."""
    _, ((cy0, cy1), (cx0, cx1)) = block_extent(job, key)
    crop_objects = np.load(os.path.join(_objects_dir(job), block_name(key) + ".npy"))
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
        theirs = _store(_objects_dir(job), "local")[_region(job, other, ((y0, y1), (x0, x1)))].astype(np.int64)
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
    _write_region(job["stores"]["instances"], region, numbers[_store(_objects_dir(job), "local")[region]], name)
    _write_file(os.path.join(_progress_dir(job, "numbered"), name), lambda f: f.write(b"{}"), name)
    return key


def number_objects(job, client, keys, counts):
    """Number the objects over the volume (merged across block borders) and write them."""
    todo = [k for k in keys if not os.path.exists(os.path.join(_progress_dir(job, "numbered"), block_name(k)))]
    if todo:
        pairs = run_tasks(client, partial(block_pairs, job), keys, "objects across borders")
        numbers = object_numbers(keys, counts, [pair for found in pairs for pair in found])
        run_tasks(client, partial(relabel_block, job), todo, "numbering objects", [numbers[k] for k in todo])
        atomic_write(os.path.join(_progress_dir(job, "numbered"), "objects"),
                     lambda f: f.write(str(max(int(n.max()) for n in numbers.values())).encode()))
        shutil.rmtree(_objects_dir(job), ignore_errors=True)
    with open(os.path.join(_progress_dir(job, "numbered"), "objects")) as f:
        return int(f.read())


# ---- output stores --------------------------------------------------------------------------

def ngff_attributes(name, axes, scale, label=False, levels=0):
    """NGFF 0.4 metadata of an image (or label image) with `axes` ("zyx", "yx") and `levels`
    downsampled levels beside level 0 ("1", "2" ...: y and x halved each)."""
    datasets = [{"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": [
        s * 2 ** level if a in "yx" else s for a, s in zip(axes, scale)]}]} for level in range(levels + 1)]
    attributes = {"multiscales": [{"version": "0.4", "name": name, "axes": [{"name": a, "type": "space"} for a in axes],
                                   "datasets": datasets}]}
    if label:
        attributes["image-label"] = {"version": "0.4"}
    return attributes


def pyramid_levels(shape, block):
    """How many halvings bring a slice of (height, width) `shape` within one block: the default --levels."""
    return max(0, math.ceil(math.log2(max(shape) / block))) if max(shape) > block else 0


def write_levels(job):
    """The downsampled levels of every output store (every other pixel of the level before: masks and
    labels keep their values), written chunk by chunk after level 0 is whole."""
    if not job["levels"] or os.path.exists(os.path.join(_progress_dir(job, "numbered"), "levels")):
        return
    from tqdm import tqdm
    for path in job["stores"].values():
        for level in tqdm(range(1, job["levels"] + 1), desc=f"levels of {os.path.basename(path)}", unit="level",
                          file=sys.stderr, disable=None, leave=False):
            source, target = _store(path, str(level - 1)), _store(path, str(level))
            chunk = target.chunks[-1]
            for z in range(job["shape"][0]) if job["has_z"] else [None]:
                for y in range(0, target.shape[-2], chunk):
                    for x in range(0, target.shape[-1], chunk):
                        rows, cols = slice(y, y + chunk), slice(x, x + chunk)
                        wide = (slice(2 * y, 2 * (y + chunk), 2), slice(2 * x, 2 * (x + chunk), 2))
                        where, read = ((z, rows, cols), (z,) + wide) if job["has_z"] else ((rows, cols), wide)
                        _write_region(path, where, source[read], f"level {level} y{y}-x{x}", array=str(level))
    os.makedirs(_progress_dir(job, "numbered"), exist_ok=True)
    atomic_write(os.path.join(_progress_dir(job, "numbered"), "levels"), lambda f: f.write(b"{}"))


def settings_of(job):
    """What a store's contents depend on: a store written with other settings is never resumed."""
    return dict(input=os.path.abspath(job["volume"]), shape=list(job["shape"]), checkpoint=_file_hash(job["checkpoint"]),
                outputs={kind: os.path.abspath(path) for kind, path in job["stores"].items()},
                **{k: job[k] for k in ("threshold", "tta", "amp", "block", "halo", "prob_bits", "objects", "levels")})


def setting_that_differs(written, settings):
    """'threshold 0.5 there, 0.3 now': the first of `settings` that a store's settings.json (`written`) does
    not hold alike."""
    if not isinstance(written, dict):
        return "its .unet/settings.json is damaged"
    for key, value in settings.items():
        there = written.get(key)
        if isinstance(value, dict) and isinstance(there, dict):
            inner = next((k for k in sorted(set(value) | set(there)) if value.get(k) != there.get(k)), None)
            if inner is not None:
                return f"{key}.{inner} {there.get(inner)} there, {value.get(inner)} now"
        elif there != value:
            return "another checkpoint" if key == "checkpoint" else f"{key} {there} there, {value} now"
    return "a setting this version does not know"


def _file_hash(path):
    digest = hashlib.sha256()
    for file in sorted(glob.glob(os.path.join(path, "**"), recursive=True)) if os.path.isdir(path) else [path]:
        if os.path.isfile(file):
            with open(file, "rb") as f:
                for piece in iter(lambda: f.read(1 << 24), b""):
                    digest.update(piece)
    return digest.hexdigest()


def refuse_or_resume(path, kind, job, settings, overwrite, arrays):
    """Whether the store `path` (of outputs `kind`) goes on as it is (written with these settings and
    holding `arrays`, {name: (shape, dtype)}), before any store is touched: DataError where it is the
    input, holds something else and --overwrite was not given, or is no zarr store at all."""
    if os.path.abspath(path) == os.path.abspath(job["volume"]):
        raise DataError(f"{path}: is the input, which is never written; give another output folder")
    if not os.path.exists(path):
        return False
    settings_file = os.path.join(path, ".unet", "settings.json")
    written = _read_json(settings_file)
    if not overwrite and written == settings:
        for name, (shape, dtype) in arrays.items():
            found = _array_layout(os.path.join(path, name))
            if found != f"{shape} of {np.dtype(dtype)}":
                raise DataError(f"{path}: its array {name} is {found}, not the {shape} of {np.dtype(dtype)} this "
                                f"prediction writes (its metadata was changed); --overwrite replaces it")
        return True
    if not overwrite:
        what = "files this command did not write" if not os.path.exists(settings_file) else \
            f"a prediction with other settings ({setting_that_differs(written, settings)})"
        raise DataError(f"{path}: holds {what}; --overwrite replaces it, or give another {OUTPUT_FLAGS[kind]}")
    if not any(os.path.exists(os.path.join(path, f)) for f in (".zgroup", ".zarray")):
        raise DataError(f"{path}: not a zarr store, so not removed, not even with --overwrite")
    return False


def _array_layout(path):
    """'(4, 128, 128) of uint8': the zarr array at `path`, or 'unreadable'."""
    try:
        array = zarr.open_array(zarr.storage.DirectoryStore(path), mode="r")
        return f"{array.shape} of {array.dtype}"
    except Exception:  # zarr raises many kinds on damaged metadata
        return "unreadable"


def prepare_stores(job, volume, overwrite=False):
    """Create the output stores, or keep those written with the same settings (to resume them)."""
    settings = settings_of(job)
    axes = "zyx" if volume.has_z else "yx"
    shape = volume.shape if volume.has_z else volume.shape[1:]
    chunks = (1, job["block"], job["block"]) if volume.has_z else (job["block"], job["block"])
    dtypes = dict(masks=np.uint8, prob={8: np.uint8, 16: np.uint16, 32: np.float32}.get(job["prob_bits"]),
                  instances=np.uint32)
    shapes = {str(level): shape[:-2] + tuple(-(-n // 2 ** level) for n in shape[-2:])
              for level in range(job["levels"] + 1)}
    resumed = [kind for kind, path in job["stores"].items() if refuse_or_resume(
        path, kind, job, settings, overwrite, arrays={name: (size, dtypes[kind]) for name, size in shapes.items()})]
    created = False  # every store checked before any is touched
    for kind, path in job["stores"].items():
        if kind in resumed:
            _remove_partial_chunks(path)
            continue
        if os.path.exists(path):
            shutil.rmtree(path)
        group = zarr.open_group(zarr.storage.DirectoryStore(path), mode="w")
        for name, size in shapes.items():
            group.create_dataset(name, shape=size, chunks=chunks, dtype=dtypes[kind], fill_value=0,
                                 write_empty_chunks=True, dimension_separator="/")
        group.attrs.update(ngff_attributes(volume_name(path), axes, _output_scale(volume, axes), kind == "instances",
                                           job["levels"]))
        written = json.dumps(settings, indent=1).encode()
        atomic_write(os.path.join(path, ".unet", "settings.json"), lambda f: f.write(written))
        created = True
    if created:  # a store made anew: every block again
        for stage in ("done", "numbered", "objects"):
            shutil.rmtree(_progress_dir(job, stage), ignore_errors=True)
    for leftover in glob.glob(os.path.join(job["stores"]["masks"], ".unet", "*", ".tmp-*")):
        os.remove(leftover)  # a write cut short by a kill (files.atomic_write's temporary file)
    if job["stores"].get("instances"):
        zarr.open_array(zarr.storage.DirectoryStore(os.path.join(_objects_dir(job), "local")), mode="a",
                        shape=shape, chunks=chunks, dtype=np.uint16, fill_value=0, write_empty_chunks=True)


def _output_scale(volume, axes):
    if not volume.scale or len(volume.scale) != len(volume.axes):
        return [1.0] * len(axes)
    return [float(volume.scale[volume.axes.index(a)]) for a in axes]


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _remove_partial_chunks(path):
    """What a killed zarr write leaves behind: its temporary file (zarr writes a chunk by renaming one)."""
    for folder, _, files in os.walk(path):
        for file in files:
            if file.endswith(".partial"):
                os.unlink(os.path.join(folder, file))


# ---- the run --------------------------------------------------------------------------------

def slice_mappings(volume, meta):
    """Per slice, how its raw values are normalized for the network (checkpoint.input_mapping): from
    the whole slice up to SAMPLE_PIXELS pixels, from every n-th row and column of a larger one; a
    network that divides integers by their type's range needs no look at the slices at all."""
    probe = np.zeros((1, 1) + ((volume.channels,) if volume.channels > 1 else ()), volume.dtype)
    mapping = input_mapping(meta, probe, volume.path)
    if meta.get("data", {}).get("normalize", "range") == "range" and mapping[1] is None and volume.dtype.kind in "ui":
        return [mapping] * volume.shape[0]
    return [input_mapping(meta, slice_sample(volume, z), f"{volume.path} slice {z}") for z in range(volume.shape[0])]


def slice_sample(volume, z):
    """Slice z of a volume, or of a slice larger than SAMPLE_PIXELS every n-th row and column: what
    its normalization is taken from, in training (datasets.load_store) and prediction alike."""
    _, height, width = volume.shape
    step = max(1, math.ceil(math.sqrt(height * width / SAMPLE_PIXELS)))
    return volume.read(z, slice(0, height, step), slice(0, width, step))


def predict_volume(path, checkpoint, outputs, threshold=0.5, device="cpu", tta=True, amp="off", block=1024,
                   halo=HALO, workers=0, scheduler=None, overwrite=False, meta=None, levels=None):
    """Predict the volume (or slide) at `path` block by block into OME-Zarr stores named after it in
    the folders of `outputs` (masks, prob, instances as predict_unet_test.py names them), over
    `workers` local processes (0: backend.default_workers) or the Dask cluster at `scheduler`.
    `meta`: the checkpoint's, where the caller has loaded it; `levels`: downsampled levels (None: as
    many as bring a slice within one block). Returns the stores' paths."""
    volume = Volume(path)
    meta = meta or build_model(checkpoint, "cpu")[1]  # a damaged checkpoint stops here, before any worker starts
    data = meta.get("data", {})
    if data.get("img_size"):
        raise CheckpointError(f"{checkpoint}: trained on images resized to {data['img_size']} pixels; blockwise "
                              f"prediction needs a network trained at the images' own scale")
    match_channels(np.zeros((2, 2, volume.channels), volume.dtype).squeeze(axis=2) if volume.channels == 1
                   else np.zeros((2, 2, volume.channels), volume.dtype), meta["model"]["n_channels"], path)
    classes = predicted_classes(meta)
    name = volume_name(path) + ".ome.zarr"
    stores = dict(masks=os.path.join(outputs["masks"], name))
    if outputs.get("prob") and classes == 1:
        stores["prob"] = os.path.join(outputs["prob"], name)
    if outputs.get("instances") and classes == 1:
        stores["instances"] = os.path.join(outputs["instances"], name)
    # Absolute paths: a Dask cluster's workers may run in another folder than this process.
    job = dict(volume=os.path.abspath(path), checkpoint=os.path.abspath(checkpoint), device=device, amp=amp, tta=tta,
               threshold=threshold, block=block, halo=halo, shape=volume.shape,
               levels=pyramid_levels(volume.shape[1:], block) if levels is None else levels, has_z=volume.has_z,
               stores={kind: os.path.abspath(store) for kind, store in stores.items()},
               prob_bits=outputs.get("prob_bits", 16) if "prob" in stores else None, object_network=bool(
                   data.get("instances")), gpus=backend.flow.cuda.device_count() if device.startswith("cuda") else 0,
               objects=dict(method=outputs["objects"], min_size=outputs["min_size"],
                            min_distance=outputs["min_distance"]) if "instances" in stores else None)
    prepare_stores(job, volume, overwrite)
    keys = block_grid(volume.shape, block)
    todo = [k for k in keys if not os.path.exists(os.path.join(_progress_dir(job, "done"), block_name(k)))]
    print(f"{path}: {' x '.join(map(str, volume.shape))} (slices x height x width, {volume.dtype}), {len(keys)} "
          f"blocks of {block} pixels with a halo of {halo}" + (f", {len(keys) - len(todo)} done before" if
                                                               len(todo) < len(keys) else ""))
    client = dask_client(workers or backend.default_workers(len(todo)), scheduler, job) if todo or \
        "instances" in stores else None
    try:
        if todo:
            job["mappings"] = slice_mappings(volume, meta)
            run_tasks(client, partial(predict_block, job), todo, "blocks")
        counts = {k: _read_json(os.path.join(_progress_dir(job, "done"), block_name(k))) for k in keys}
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


def run_tasks(client, function, keys, what, *more):
    """[function(key, *more ...)] for every key, here or on the cluster, with a progress bar."""
    from tqdm import tqdm
    results = []
    with tqdm(total=len(keys), desc=what, unit="block", file=sys.stderr, disable=None, leave=False) as bar:
        if client is None:
            for args in zip(keys, *more):
                results.append(function(*args))
                bar.update()
            return results
        from distributed import KilledWorker, as_completed
        futures = client.map(function, keys, *more, pure=False)
        try:
            for future in as_completed(futures):
                results.append(future.result())
                bar.update()
        except ModuleNotFoundError as err:
            raise DataError(f"the Dask workers cannot import this project ({err}): start them in its folder with "
                            f"PYTHONPATH=$PWD (README)") from None
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
