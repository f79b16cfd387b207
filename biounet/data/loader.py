"""Reading and checking image and label files, and cropping, augmenting and batching them for training.

Framework-free: everything here is numpy, so the same data feeds OneFlow and PyTorch.
Images are read in their own type (8-, 12-, 16-bit, float; PNG, TIFF compressed or not, JPEG, BMP)
as H x W or H x W x C (any number of channels), then normalized into float32 (`normalize`: by the
type's range, per-image percentiles or z-score); labels become uint8 class indices: {0, 1} for one
class (255 = cell = 1 in ISBI's labels), 0..N-1 (+ 255 = ignore) for N.
Dataset layouts (DSB 2018, VOC, nnU-Net, Cellpose, TIFF stacks) are found by datasets.py.
"""
import os
import signal
from collections import OrderedDict

import cv2
import numpy as np
import tifffile
from PIL import Image

from biounet.core.files import DataError
from biounet.core.processes import WatchedPool
from biounet.data.augment import augment as augment_sample

NORMALIZATIONS = ("percentile", "zscore", "range")
DEFAULT_PERCENTILES = (1.0, 99.8)
MAX_GUESSED_CHANNELS = 8
LAZY_CACHE_BYTES = 128 * 2 ** 20  # what a LazyArrays keeps of the arrays it computed
LEVEL_SAMPLES = 64  # intensity_levels of a store's windows: from this many


def _read_file(path):
    """A decoded image file in its own type: H x W, or H x W x C (RGB order; a PNG's alpha dropped)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    if path.lower().endswith((".tif", ".tiff")):
        return read_tiff_image(path)
    try:
        array = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    except (cv2.error, MemoryError) as err:  # e.g. a header claiming more pixels than OpenCV allows
        raise DataError(f"{path}: not a readable image ({str(err).strip().splitlines()[-1][:120]})")
    if array is None or array.size == 0:
        raise DataError(f"{path}: not a readable image (corrupt or unsupported format)")
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_BGRA2RGB if array.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return array


def read_tiff(path):
    """(array, axes) of a TIFF file's first series, as tifffile names its axes (Y, X; C or S for channels;
    Z, T, Q ... for pages); compressed files (LZW, Deflate, zstd) too."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return series.asarray(), series.axes
    except Exception as err:  # tifffile raises many kinds on damaged files
        raise DataError(f"{path}: not a readable TIFF ({type(err).__name__}: {err})")


def channels_last(array, axes):
    """`array` with its channel axis (tifffile's C or S) moved last, and its axes in that order."""
    channel = next((i for i, axis in enumerate(axes) if axis in "CS"), None)
    if channel is None:
        return array, axes
    return np.moveaxis(array, channel, -1), axes[:channel] + axes[channel + 1:] + axes[channel]


def rgb_planes(path):
    """True when a TIFF is one image of 3 colour planes stored one after the other (tagged RGB, planar
    configuration separate): what tifffile writes for a 3 x H x W array unless told
    photometric='minisblack', so often three slices rather than one colour image."""
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return (series.shape[0] == 3 and len(series.shape) == 3 and series.keyframe.photometric ==
                    tifffile.PHOTOMETRIC.RGB and series.keyframe.planarconfig == tifffile.PLANARCONFIG.SEPARATE)
    except Exception:  # not a readable TIFF: its reader says so
        return False


def read_tiff_image(path):
    """One image from a TIFF: H x W, or H x W x C with the channels first or last in the file
    (without metadata, an outer axis of at most MAX_GUESSED_CHANNELS counts as channels)."""
    array, axes = channels_last(*read_tiff(path))
    array = array.reshape([n for n, axis in zip(array.shape, axes) if n > 1 or axis in "YX"])
    if array.ndim == 3 and array.shape[-1] > MAX_GUESSED_CHANNELS >= array.shape[0]:
        array = np.moveaxis(array, 0, -1)  # channel-first, written without saying so
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] <= MAX_GUESSED_CHANNELS):
        return array
    raise DataError(f"{path}: TIFF of shape {array.shape} ({axes}) is not one image; give a stack as a "
                    f"volume (--data-format tiff)")


def read_tiff_stack(path):
    """The pages of a TIFF file as one array: N x H x W, or N x H x W x C where the file has channels
    (RGB pages, an ImageJ hyperstack's C); every other axis (Z, T ...) counts as pages."""
    array, axes = channels_last(*read_tiff(path))
    page_dims = 3 if axes[-1] in "CS" else 2
    if array.size == 0 or array.ndim < page_dims:
        raise DataError(f"{path}: TIFF holds no image pages (shape {array.shape})")
    return array.reshape(-1, *array.shape[-page_dims:])


def image_from_array(array, source):
    """A decoded image as H x W (one channel) or H x W x C, in its own type, checked."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or array.size == 0:
        raise DataError(f"{source}: image of shape {array.shape} is not H x W or H x W x channels")
    if array.dtype.kind not in "uif" or array.dtype.itemsize > 8:
        raise DataError(f"{source}: image of type {array.dtype} is not a grey, colour or channel image")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise DataError(f"{source}: image holds NaN or infinite values")
    return array


def read_raw_image(path):
    """An image file's values in their own type (8-, 16-bit, float ...): H x W, or H x W x C."""
    return image_from_array(_read_file(path), path)


def normalize(image, method="range", percentiles=DEFAULT_PERCENTILES, source="image"):
    """A raw image as float32 for the network, each channel on its own:
      range       divided by its type's largest value (8, 16 bit); float images must lie in [0, 1]
      percentile  the `percentiles` (low, high) of the image mapped to 0 and 1, not clipped (StarDist, Cellpose)
      zscore      mean 0, standard deviation 1"""
    return apply_normalization(image, normalization_of(image, method, percentiles, source))


def normalization_of(image, method="range", percentiles=DEFAULT_PERCENTILES, source="image"):
    """(low, spread) of `normalize`: the image becomes (value - low) / spread, per channel. Taken from
    one image and applied to others (apply_normalization): the blocks of a slice too large to hold."""
    if method == "range":
        if image.dtype.kind in "ui":
            return 0, np.iinfo(image.dtype).max
        if image.min() < 0 or image.max() > 1:
            raise DataError(f"{source}: float image with values in [{image.min():g}, {image.max():g}], "
                            f"not [0, 1]: use --normalize percentile or zscore")
        return 0, 1
    values = image.astype(np.float32)
    if method == "percentile":
        low, high = np.percentile(values, percentiles, axis=(0, 1))
        return low, np.where(high > low, high - low, values.max(axis=(0, 1)) - low)
    if method == "zscore":
        return values.mean(axis=(0, 1)), values.std(axis=(0, 1))
    raise ValueError(f"unknown normalization {method!r}")


def apply_normalization(image, normalization):
    low, spread = normalization
    return ((image.astype(np.float32) - low) / np.where(spread > 0, spread, 1)).astype(np.float32)


def intensity_levels(images, percentiles=DEFAULT_PERCENTILES):
    """Where normalized images' intensities lie: per channel, [low, high], the medians over the
    images of their `percentiles` (what a network trained on them is used to); of at most
    LEVEL_SAMPLES of them, evenly spread, where they are read lazily."""
    if isinstance(images, LazyArrays) and len(images) > LEVEL_SAMPLES:
        images = images.subset(np.linspace(0, len(images) - 1, LEVEL_SAMPLES).round().astype(int).tolist())
    per_image = [np.percentile(image.reshape(-1, channels_of(image)), percentiles, axis=0) for image in images]
    return np.median(per_image, axis=0).T.round(6).tolist()


def map_onto_levels(image, percentiles, levels, normalization=None):
    """`image` (raw, any type) with each channel's `percentiles` mapped linearly onto `levels` ([low, high]
    per channel, as intensity_levels gives them; one pair for all channels where the counts differ).
    `normalization`: the percentiles' (low, spread) where taken from elsewhere (normalization_of)."""
    levels = np.array(levels, np.float32)
    if len(levels) != channels_of(image):
        levels = levels.mean(axis=0, keepdims=True)
    low, high = (levels[:, 0], levels[:, 1]) if image.ndim == 3 else (levels[0, 0], levels[0, 1])
    normalization = normalization or normalization_of(image, "percentile", percentiles)
    return (apply_normalization(image, normalization) * (high - low) + low).astype(np.float32)


def auto_normalization(images):
    """range for 8-bit images (as they always were read), percentile for anything else."""
    return "range" if all(image.dtype == np.uint8 for image in images) else "percentile"


def read_image(path, method="range", percentiles=DEFAULT_PERCENTILES):
    """An image file normalized (`normalize`) as float32: H x W, or H x W x C."""
    return normalize(read_raw_image(path), method, percentiles, path)


def channels_of(image):
    return image.shape[2] if image.ndim == 3 else 1


def match_channels(image, channels, source="image"):
    """`image` with `channels` channels: grey repeated to RGB, RGB converted to grey, else as it is."""
    have = channels_of(image)
    if have == channels:
        return image
    if channels == 3 and have == 1:
        return np.repeat(image[..., None], 3, axis=2)
    if channels == 1 and have == 3:
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    raise DataError(f"{source}: image has {have} channels, the network takes {channels}")


def read_label_array(path):
    """A label file's values: palette PNGs give their indices (as VOC's SegmentationClass), grey
    files their grey values, colour files their grey value where all channels agree."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    if path.lower().endswith((".tif", ".tiff")):
        array = read_tiff_image(path)  # compressed ones too, which Pillow may not read
    else:
        try:
            with Image.open(path) as picture:
                array = np.array(picture)  # mode "P": the palette indices, not the colours
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: not a readable label image ({err})")
    if array.ndim == 3:
        if not all(np.array_equal(array[..., 0], array[..., c]) for c in (1, 2)):
            raise DataError(f"{path}: label is a colour image; expected class indices (grey or palette PNG)")
        array = array[..., 0]
    return array


def _shown(values):
    return ", ".join(str(v) for v in values[:8]) + (", ..." if len(values) > 8 else "")


def label_to_classes(array, source, classes=1, ignore_index=255, instances=False):
    """Label values checked and mapped to uint8 class indices.

    classes == 1 (binary): 0/255 or 0/1, anything else is an error; with `instances` the label
    numbers objects (0 = background) and every nonzero value is foreground. classes > 1:
    indices 0..classes-1 plus `ignore_index` (left out of loss and scores)."""
    if instances:
        return (np.asarray(array) > 0).astype(np.uint8)
    values = np.unique(array)
    if classes == 1:
        if set(values.tolist()) <= {0, 255}:
            return (array == 255).astype(np.uint8)
        if set(values.tolist()) <= {0, 1}:
            return array.astype(np.uint8)
        raise DataError(f"{source}: label is not binary: values {_shown(values)} (expected 0/255 or 0/1; "
                        f"for class indices train with --classes N, for numbered objects --instance-labels)")
    bad = values[(values >= classes) & (values != ignore_index)]
    if bad.size:
        raise DataError(f"{source}: label values {_shown(bad)} do not fit --classes {classes} "
                        f"(expected 0..{classes - 1}, {ignore_index} = ignore)")
    return array.astype(np.uint8)


def read_label(path, classes=1, ignore_index=255):
    """Binary label as uint8 {0, 1} (from 0/255 or 0/1), or class indices with `classes` > 1."""
    return label_to_classes(read_label_array(path), path, classes, ignore_index)


def resize(array, size, nearest=False):
    """`array` (H x W or H x W x C) resized to `size` (height, width); labels by nearest neighbour."""
    height, width = size
    if array.shape[:2] == (height, width):
        return array
    if array.ndim == 3 and array.shape[2] > 4:  # OpenCV resizes up to 4 channels at once
        return np.dstack([resize(array[..., c], size, nearest) for c in range(array.shape[2])])
    shrink = height * width < array.shape[0] * array.shape[1]
    method = cv2.INTER_NEAREST if nearest else (cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    dtype = array.dtype
    if array.dtype not in (np.uint8, np.uint16, np.float32):
        array = array.astype(np.float32)
    return cv2.resize(array, (width, height), interpolation=method).astype(dtype)


def random_crop(arrays, size, rng):
    """The same random `size`x`size` window of each array (the whole array where it is smaller)."""
    h, w = arrays[0].shape[:2]
    ch, cw = min(size, h), min(size, w)
    y = int(rng.integers(h - ch + 1))
    x = int(rng.integers(w - cw + 1))
    return tuple(None if a is None else a[y:y + ch, x:x + cw] for a in arrays)


class LazyArrays:
    """A list of arrays computed when asked for, `compute(i)`, the latest kept up to `budget` bytes:
    training data drawn from a store larger than memory (datasets.load_store). Lists derived from
    it (lazy_map) are lazy too, so nothing holds the whole store."""

    def __init__(self, compute, count, budget=LAZY_CACHE_BYTES):
        self.compute, self.count, self.budget = compute, count, budget
        self.kept, self.kept_bytes = OrderedDict(), 0

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        if not -self.count <= i < self.count:
            raise IndexError(i)
        i %= self.count
        if i in self.kept:
            self.kept.move_to_end(i)
            return self.kept[i]
        array = self.compute(i)
        self.kept[i] = array
        self.kept_bytes += array.nbytes
        while self.kept_bytes > self.budget and len(self.kept) > 1:
            self.kept_bytes -= self.kept.popitem(last=False)[1].nbytes
        return array

    def __iter__(self):
        return (self[i] for i in range(self.count))

    def subset(self, indices):
        """The arrays `indices`, kept by this list (the subset keeps only its latest)."""
        indices = list(indices)
        return LazyArrays(lambda i: self[indices[i]], len(indices), budget=0)


def lazy_map(function, *lists):
    """[function(a, b ...) for a, b ... in zip(*lists)], computed when asked for where a list is lazy."""
    lazy = next((items for items in lists if isinstance(items, LazyArrays)), None)
    if lazy is None:
        return [function(*items) for items in zip(*lists)]
    return LazyArrays(lambda i: function(*(items[i] for items in lists)), len(lazy))


def pick(items, indices):
    """items[i] for i in indices, or None; lazy where `items` is."""
    if items is None:
        return None
    return items.subset(indices) if isinstance(items, LazyArrays) else [items[i] for i in indices]


class SegmentationDataset:
    """Images (H x W or H x W x C, normalized) and labels (class indices; 1 = cell or object with one class) held
    in memory, with their names and, where the data numbers its objects, the numbered instances."""

    def __init__(self, images, labels, classes=1, names=None, instances=None,
                 normalization=("range", DEFAULT_PERCENTILES), input_types=None, shapes=None):
        self.images, self.labels, self.classes = images, labels, classes
        self.names = names or [str(i) for i in range(len(images))]
        self.instances = instances  # numbered objects (DSB 2018's masks, GlaS) for the weight map, or None
        self.normalization = normalization  # (method, percentiles) the images were normalized with
        self.input_types = input_types  # the image files' types ("uint8", "uint16" ...), as read
        self.shapes = shapes or [image.shape for image in images]  # (lazy images: known without reading them)

    @property
    def channels(self):
        return (self.shapes[0][2] if len(self.shapes[0]) == 3 else 1) if self.shapes else 1

    def __len__(self):
        return len(self.images)

    def replaced(self, **fields):
        """This dataset with some of its fields (the constructor's arguments) replaced, the others kept."""
        return SegmentationDataset(**{**vars(self), **fields})

    def subset(self, indices):
        indices = list(indices)
        return self.replaced(images=pick(self.images, indices), labels=pick(self.labels, indices),
                             names=pick(self.names, indices), instances=pick(self.instances, indices),
                             shapes=pick(self.shapes, indices))


class Sampler:
    """Training batches of a dataset: random `crop` x `crop` windows (0: whole images), augmented with
    the probabilities in `augment` (augment.py; None: not at all), with per-pixel loss `weights`
    (one array per image, or None) cropped and augmented alongside."""

    def __init__(self, dataset, crop=0, augment=None, weights=None):
        self.dataset, self.crop, self.augment, self.weights = dataset, crop, augment, weights

    def __len__(self):
        return len(self.dataset)

    def sample(self, index, rng):
        """(image, label, weights or None) of pair `index`, cropped and augmented."""
        arrays = (self.dataset.images[index], self.dataset.labels[index],
                  None if self.weights is None else self.weights[index])
        if self.crop:
            arrays = random_crop(arrays, self.crop, rng)
        if self.augment:
            arrays = augment_sample(*arrays, rng, self.augment)
        return tuple(None if a is None else np.ascontiguousarray(a) for a in arrays)

    def batch(self, indices, seed):
        """stack_batch of the pairs `indices`, each cropped and augmented with random numbers of its own,
        drawn from (*seed, index): a pair gets the same crop whichever process or step takes it."""
        return stack_batch([self.sample(i, np.random.default_rng((*seed, int(i)))) for i in indices],
                           self.dataset.classes)


def stack_batch(samples, classes):
    """(images, labels, weights or None) of (image, label, weights) triples: images float32 N x C x H x W;
    labels float32 N x 1 x H x W with one class, int64 N x H x W class indices with more; weights N x 1 x H x W."""
    sizes = sorted({s[0].shape[:2] for s in samples})
    if len(sizes) > 1:
        raise DataError(f"images of different sizes ({sizes[0][1]}x{sizes[0][0]} and {sizes[-1][1]}x"
                        f"{sizes[-1][0]}) cannot share a batch: train with --crop, --img-size or --batch-size 1")
    images = np.stack([s[0] for s in samples]).astype(np.float32)
    images = images.transpose(0, 3, 1, 2) if images.ndim == 4 else images[:, None]
    labels = np.stack([s[1] for s in samples])
    labels = labels[:, None].astype(np.float32) if classes == 1 else labels.astype(np.int64)
    weights = None if samples[0][2] is None else np.stack([s[2] for s in samples])[:, None].astype(np.float32)
    return np.ascontiguousarray(images), labels, weights


_sampler = {}  # a loader worker's Sampler, handed over by _start_loader_worker


def _start_loader_worker(sampler):
    """A loader worker's start: `sampler` (forked with it, not pickled) and its signals."""
    _sampler["sampler"] = sampler
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the training process's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not training's StopRequest: a broken pool ends its workers so
    # Not cv2.setNumThreads(1): in a child forked from a process whose OpenCV threads had run, it
    # hangs for ever (pthread_cond_destroy on the copied pool).


def _loader_batch(indices, seed):
    return _sampler["sampler"].batch(indices, seed)


class BatchLoader:
    """The steps' batches, made by `workers` processes up to 2 x `workers` steps ahead of the step
    (0: in this process, when the step asks). A batch depends only on its pairs and seed
    (Sampler.batch), so the weights are the same whatever the number of workers, and a batch lost
    with a worker that died is made again alike (processes.WatchedPool)."""

    def __init__(self, sampler, workers=0):
        self.sampler, self.workers, self.pool = sampler, workers, None
        if workers:  # forked: the workers get the data with their start, and then only the pairs' indices
            self.pool = WatchedPool(workers, "fork", name="loader worker", flag="--loader-workers",
                                    initializer=_start_loader_worker, initargs=(sampler,))

    def batches(self, steps):
        """The batch of each (indices, seed) of `steps`, in order."""
        if self.pool is None:
            return (self.sampler.batch(indices, seed) for indices, seed in steps)
        return self.pool.results(_loader_batch, steps, ahead=2 * self.workers)

    def close(self):
        if self.pool is not None:
            self.pool.close()
