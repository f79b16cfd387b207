"""Dataset layouts: find the images and labels of a dataset in the shapes users bring it.

  pairs    image and label folders matched by file name (ISBI 2012 as train.sh fetches it); a
           label may add _anno, _mask, _label, _gt or _seg to its image's name, and may sit
           in the image folder itself (GlaS: train_1.bmp and train_1_anno.bmp)
  dsb2018  Data Science Bowl 2018: <id>/images/<id>.png with <id>/masks/*.png, one mask per
           nucleus, merged into one foreground mask (numbered as instances for the weight map)
  voc      Pascal VOC: JPEGImages/, SegmentationClass/ palette PNGs, ImageSets/Segmentation/<split>.txt
  tiff     multi-page TIFF volumes, e.g. ISBI's train-volume.tif with train-labels.tif (channels by
           the file's axes: ImageJ hyperstacks, RGB pages)
  nnunet   nnU-Net's raw dataset: dataset.json, imagesTr/<case>_0000.png (one file per channel, as
           its channel_names list them), labelsTr/<case>.png, imagesTs/ (predicted unless --split train)
  cellpose Cellpose's folders: img.tif beside img_masks.tif (numbered objects, 0 = background)
  zarr     a zarr or OME-Zarr image (data/volumes.py) with a label image of the same shape: its own NGFF
           labels/ group or LABEL_PATH; read lazily, window by window (load_store), never whole

`find_samples` detects the layout when not given and lists Samples, read only when asked for;
`load_dataset` reads and checks them into a SegmentationDataset; a zarr store is read by
`load_store`. `python dataloader.py PATH` says what was found.
"""
import functools
import json
import os
from collections import namedtuple

import numpy as np

from biounet.core.files import DataError, is_zarr, list_images
from biounet.data.labels import connected_objects
from biounet.data.loader import (DEFAULT_PERCENTILES, LazyArrays, SegmentationDataset, apply_normalization,
                                 auto_normalization, channels_of, image_from_array, label_to_classes, lazy_map,
                                 match_channels, normalization_of, normalize, read_label_array, read_raw_image,
                                 read_tiff_stack, resize)
from biounet.data.volumes import Volume, slice_sample

FORMATS = ("pairs", "dsb2018", "voc", "tiff", "nnunet", "cellpose", "zarr")
STORE_WINDOW = 1024  # a zarr store's slices are cut into windows of at most this side, each a training sample
LABEL_SUFFIXES = ("_anno", "_mask", "_label", "_labels", "_gt", "_seg")
CELLPOSE_MASKS = "_masks"

# name: the output file's stem; source, label_source: the image's and label's file, for messages;
# read_image: the image's raw values (dataloader.read_raw_image); read_*: callables (read_label and
# read_instances are None when the sample has none); stack: (volume path, page, pages) for a page of a TIFF.
Sample = namedtuple("Sample", "name source read_image read_label read_instances label_source stack",
                    defaults=(None, None))


def detect_format(path):
    if os.path.isfile(path):
        if path.lower().endswith((".tif", ".tiff")):
            return "tiff"
        raise DataError(f"{path}: a file, but not a TIFF stack; give a folder or a .tif volume")
    if not os.path.isdir(path):
        raise DataError(f"{path}: no such file or folder")
    if is_zarr(path):
        return "zarr"
    if os.path.isdir(os.path.join(path, "JPEGImages")):
        return "voc"
    if os.path.isfile(os.path.join(path, "dataset.json")) and os.path.isdir(os.path.join(path, "imagesTr")):
        return "nnunet"
    if any(os.path.isdir(os.path.join(path, name, "images")) for name in os.listdir(path)):
        return "dsb2018"
    if any(_cellpose_base(name, path) for name in os.listdir(path)):
        return "cellpose"
    return "pairs"


def find_samples(path, data_format="auto", label_path=None, split=None):
    """The samples of the dataset at `path` (labels from `label_path` for pairs and tiff)."""
    data_format = detect_format(path) if data_format == "auto" else data_format
    if data_format == "zarr":
        raise DataError(f"{path}: a zarr store: training reads it window by window, prediction block by block "
                        f"(README: volumes and slides larger than memory)")
    finder = {"pairs": _pairs, "dsb2018": _dsb2018, "voc": _voc, "tiff": _tiff, "nnunet": _nnunet,
              "cellpose": _cellpose}[data_format]
    samples = finder(path, label_path, split)
    if not samples:
        raise DataError(f"{path}: no images found in its {data_format} layout")
    return samples


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def _reader(path):
    return lambda: read_raw_image(path)


def _label_reader(path):
    return lambda: read_label_array(path)


def _split_labels_beside(paths):
    """(images, {image stem: label path}) of one folder's files, where a file named like another's
    stem plus a label suffix (GlaS's train_1_anno.bmp beside train_1.bmp) is that image's label."""
    stems = {_stem(p) for p in paths}
    images, labels = [], {}
    for path in paths:
        stem = _stem(path)
        base = next((stem[:-len(s)] for s in LABEL_SUFFIXES if stem.endswith(s) and stem[:-len(s)] in stems), None)
        if base is None:
            images.append(path)
        else:
            labels[base] = path
    return images, labels


def labels_beside(image_dir):
    return bool(_split_labels_beside(list_images(image_dir))[1])


def label_files(folder):
    """{image stem: label path} of a label folder, or of an image folder holding its labels beside."""
    beside = _split_labels_beside(list_images(folder))[1]
    return beside or _labels_by_stem(folder)


def _labels_by_stem(label_dir):
    """Label paths by image stem: `a.png` and `a_mask.png` (any LABEL_SUFFIXES) both label image `a`."""
    paths = list_images(label_dir)
    labels = {_stem(p): p for p in paths}
    for path in paths:
        for suffix in LABEL_SUFFIXES:
            if _stem(path).endswith(suffix):
                labels.setdefault(_stem(path)[:-len(suffix)], path)
    return labels


def _pairs(image_dir, label_dir, split):
    images, beside = _split_labels_beside(list_images(image_dir))
    if label_dir and os.path.abspath(label_dir) != os.path.abspath(image_dir):
        labels = _labels_by_stem(label_dir)
    else:
        labels = beside or None
    samples = []
    for path in images:
        if labels is not None and _stem(path) not in labels:
            raise DataError(f"{path}: no label named {_stem(path)}.* in {label_dir or image_dir}")
        label = labels and labels[_stem(path)]
        samples.append(Sample(_stem(path), path, _reader(path), label and _label_reader(label), None, label))
    return samples


def _dsb2018(root, label_path, split):
    samples = []
    for name in sorted(os.listdir(root)):
        image_dir = os.path.join(root, name, "images")
        if not os.path.isdir(image_dir):
            continue
        image = list_images(image_dir)[0]
        mask_dir = os.path.join(root, name, "masks")
        masks = tuple(list_images(mask_dir)) if os.path.isdir(mask_dir) else None
        samples.append(Sample(name, image, _reader(image),
                              masks and (lambda m=masks: np.where(_numbered_masks(m) > 0, 255, 0).astype(np.uint8)),
                              masks and (lambda m=masks: _numbered_masks(m)), mask_dir))
    return samples


@functools.lru_cache(maxsize=1)  # a sample's label and instances come from one reading
def _numbered_masks(paths):
    """One instance image from one-object masks: mask i (in file order) -> i + 1, background 0."""
    instances = None
    for number, path in enumerate(paths, start=1):
        mask = label_to_classes(read_label_array(path), path)
        if instances is None:
            instances = np.zeros(mask.shape, np.int32)
        elif mask.shape != instances.shape:
            raise DataError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]}, the sample's other masks "
                            f"{instances.shape[1]}x{instances.shape[0]}")
        instances[mask > 0] = number
    return instances


def _voc(root, label_path, split):
    images = {_stem(p): p for p in list_images(os.path.join(root, "JPEGImages"))}
    label_dir = os.path.join(root, "SegmentationClass")
    split_file = os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")
    if split and os.path.isfile(split_file):
        with open(split_file) as f:
            names = [line.split()[0] for line in f if line.strip()]
    elif os.path.isdir(label_dir):
        names = [_stem(p) for p in list_images(label_dir)]
    else:
        names = list(images)
    samples = []
    for name in names:
        if name not in images:
            raise DataError(f"{root}: image {name} (listed in {split_file}) not in JPEGImages/")
        label = os.path.join(label_dir, name + ".png")
        has_label = os.path.isfile(label)
        samples.append(Sample(name, images[name], _reader(images[name]),
                              _label_reader(label) if has_label else None, None, label))
    return samples


def voc_split_exists(root, split):
    return os.path.isfile(os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt"))


def page_names(volume, count):
    """The names of a volume's pages: <stem>_00, <stem>_01 ..."""
    digits = max(2, len(str(count - 1)))
    return [f"{_stem(volume)}_{i:0{digits}d}" for i in range(count)]


def _guess_tiff_labels(volume):
    folder, name = os.path.split(volume)
    guess = os.path.join(folder, name.replace("volume", "labels"))
    return guess if guess != volume and os.path.isfile(guess) else None


def _tiff(volume, label_path, split):
    label_path = label_path or _guess_tiff_labels(volume)
    pages = read_tiff_stack(volume)
    labels = read_tiff_stack(label_path) if label_path else None
    if labels is not None and len(labels) != len(pages):
        raise DataError(f"{label_path}: {len(labels)} label pages for the {len(pages)} pages of {volume}")
    names = page_names(volume, len(pages))
    samples = []
    for i in range(len(pages)):
        source = f"{volume} page {i}"
        samples.append(Sample(names[i], source,
                              lambda i=i, source=source: image_from_array(pages[i], source),
                              None if labels is None else (lambda i=i: labels[i]), None, f"{label_path} page {i}",
                              (volume, i, len(pages))))
    return samples


def _nnunet(root, label_path, split):
    """nnU-Net's raw layout: a case's channels are <case>_0000 ... files in imagesTr (imagesTs unless
    `split` is train), its label <case> in labelsTr (labelsTs where there is one)."""
    description = nnunet_description(root)
    channels = len(description.get("channel_names") or description.get("modality") or {"0": ""})
    ending = description.get("file_ending", "")
    part = "Tr" if split == "train" else "Ts"
    image_dir = os.path.join(root, "images" + part)
    if not os.path.isdir(image_dir):
        raise DataError(f"{image_dir}: no such folder (nnU-Net layout; predict imagesTr with --split train)")
    cases = {}
    for path in list_images(image_dir):
        name = os.path.basename(path)
        stem = name[:-len(ending)] if ending and name.endswith(ending) else _stem(path)
        case, _, channel = stem.rpartition("_")
        if case and len(channel) == 4 and channel.isdigit() and name.endswith(ending):
            cases.setdefault(case, {})[int(channel)] = path
    label_dir = os.path.join(root, "labels" + part)
    samples = []
    for case, files in sorted(cases.items()):
        missing = [c for c in range(channels) if c not in files]
        if missing:
            raise DataError(f"{image_dir}: case {case} has no channel file {case}_{missing[0]:04d}{ending} "
                            f"(dataset.json lists {channels} channels)")
        paths = tuple(files[c] for c in range(channels))
        label = next((os.path.join(label_dir, case + suffix) for suffix in (ending, ".png", ".tif", ".tiff")
                      if suffix and os.path.isfile(os.path.join(label_dir, case + suffix))), None)
        samples.append(Sample(case, paths[0], lambda p=paths: _stack_channels(p),
                              label and _label_reader(label), None, label))
    return samples


def nnunet_description(root):
    """The dataset.json of an nnU-Net raw dataset (channel_names, labels, file_ending ...)."""
    path = os.path.join(root, "dataset.json")
    try:
        with open(path) as f:
            description = json.load(f)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable JSON file ({err})")
    if not isinstance(description, dict):
        raise DataError(f"{path}: not an nnU-Net dataset description (a JSON object)")
    return description


def _stack_channels(paths):
    """One H x W x C image from one file per channel (nnU-Net's _0000, _0001 ...)."""
    planes = [read_raw_image(path) for path in paths]
    for path, plane in zip(paths[1:], planes[1:]):
        if plane.shape != planes[0].shape:
            raise DataError(f"{path}: channel of shape {plane.shape}, its case's first channel {planes[0].shape}")
    return planes[0] if len(planes) == 1 else np.stack(planes, axis=-1)


def _cellpose_base(name, folder):
    """The image a Cellpose masks file belongs to (img.tif for img_masks.tif), or None."""
    stem, suffix = os.path.splitext(name)
    if not stem.endswith(CELLPOSE_MASKS) or suffix.lower() not in (".tif", ".tiff", ".png"):
        return None
    base = stem[:-len(CELLPOSE_MASKS)]
    return next((os.path.join(folder, base + s) for s in (".tif", ".tiff", ".png", suffix)
                 if os.path.isfile(os.path.join(folder, base + s))), None)


def _cellpose(folder, label_path, split):
    """Cellpose's layout: every image beside its numbered masks (img.tif, img_masks.tif)."""
    masks = {_cellpose_base(name, folder): os.path.join(folder, name) for name in os.listdir(folder)}
    masks.pop(None, None)
    samples = []
    for path in list_images(folder):
        if path in masks.values():
            continue
        label = masks.get(path)
        samples.append(Sample(_stem(path), path, _reader(path),
                              label and (lambda m=label: (_numbered_label(m) > 0).astype(np.uint8)),
                              label and (lambda m=label: _numbered_label(m)), label))
    return samples


@functools.lru_cache(maxsize=1)  # a sample's label and instances come from one reading
def _numbered_label(path):
    """A label image that numbers its objects (Cellpose's _masks), as int32; a binary one (0/255)
    numbers its connected regions."""
    array = read_raw_image(path)
    if array.ndim != 2 or array.dtype.kind not in "ui":
        raise DataError(f"{path}: masks of shape {array.shape} and type {array.dtype}, expected one "
                        f"channel of whole numbers (0 = background, 1, 2 ... = objects)")
    if len(np.unique(array)) <= 2:
        return connected_objects(array, connectivity=1).astype(np.int32)
    return array.astype(np.int32)


def read_sample_label(sample, image_shape, classes=1, ignore_index=255, instance_labels=False):
    """(class indices, raw values) of a sample's label, checked against the classes and its image's size."""
    raw = sample.read_label()
    label = label_to_classes(raw, sample.label_source, classes, ignore_index=ignore_index, instances=instance_labels)
    if label.shape != tuple(image_shape):
        raise DataError(f"{sample.label_source}: label is {label.shape[1]}x{label.shape[0]} "
                        f"but its image {sample.source} is {image_shape[1]}x{image_shape[0]}")
    return label, raw


def load_dataset(samples, classes=1, ignore_index=255, img_size=0, channels=None, instance_labels=False,
                 normalization=("auto", DEFAULT_PERCENTILES)):
    """Read, check and convert labelled samples into a SegmentationDataset.

    Images are normalized by `normalization` (method, percentiles); auto: dataloader.auto_normalization.
    Channels follow the data (RGB when any image is colour) unless `channels` is given;
    `img_size` > 0 resizes every pair to that square (labels by nearest neighbour);
    `instance_labels`: labels number the objects (GlaS), foreground is nonzero."""
    raw_images, labels, instances = [], [], []
    for sample in samples:
        if sample.read_label is None:
            raise DataError(f"{sample.source}: has no label")
        image = sample.read_image()
        label, raw = read_sample_label(sample, image.shape[:2], classes, ignore_index=ignore_index,
                                       instance_labels=instance_labels)
        raw_images.append(image)
        labels.append(label)
        instances.append(raw.astype(np.int32) if instance_labels else
                         (sample.read_instances() if sample.read_instances else None))
    method, percentiles = normalization
    method = auto_normalization(raw_images) if method == "auto" else method
    # normalized at the image's own size, then resized: as prediction does (predict_unet_test.py)
    images = [normalize(image, method, percentiles, s.source) for image, s in zip(raw_images, samples)]
    if img_size:
        size = (img_size, img_size)
        images = [resize(image, size) for image in images]
        labels = [resize(label, size, nearest=True) for label in labels]
        instances = [None if numbered is None else resize(numbered, size, nearest=True) for numbered in instances]
    channels = channels or max(channels_of(image) for image in images)
    if classes > 1 and not any(np.any((label > 0) & (label < classes)) for label in labels):
        raise DataError(f"{samples[0].source}: no label holds any class but 0 (and {ignore_index} = ignore): "
                        f"binary 0/255 masks? train them with --classes 1")
    return SegmentationDataset([match_channels(image, channels, s.source) for image, s in zip(images, samples)],
                               labels, classes=classes, names=[s.name for s in samples],
                               instances=instances if any(i is not None for i in instances) else None,
                               normalization=(method, tuple(percentiles)),
                               input_types=sorted({str(image.dtype) for image in raw_images}))


# ---- zarr stores, read lazily ----------------------------------------------------------------

def ngff_labels(path):
    """The first label image of an OME-Zarr image's labels/ group (NGFF), or None."""
    try:
        with open(os.path.join(path, "labels", ".zattrs")) as f:
            names = json.load(f).get("labels") or []
    except (OSError, ValueError, AttributeError):
        return None
    return os.path.join(path, "labels", names[0]) if names else None


def store_windows(shape):
    """(z, (y0, y1), (x0, x1)) of every window: each slice cut into equal parts of at most STORE_WINDOW."""
    def parts(length):
        n = -(-length // STORE_WINDOW)
        edges = [round(i * length / n) for i in range(n + 1)]
        return list(zip(edges[:-1], edges[1:]))
    slices, height, width = shape
    return [(z, rows, cols) for z in range(slices) for rows in parts(height) for cols in parts(width)]


def label_values(labels, windows):
    """The values a label store holds, read window by window (a bincount each: whole numbers)."""
    seen = np.zeros(1, bool)
    for z, (y0, y1), (x0, x1) in windows:
        window = labels.read(z, slice(y0, y1), slice(x0, x1))
        if window.dtype.kind not in "ui" or window.ndim != 2 or window.min() < 0:
            raise DataError(f"{labels.path}: labels of type {window.dtype}, shape {window.shape}: expected one channel "
                            f"of whole numbers >= 0")
        counts = np.bincount(window.ravel())
        seen = np.pad(seen, (0, max(0, len(counts) - len(seen))))
        seen[:len(counts)] |= counts > 0
    return np.flatnonzero(seen)


def load_store(path, label_path=None, classes=1, ignore_index=255, img_size=0, channels=None, instance_labels=False,
               normalization=("auto", DEFAULT_PERCENTILES)):
    """A zarr / OME-Zarr image and its label image as a SegmentationDataset whose arrays are read
    when training asks for them (dataloader.LazyArrays), so a store larger than memory trains: every
    slice cut into windows of at most STORE_WINDOW pixels (one sample each), normalized as its whole
    slice is when predicted block by block (volumes.slice_mappings), labels checked once, window by window."""
    if img_size:
        raise DataError(f"{path}: --img-size resizes whole images; a zarr store is trained at its own scale")
    image_store = Volume(path)
    label_path = label_path or ngff_labels(path)
    if not label_path:
        raise DataError(f"{path}: no labels: give LABEL_PATH (a zarr store of the same shape) or put them in "
                        f"its NGFF labels/ group")
    labels = Volume(label_path)
    if labels.shape != image_store.shape:
        raise DataError(f"{label_path}: labels of shape {labels.shape}, the image {path} {image_store.shape} "
                        f"(slices, height, width)")
    windows = store_windows(image_store.shape)
    values = np.zeros(0, int) if instance_labels else label_values(labels, windows)
    label_to_classes(values, label_path, classes, ignore_index=ignore_index,
                     instances=instance_labels)  # one line on a wrong value
    if classes > 1 and not np.any((values > 0) & (values < classes)):
        raise DataError(f"{label_path}: no label holds any class but 0 (and {ignore_index} = ignore): "
                        f"binary 0/255 masks? train them with --classes 1")
    method, percentiles = normalization
    method = auto_normalization([np.zeros(0, image_store.dtype)]) if method == "auto" else method
    @functools.lru_cache(maxsize=None)
    def slice_normalization(z):
        if method == "range" and image_store.dtype.kind in "ui":  # nothing to look at
            return 0, np.iinfo(image_store.dtype).max
        return normalization_of(slice_sample(image_store, z), method, percentiles, f"{path} slice {z}")
    channels = channels or image_store.channels

    def where(i):
        z, (y0, y1), (x0, x1) = windows[i]
        return z, slice(y0, y1), slice(x0, x1)

    def image(i):
        raw = image_store.read(*where(i))
        return match_channels(apply_normalization(raw, slice_normalization(where(i)[0])), channels, path)

    raw_labels = LazyArrays(lambda i: labels.read(*where(i)), len(windows))  # each window read once for both
    classes_of = lazy_map(lambda raw: label_to_classes(raw, label_path, classes, ignore_index=ignore_index,
                                                       instances=instance_labels),
                          raw_labels)
    shapes = [(y1 - y0, x1 - x0) + ((channels,) if channels > 1 else ()) for _, (y0, y1), (x0, x1) in windows]
    names = [f"z{z}-y{y0}-x{x0}" for z, (y0, _), (x0, _) in windows]
    return SegmentationDataset(
        LazyArrays(image, len(windows)), classes_of, classes=classes, names=names,
        instances=lazy_map(lambda raw: raw.astype(np.int32), raw_labels) if instance_labels else None,
        normalization=(method, tuple(percentiles)), input_types=[str(image_store.dtype)], shapes=shapes)
