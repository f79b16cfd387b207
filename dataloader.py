"""Reading, checking and augmenting image/label pairs, and batching them for training.

Framework-free: everything here is numpy, so the same data feeds OneFlow and PyTorch.
Images become float32 in [0, 1]; labels become uint8 {0, 1} (255 = cell = 1 in ISBI's labels).
"""
import os
import re
import tempfile

import cv2
import numpy as np

from augment import augment as augment_sample

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


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
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_png(path, array):
    """Write a uint8/uint16 array as PNG atomically."""
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise DataError(f"{path}: could not encode image")
    atomic_write(path, lambda f: f.write(encoded.tobytes()))


def _natural_key(path):
    name = os.path.basename(path)
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def list_images(folder):
    """Image files in `folder`, in natural order (2.png before 10.png)."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: no such folder")
    paths = [os.path.join(folder, name) for name in os.listdir(folder)
             if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".")]
    if not paths:
        raise DataError(f"{folder}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return sorted(paths, key=_natural_key)


def read_gray(path):
    """An image file as a 2-D uint8 (or uint16) array, whatever its colour layout."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    array = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if array is None or array.size == 0:
        raise DataError(f"{path}: not a readable image (corrupt or unsupported format)")
    if array.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if array.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        array = cv2.cvtColor(array, code)
    return array


def read_image(path):
    """Image scaled to float32 [0, 1] by its dtype's range."""
    array = read_gray(path)
    scale = 65535.0 if array.dtype == np.uint16 else 255.0
    return array.astype(np.float32) / scale


def read_label(path):
    """Binary label as uint8 {0, 1}; accepts 0/255 and 0/1, rejects anything else."""
    array = read_gray(path)
    values = np.unique(array)
    if set(values.tolist()) <= {0, 255}:
        return (array == 255).astype(np.uint8)
    if set(values.tolist()) <= {0, 1}:
        return array.astype(np.uint8)
    shown = ", ".join(str(v) for v in values[:8]) + (", ..." if len(values) > 8 else "")
    raise DataError(f"{path}: label is not binary: values {shown} (expected 0/255 or 0/1)")


def pair_by_name(image_dir, label_dir):
    """(image, label) paths matched by file name stem; every image needs a label."""
    labels = {os.path.splitext(os.path.basename(p))[0]: p for p in list_images(label_dir)}
    pairs = []
    for image_path in list_images(image_dir):
        stem = os.path.splitext(os.path.basename(image_path))[0]
        if stem not in labels:
            raise DataError(f"{image_path}: no label named {stem}.* in {label_dir}")
        pairs.append((image_path, labels[stem]))
    return pairs


def load_pairs(pairs):
    """Read and check every pair: returns lists of images and labels of matching sizes."""
    images, labels = [], []
    for image_path, label_path in pairs:
        image, label = read_image(image_path), read_label(label_path)
        if image.shape != label.shape:
            raise DataError(f"{label_path}: label is {label.shape[1]}x{label.shape[0]} "
                            f"but its image {image_path} is {image.shape[1]}x{image.shape[0]}")
        images.append(image)
        labels.append(label)
    return images, labels


def random_crop(arrays, size, rng):
    """The same random `size`x`size` window of each array (the whole array where it is smaller)."""
    h, w = arrays[0].shape
    ch, cw = min(size, h), min(size, w)
    y = int(rng.integers(h - ch + 1))
    x = int(rng.integers(w - cw + 1))
    return tuple(None if a is None else a[y:y + ch, x:x + cw] for a in arrays)


class SegmentationDataset:
    """Images, labels and optional loss weights held in memory; `sample(i, rng)` augments one.

    `augment` maps augmentation names to probabilities (see augment.py); None: no augmentation."""

    def __init__(self, images, labels, crop=None, augment=None, weights=None):
        self.images, self.labels, self.weights = images, labels, weights
        self.crop, self.augment = crop, augment

    @classmethod
    def from_folders(cls, image_dir, label_dir, **kwargs):
        return cls(*load_pairs(pair_by_name(image_dir, label_dir)), **kwargs)

    def __len__(self):
        return len(self.images)

    def sample(self, index, rng):
        """(image, label, weights or None) of pair `index`, cropped and augmented."""
        arrays = (self.images[index], self.labels[index], None if self.weights is None else self.weights[index])
        if self.crop:
            arrays = random_crop(arrays, self.crop, rng)
        if self.augment:
            arrays = augment_sample(*arrays, rng, self.augment)
        return tuple(None if a is None else np.ascontiguousarray(a) for a in arrays)

    def subset(self, indices):
        pick = lambda items: None if items is None else [items[i] for i in indices]  # noqa: E731
        return SegmentationDataset(pick(self.images), pick(self.labels), self.crop, self.augment, pick(self.weights))


def batches(dataset, batch_size, rng, shuffle=True):
    """Yield (images, labels, weights or None) as float32 N x 1 x H x W arrays for one epoch."""
    order = rng.permutation(len(dataset)) if shuffle else np.arange(len(dataset))
    for start in range(0, len(order), batch_size):
        samples = [dataset.sample(i, rng) for i in order[start:start + batch_size]]
        sizes = sorted({s[0].shape for s in samples})
        if len(sizes) > 1:
            raise DataError(f"images of different sizes ({sizes[0][1]}x{sizes[0][0]} and {sizes[-1][1]}x"
                            f"{sizes[-1][0]}) cannot share a batch: train with --crop or --batch-size 1")
        stacked = [None if samples[0][k] is None else np.stack([s[k] for s in samples])[:, None].astype(np.float32)
                   for k in range(3)]
        yield tuple(stacked)


if __name__ == "__main__":
    import sys
    image_dir = sys.argv[1] if len(sys.argv) > 1 else "train_image"
    label_dir = sys.argv[2] if len(sys.argv) > 2 else "train_label"
    data = SegmentationDataset.from_folders(image_dir, label_dir)
    print(f"{len(data)} pairs from {image_dir} + {label_dir}; "
          f"cell fraction {np.mean([l.mean() for l in data.labels]):.3f}")
