"""The output stores of blockwise prediction: OME-Zarr groups with their pyramid levels, the
settings they were written with (a store is resumed only by the same run, refused otherwise), and
the progress files that let an interrupted run go on."""
import glob
import hashlib
import json
import math
import os
import shutil

import numpy as np
import zarr

from biounet.core.files import DataError, atomic_write
from biounet.data.volumes import volume_name

OUTPUT_FLAGS = dict(masks="--save-res-path", prob="--prob-path", instances="--instance-path")  # where each store goes

_open_arrays = {}  # a worker's open output arrays, by (store, array)


def write_region(path, region, values, name, array="0"):
    try:
        open_store(path, array)[region] = values
    except OSError as err:  # a full disk ...
        raise DataError(f"{path}: block {name} could not be written ({err.strerror or err}); it is not done, "
                        f"the next run predicts it again") from None


def write_file(path, write, name):
    try:
        atomic_write(path, write)
    except OSError as err:
        raise DataError(f"{err}; block {name} is not done, the next run predicts it again") from None


def open_store(path, array="0"):
    if (path, array) not in _open_arrays:
        _open_arrays[(path, array)] = zarr.open_array(zarr.storage.DirectoryStore(os.path.join(path, array)),
                                                        mode="r+")
    return _open_arrays[(path, array)]


def progress_dir(job, stage):
    return os.path.join(job["stores"]["masks"], ".unet", stage)


def objects_dir(job):
    return os.path.join(job["stores"]["masks"], ".unet", "objects")


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


def settings_of(job):
    """What a store's contents depend on: a store written with other settings is never resumed."""
    return dict(input=os.path.abspath(job["volume"]), shape=list(job["shape"]),
                checkpoint=_file_hash(job["checkpoint"]),
                outputs={kind: os.path.abspath(path) for kind, path in job["stores"].items()},
                **{k: job[k] for k in ("threshold", "seeds", "tta", "amp", "block", "halo", "prob_bits", "objects", "levels")})


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
    """The SHA-256 of a file, of a folder's files, or of the checkpoints of an ensemble (a tuple), one after the other."""
    digest = hashlib.sha256()
    files = []
    for one in path if isinstance(path, tuple) else (path,):
        files += sorted(glob.glob(os.path.join(one, "**"), recursive=True)) if os.path.isdir(one) else [one]
    for file in files:
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
    written = read_json(settings_file)
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
    arrays_of = {kind: {name: (size, dtypes[kind]) for name, size in shapes.items()} for kind in job["stores"]}
    resumed = [kind for kind, path in job["stores"].items()
               if refuse_or_resume(path, kind, job, settings=settings, overwrite=overwrite, arrays=arrays_of[kind])]
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
        group.attrs.update(ngff_attributes(volume_name(path), axes, _output_scale(volume, axes),
                                           label=kind == "instances", levels=job["levels"]))
        written = json.dumps(settings, indent=1).encode()
        atomic_write(os.path.join(path, ".unet", "settings.json"), lambda f: f.write(written))
        created = True
    if created:  # a store made anew: every block again
        for stage in ("done", "numbered", "objects"):
            shutil.rmtree(progress_dir(job, stage), ignore_errors=True)
    for leftover in glob.glob(os.path.join(job["stores"]["masks"], ".unet", "*", ".tmp-*")):
        os.remove(leftover)  # a write cut short by a kill (files.atomic_write's temporary file)
    if job["stores"].get("instances"):
        zarr.open_array(zarr.storage.DirectoryStore(os.path.join(objects_dir(job), "local")), mode="a",
                        shape=shape, chunks=chunks, dtype=np.uint16, fill_value=0, write_empty_chunks=True)


def _output_scale(volume, axes):
    if not volume.scale or len(volume.scale) != len(volume.axes):
        return [1.0] * len(axes)
    return [float(volume.scale[volume.axes.index(a)]) for a in axes]


def read_json(path):
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
