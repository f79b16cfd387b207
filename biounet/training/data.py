"""The training data as a run reads it: the images and labels the flags point to, split for
validation, rescaled to their objects' size, with their targets, pixel weights and the sampler the
steps draw batches from.
"""
import os

import numpy as np

from biounet.data.datasets import detect_format, find_samples, labels_beside, load_dataset, load_store, voc_split_exists
from biounet.data.labels import connected_objects
from biounet.data.loader import Sampler, lazy_map, resize
from biounet.data.weightmap import weight_map
from biounet.evaluation.instances import (STANDARD_DIAMETER, median_diameter, object_class_names, object_classes,
                                          size_scale)
from biounet.model.checkpoint import load_checkpoint
from biounet.model.unet import MIN_SIDE, mirror_for_valid
from biounet.training.config import ConfigError


def read_data(flags, rng):
    """(layout, training set, validation set or None) as the flags point to them: read and checked,
    the validation set held out of the training pairs (--val-fraction) unless given or listed (VOC)."""
    fmt = detect_format(flags.data_path) if flags.data_format == "auto" else flags.data_format
    label_path = flags.label_path or labels_by_default(flags.data_path, fmt)
    voc_val = fmt == "voc" and voc_split_exists(flags.data_path, "val") and not flags.val_image_path

    def read(path, labels, data_format, split, channels=None, normalization=(flags.normalize, flags.percentiles)):
        reading = dict(classes=flags.classes, ignore_index=flags.ignore_index, img_size=flags.img_size,
                       channels=channels, instance_labels=flags.instance_labels, normalization=normalization)
        if (detect_format(path) if data_format == "auto" else data_format) == "zarr":
            return load_store(path, labels, **reading)
        return load_dataset(find_samples(path, data_format, labels, split), **reading)

    data = read(flags.data_path, label_path, fmt, "train", channels=channels_to_fine_tune(flags.init_from))
    if flags.val_image_path or voc_val:
        val_format = flags.data_format if flags.val_image_path else fmt
        val_labels = flags.val_label_path or (labels_by_default(flags.val_image_path, val_format)
                                              if flags.val_image_path else label_path)
        val = read(flags.val_image_path or flags.data_path, val_labels, val_format, "val", data.channels,
                   data.normalization)
        return fmt, data, val
    n_val = min(len(data) - 1, max(1, round(len(data) * flags.val_fraction))) if flags.val_fraction > 0 else 0
    order = rng.permutation(len(data))
    return fmt, data.subset(sorted(order[n_val:])), data.subset(sorted(order[:n_val])) if n_val else None


def labels_by_default(images, data_format):
    """For a folder of images (pairs) without labels inside it, the train_label folder beside it; else None."""
    if data_format == "auto":
        data_format = detect_format(images)
    if data_format == "pairs" and not labels_beside(images):
        return os.path.join(os.path.dirname(os.path.normpath(images)), "train_label")
    return None


def channels_to_fine_tune(checkpoint):
    """The channels the network at `checkpoint` takes (grey and RGB images are converted to them, as
    prediction converts them), or None: the data's own."""
    return load_checkpoint(checkpoint)[0]["model"]["n_channels"] if checkpoint else None


def at_object_size(flags, train_set, val_set):
    """(training set, validation set, the objects' diameter in them or 0): with --object-size, every
    image rescaled so that its objects' median diameter is the same, STANDARD_DIAMETER pixels for
    numbered objects, for other labels (cells between membranes) the training images' median.
    auto measures each image's objects: the numbered ones, else its labels' 4-connected regions;
    an image without any takes the training images' median. Unset: auto for numbered objects only."""
    wanted, numbered = flags.object_size, train_set.instances is not None
    if wanted == "off" or (wanted is None and (not numbered or flags.classes > 1 or flags.img_size)):
        return train_set, val_set, 0
    if flags.img_size:
        raise ConfigError("--img-size resizes every image to one square; --object-size rescales each image for its "
                          "objects: choose one")

    def measured(dataset):  # per image, or None where it has no objects
        if wanted not in (None, "auto"):
            return [wanted] * len(dataset)
        return [median_diameter(objects) for objects in numbered_objects(dataset)]
    train_diameters = measured(train_set)
    typical = float(np.median([d for d in train_diameters if d] or [STANDARD_DIAMETER]))
    standard = STANDARD_DIAMETER if numbered else round(typical)
    found = [d or typical for d in train_diameters]
    print(f"object size: objects {min(found):.0f}-{max(found):.0f} pixels wide (median {typical:.0f}), each image "
          f"rescaled to {standard} (--no-object-size: each at its own scale)")
    return (rescaled(train_set, found, standard),
            val_set and rescaled(val_set, [d or typical for d in measured(val_set)], standard), standard)


def rescaled(dataset, diameters, standard):
    """The dataset with each image, label and numbered objects resized so its objects are `standard` pixels wide."""
    shapes = [tuple(max(MIN_SIDE, round(side * size_scale(d, standard))) for side in shape[:2]) + tuple(shape[2:])
              for shape, d in zip(dataset.shapes, diameters)]

    def resized(arrays, nearest=False):
        return None if arrays is None else lazy_map(lambda a, shape: resize(a, shape[:2], nearest), arrays, shapes)
    return dataset.replaced(images=resized(dataset.images), labels=resized(dataset.labels, True),
                            instances=resized(dataset.instances, True), shapes=shapes)


def numbered_objects(dataset):
    """A dataset's numbered objects, or where it numbers none its labels' 4-connected regions (cells)."""
    return dataset.instances or lazy_map(lambda label: connected_objects(label, connectivity=1), dataset.labels)


def for_objects(dataset, target):
    """The dataset with the targets of a network for objects (instances.object_classes) as labels,
    from its numbered_objects."""
    numbered = numbered_objects(dataset)
    targets = lazy_map(lambda objects: object_classes(objects, target), numbered)
    return dataset.replaced(labels=targets, classes=len(object_class_names(target)), instances=numbered)


def pixel_weights(dataset, config):
    """The U-Net paper's weight map of each label (weightmap.py) when the config asks for it, else None."""
    if dataset is None or not config.weight_map:
        return None
    numbered = dataset.instances or [None] * len(dataset)
    return lazy_map(lambda label, n: weight_map(label, config.w0, config.sigma, n), dataset.labels, numbered)


def training_sampler(dataset, weights, config):
    """What the training steps draw from: random crops, augmented, with their pixel weights; for the
    unpadded net, of the images with borders mirrored as prediction mirrors them."""
    if config.padding == "valid":
        mirror = lambda arrays: None if arrays is None else lazy_map(mirror_for_valid, arrays)  # noqa: E731
        # the numbered objects are not mirrored: the weights (mirrored below) are all the sampler needs of them
        dataset = dataset.replaced(images=mirror(dataset.images), labels=mirror(dataset.labels), instances=None,
                                   shapes=None)
        weights = mirror(weights)
    return Sampler(dataset, config.crop, config.augment, weights)
