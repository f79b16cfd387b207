"""File helpers at the bottom of the project: the image suffixes read, listing image folders,
writing files atomically (PNG, ImageJ TIFF or anything else), and DataError, the one-line error of bad input."""
import io
import os
import re
import tempfile

import cv2
import tifffile

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


def is_zarr(path):
    """A zarr or OME-Zarr store (a folder): training and prediction read it lazily."""
    return os.path.isdir(path) and (path.rstrip("/").endswith(".zarr") or any(
        os.path.exists(os.path.join(path, name)) for name in (".zgroup", ".zarray", "zarr.json")))


class DataError(ValueError):
    """Bad input data; the message names the file and the problem in one line."""


def atomic_write(path, write):
    """Call `write(file)` on a temporary file beside `path`, then rename it over `path`.

    A crash or an error midway leaves any earlier `path` as it was.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it a normal file's mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno is not None:  # a full disk, a read-only folder ...
            raise OSError(f"{path}: could not be written ({err.strerror}); it is as it was before") from None
        raise


def write_png(path, array):
    """Write a uint8/uint16 array as PNG atomically."""
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise DataError(f"{path}: could not encode image")
    atomic_write(path, lambda f: f.write(encoded.tobytes()))


def write_tiff(path, array):
    """Write an image or a stack (N x H x W) as an ImageJ TIFF atomically: 8-, 16-bit or float32."""
    encoded = io.BytesIO()
    tifffile.imwrite(encoded, array, imagej=True, metadata={"axes": "ZYX" if array.ndim == 3 else "YX"})
    atomic_write(path, lambda f: f.write(encoded.getbuffer()))


def _natural_key(path):
    name = os.path.basename(path)
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def list_images(folder):
    """Image files in `folder`, in natural order (2.png before 10.png)."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: {'a file, not a folder of images' if os.path.exists(folder) else 'no such folder'}")
    paths = [os.path.join(folder, name) for name in os.listdir(folder)
             if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".")]
    if not paths:
        raise DataError(f"{folder}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return sorted(paths, key=_natural_key)
