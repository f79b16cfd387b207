"""Volumes and slides larger than memory, read slice by slice and window by window: TIFF stacks
(memory-mapped where they can be) and zarr / OME-Zarr stores (NGFF 0.4), with their axes."""
import math
import os

import numpy as np
import tifffile
import zarr

from biounet.core.files import DataError

SAMPLE_PIXELS = 16 * 2 ** 20  # normalization statistics of a slice from at most this many of its pixels
TIFF_AXES = {"Z": "z", "I": "z", "Q": "z", "T": "t", "C": "c", "S": "c", "Y": "y", "X": "x"}
ZARR_SUFFIXES = (".ome.zarr", ".zarr")


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


def slice_sample(volume, z):
    """Slice z of a volume, or of a slice larger than SAMPLE_PIXELS every n-th row and column: what
    its normalization is taken from, in training (datasets.load_store) and prediction alike."""
    _, height, width = volume.shape
    step = max(1, math.ceil(math.sqrt(height * width / SAMPLE_PIXELS)))
    return volume.read(z, slice(0, height, step), slice(0, width, step))
