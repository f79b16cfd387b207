"""A training run's configuration, settled once: the flags plus what the data says become one frozen Config.

TrainUnetDataSet.py parses the flags and reads the data; `settle` fills in every setting left open
(the preset for the machine, training for objects, the crop for images of mixed sizes, the unpadded net's tile, the weight
map, the Dice term, the class weights, the score that picks best.npz), stops on contradictory
combinations with one line, and returns the Config that training, the checkpoints and the log use.
Nothing changes it afterwards.
"""
import textwrap
import types
from collections import namedtuple

import numpy as np

from biounet.data.augment import DEFAULT_PROBABILITIES
from biounet.data.loader import DEFAULT_PERCENTILES
from biounet.evaluation.instances import object_class_names
from biounet.model.backend import cores, precision_problem
from biounet.model.losses import median_frequency_weights
from biounet.model.unet import MIN_SIDE, VALID_MARGIN, smallest_side, valid_input_size

# Chosen for the machine the run is on (BENCHMARKS.md has the measurements). CPU: a base-16 net
# on 256x256 crops, one per step, for 30 minutes of training (OneFlow on 2 cores: about 50 epochs
# of the 30 ISBI slices, PyTorch many more); with batches of one crop, BatchNorm's running statistics
# fail on whole slices (V_rand 0.39 against 0.95), hence instance norm. GPU: the paper's base-64
# net on whole slices for 10 minutes, in epochs of 250 steps (nnU-Net's): one pass over 20 ISBI
# slices is 5 steps, a fraction of a second on a GPU, against seconds of validation (V_rand's
# watersheds run on the CPU). --epochs replaces the time budget.
PRESETS = {
    "cpu": dict(base=16, crop=256, batch_size=1, time_budget=30, lr=1e-3, norm="instance", steps_per_epoch=0),
    "gpu": dict(base=64, crop=0, batch_size=4, time_budget=10, lr=1e-3, norm="batch", steps_per_epoch=250),
}
# The paper's weight map beat the plain loss on ISBI membranes (V_rand and pixel error), but on
# DSB 2018 nuclei it cost 0.04 Dice (0.888 -> 0.848), and it is defined for one class only.
WEIGHT_MAP_FORMATS = ("pairs", "tiff")
# Trained for objects by default where the objects are numbered, touch, and are what gets scored.
INSTANCE_FORMATS = ("dsb2018", "cellpose")
ONE_CLASS_SCORES = ("val_loss", "val_pixel_error", "val_dice", "val_v_rand")
OBJECT_SCORES = ("val_map",)  # one class, objects numbered (DSB 2018 masks, --instance-labels, --instances)
SEVERAL_CLASS_SCORES = ("val_loss", "val_pixel_accuracy", "val_miou")

# What the data says, as TrainUnetDataSet.py read it: layout, channels, the image sizes, the
# smallest image (name, side), whether objects are numbered, pixels per class (several classes),
# whether there is a validation set, and the (method, percentiles) its images were normalized with.
DataFacts = namedtuple("DataFacts", "format channels sizes smallest numbered class_counts validation normalization "
                                   "object_size", defaults=(("range", DEFAULT_PERCENTILES), 0))


class ConfigError(ValueError):
    """Flags that contradict each other or the data; the message names the flag."""


class Config(types.SimpleNamespace):
    """The settled settings, read as attributes; assigning to one is an error."""

    def __setattr__(self, name, value):
        raise AttributeError(f"the configuration is settled: {name} cannot change")


def data_facts(data_format, train, val, object_size=0):
    """DataFacts of a training set (a dataloader.SegmentationDataset) and its validation set or None,
    whose objects were rescaled to `object_size` pixels wide (0: not rescaled)."""
    sides = [min(shape[:2]) for shape in train.shapes]
    smallest = int(np.argmin(sides))
    counts = None
    if train.classes > 1:
        counts = sum(np.bincount(label[label < train.classes].ravel(), minlength=train.classes)
                     for label in train.labels).tolist()
    return DataFacts(data_format, train.channels, sorted({shape[:2] for shape in train.shapes}),
                     (train.names[smallest], sides[smallest]), train.instances is not None, counts, val is not None,
                     train.normalization, object_size)


def settle(flags, data, device, backend_name, processes=1):
    """The complete Config of a run from the parsed flags (argparse.Namespace), the DataFacts, the
    device and the number of data-parallel processes; raises ConfigError on combinations that cannot work."""
    s = dict(vars(flags))
    if not flags.percentiles[0] < flags.percentiles[1]:
        raise ConfigError(f"--percentiles {flags.percentiles[0]:g} {flags.percentiles[1]:g}: the low percentile must "
                          f"be below the high one")
    s["preset"] = flags.preset if flags.preset != "auto" else ("gpu" if device.startswith("cuda") else "cpu")
    s["batch_size"] = _global_batch(flags.batch_size, PRESETS[s["preset"]]["batch_size"], processes)
    if s["time_budget"] and s["epochs"] is not None:
        raise ConfigError("--time-budget sets the number of epochs; give it or --epochs, not both")
    if s["epochs"] is None and s["time_budget"] is None:
        s["time_budget"] = PRESETS[s["preset"]]["time_budget"]
    if s["time_budget"]:
        s["epochs"] = 1  # planned after each epoch from the time it took (TrainUnetDataSet.planned_epochs)
    for key, value in PRESETS[s["preset"]].items():
        if s[key] is None and key != "time_budget":
            s[key] = value
    s.update(backend=backend_name, device=device, data_format=data.format, channels=data.channels,
             processes=processes, normalize=data.normalization[0], percentiles=tuple(data.normalization[1]),
             object_size=data.object_size)
    s["augment"] = types.MappingProxyType({name: s.pop(f"aug_{name}") for name in DEFAULT_PROBABILITIES})
    notes = []
    _check(s, data)
    if problem := precision_problem(s["amp"], device, backend_name):
        raise ConfigError(problem)
    s["crop"] = _training_crop(s, data, notes)
    if s["loader_workers"] is None:  # on a CPU the cores compute the steps; on CUDA they are free for the data
        s["loader_workers"] = max(0, cores() // processes - 1) if device.startswith("cuda") else 0
    if s["instances"] is None:
        s["instances"] = s["classes"] == 1 and data.format in INSTANCE_FORMATS and not s["weight_map"]
    names = object_class_names(s["object_target"])
    s["outputs"] = len(names) if s["instances"] else s["classes"]  # channels the network predicts
    if s["instances"]:
        notes.append(f"trained for objects: classes {', '.join(names)} (--no-instances: one class)")
    if s["weight_map"] is None:
        s["weight_map"] = s["classes"] == 1 and data.format in WEIGHT_MAP_FORMATS and not s["instances"]
    if s["dice_weight"] is None:
        s["dice_weight"] = 1.0 if s["outputs"] > 1 else 0.0
    s["class_weights"] = _class_weights(s["class_weights"], s["classes"], data.class_counts)
    s["best_metric"] = _best_metric(s["best_metric"], s["classes"], s["instances"], data)
    return Config(**s, notes=tuple(notes))


def _check(s, data):
    several = s["classes"] > 1
    if s["instance_labels"] and several:
        raise ConfigError("--instance-labels numbers objects of one class: it needs --classes 1")
    if s["instances"] and several:
        raise ConfigError("--instances trains objects of one class: it needs --classes 1")
    if s["instances"] and s["weight_map"]:
        raise ConfigError("--weight-map weighs the one-class loss; --instances trains three classes "
                          "(background, interior, boundary) that separate objects already: choose one")
    if s["weight_map"] and several:
        raise ConfigError(f"--weight-map separates objects of one class; with --classes {s['classes']} "
                          f"weigh the classes with --class-weights instead")
    if s["class_weights"] and not several:
        raise ConfigError("--class-weights weighs several classes: it needs --classes 2 or more")
    if s["val_label_path"] and not s["val_image_path"]:
        raise ConfigError("--val-label-path labels the images of --val-image-path: give both")
    name, side = data.smallest
    if s["padding"] == "same" and side < smallest_side(s["norm"]):
        raise ConfigError(f"{name}: image smaller than {smallest_side(s['norm'])} pixels a side, the least the "
                          f"U-Net takes with {s['norm']} norm: train with --img-size {MIN_SIDE} or more")


def _global_batch(given, preset, processes):
    """The batch of one step over all processes, each taking an equal share: --batch-size, or the
    preset's rounded up to a multiple of the processes."""
    if given is None:
        return -(-preset // processes) * processes
    if given % processes:
        raise ConfigError(f"--batch-size {given}: the batch of a step is shared equally by the {processes} "
                          f"processes; give a multiple of {processes}")
    return given


def _training_crop(s, data, notes):
    """The side of the training crops: --crop or the preset's; for images of several sizes in
    batches of more than one, the largest crop all of them hold; for the unpadded net, the tile
    whose output covers the crop less its lost margins."""
    crop = s["crop"]
    if len(data.sizes) > 1 and not crop and s["batch_size"] > 1:
        crop = min(min(size) for size in data.sizes) // 16 * 16
        notes.append(f"images of {len(data.sizes)} sizes: batches of random {crop}x{crop} crops "
                     f"(--crop or --img-size to choose)")
    if s["padding"] == "valid" and crop:
        tile = valid_input_size(max(crop - 2 * VALID_MARGIN, 1))
        notes.append(f"unpadded U-Net: training tiles of {tile} pixels give {tile - 2 * VALID_MARGIN}")
        crop = tile
    return crop


def _class_weights(spec, classes, counts):
    """None, or one weight per class: listed ("1,2,2") or "auto" (median frequency balancing)."""
    if not spec:
        return None
    if spec == "auto":
        return tuple(round(float(w), 6) for w in median_frequency_weights(counts))
    try:
        weights = tuple(float(w) for w in spec.split(","))
    except ValueError:
        raise ConfigError(f"--class-weights {spec!r}: expected numbers separated by commas, or auto")
    if len(weights) != classes or not all(0 <= w < float("inf") for w in weights):
        raise ConfigError(f"--class-weights {spec!r}: expected {classes} weights (one per class), each >= 0")
    return weights


def _best_metric(name, classes, instances, data):
    scores = ONE_CLASS_SCORES if classes == 1 else SEVERAL_CLASS_SCORES
    if name == "auto":
        if not data.validation:
            return "train_loss"
        if classes > 1:
            return "val_miou"
        if instances:
            return "val_map"
        return "val_dice" if data.format == "dsb2018" else "val_v_rand"
    if not data.validation:
        raise ConfigError(f"--best-metric {name}: there is no validation set (--val-fraction 0)")
    if name in OBJECT_SCORES and classes == 1 and not (data.numbered or instances):
        raise ConfigError(f"--best-metric {name} scores numbered objects: the labels number none (DSB 2018 "
                          f"masks/ folders or --instance-labels do; with --instances, their 4-connected regions)")
    if name not in scores + (OBJECT_SCORES if classes == 1 else ()):
        raise ConfigError(f"--best-metric {name} is not scored with --classes {classes}: choose one of "
                          f"{', '.join(scores)}")
    return name


def as_dict(config):
    """The Config as plain JSON-ready values (for the checkpoint and the JSON log)."""
    return {k: dict(v) if isinstance(v, types.MappingProxyType) else list(v) if isinstance(v, tuple) else v
            for k, v in vars(config).items()}


def describe(config):
    """The Config in full, for the log: every setting, then why the derived ones are what they are."""
    settings = ", ".join(f"{k}={v}" for k, v in sorted(as_dict(config).items()) if k != "notes")
    lines = textwrap.wrap(settings, 110, initial_indent="config: ", subsequent_indent="  ")
    return "\n".join(lines + list(config.notes))
