"""Train the U-Net on a dataset of any layout datasets.py reads; keeps the best and the last checkpoint.

    python TrainUnetDataSet.py                                # ISBI folders, preset for this machine
    python TrainUnetDataSet.py --epochs 40 --batch-size 4 --base 64
    python TrainUnetDataSet.py --resume                       # go on from checkpoints/last.npz
    python TrainUnetDataSet.py --data-path stage1_train       # DSB 2018 nuclei, RGB
    python TrainUnetDataSet.py --data-path VOC2012 --classes 21 --img-size 256
    python TrainUnetDataSet.py --data-path volume.ome.zarr    # its labels/ group; read window by window
    UNET_BACKEND=torch python TrainUnetDataSet.py             # same code on PyTorch

The flags and what the data says are settled once into the run's configuration (config.py), printed
at the start and stored in every checkpoint. Every epoch prints (and tees into the log) one line:
the training loss, and on held-out images the validation loss (the same loss), pixel error, Dice and
the ISBI challenge's V_rand (several classes: pixel accuracy and mean IoU), and the time; the same
goes as one JSON line into Unet_train.jsonl, and progress.png is redrawn. `python3 plot.py` draws
the curves.
"""
import argparse
import math
import os
import signal
import sys
import time

import numpy as np
from tqdm import tqdm

import backend
from backend import flow
from augment import DEFAULT_PROBABILITIES
from checkpoint import (CheckpointError, RunFolder, input_normalization, load_checkpoint, load_weights, model_weights,
                        restore_optimizer, update_meta)
from cli import ArgumentParser, file_to_write, folder_to_write, object_size_flags, probability, ranged
from config import (OBJECT_SCORES, ONE_CLASS_SCORES, PRESETS, Config, ConfigError, as_dict, data_facts, describe,
                    settle)
from curves import plot_curves, read_log
from dataloader import (DEFAULT_PERCENTILES, NORMALIZATIONS, BatchLoader, SegmentationDataset, Sampler, intensity_levels,
                        lazy_map, pick, resize)
from datasets import FORMATS, detect_format, find_samples, labels_beside, load_dataset, load_store, voc_split_exists
from files import DataError
from inference import best_threshold, scores_v_rand, threshold_errors, validate
from instances import (OBJECT_TARGETS, STANDARD_DIAMETER, connected_objects, median_diameter, object_class_names,
                       object_classes, size_scale)
from log import Logger, append_json, json_log_path
from losses import learning_rate, segmentation_loss
from processes import WorkersDied, die_with_parent
from unet import MIN_SIDE, NORMS, PADDINGS, UNet, mirror_for_valid
from weightmap import weight_map


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    for add_flags in (data_flags, schedule_flags, network_flags, loss_flags, run_flags):
        add_flags(p)
    return p.parse_args(argv)


def data_flags(p):
    """What to train on, how to read it and what to predict."""
    p = p.add_argument_group("data")
    p.add_argument("--data-path", "--data_path", default="train_image",
                   help="training images: a folder (labels in --label-path), a DSB 2018 stage1_train folder, "
                        "a VOC root, an nnU-Net or Cellpose dataset, a TIFF volume, or a zarr / OME-Zarr store "
                        "(read window by window, never whole)")
    p.add_argument("--label-path", "--label_path",
                   help="labels matched to images by file name (255 = cell, 0 = membrane), or the labels' TIFF; "
                        "default: train_label/, or for a TIFF volume its name with 'volume' -> 'labels', or for "
                        "an OME-Zarr image its NGFF labels/ group")
    p.add_argument("--data-format", choices=("auto",) + FORMATS, default="auto",
                   help="layout of --data-path (datasets.py); auto: detected")
    p.add_argument("--val-image-path", help="validation data (any layout), instead of holding out --val-fraction")
    p.add_argument("--val-label-path", help="validation labels (with --val-image-path, for folders and TIFFs)")
    p.add_argument("--val-fraction", type=ranged(float, 0, below=1), default=0.1,
                   help="share of the training pairs held out for validation (0: none; VOC uses its val list)")
    p.add_argument("--classes", type=ranged(int, 1, 255), default=1,
                   help="1: one class against background (sigmoid); N > 1: softmax over class indices 0..N-1")
    p.add_argument("--instance-labels", action="store_true",
                   help="labels number the objects 1, 2, ... (GlaS's *_anno.bmp): nonzero = object, and the "
                        "weight map separates the numbered objects")
    p.add_argument("--instances", action=argparse.BooleanOptionalAction,
                   help="train for objects: background and classes of object pixels (--object-target) from the "
                        "numbered objects (or the labels' 4-connected regions), so that touching objects come apart; "
                        "default: on for DSB 2018 data")
    p.add_argument("--object-target", choices=OBJECT_TARGETS, default="touching",
                   help="--instances: what the network learns of objects: background, interior and a boundary "
                        "class of every object's outer 2 pixels (boundary) or only where an object comes within 2 "
                        "pixels of another (touching), or background and 4 levels of the distance to the object's "
                        "edge (distance); for touching and distance, prediction seeds objects at the interiors "
                        "(instances.py; touching measured best on DSB 2018: BENCHMARKS.md)")
    p.add_argument("--ignore-index", type=ranged(int, 0, 255), default=255, help="label value left out of loss and scores (classes > 1)")
    p.add_argument("--class-weights", help="classes > 1: cross-entropy weights, e.g. 1,2,2, or 'auto' "
                                           "(median frequency balancing on the training labels)")
    p.add_argument("--normalize", choices=("auto",) + NORMALIZATIONS, default="auto",
                   help="image intensities for the network, per image and channel: percentile (the --percentiles "
                        "mapped to 0 and 1, as StarDist and Cellpose do), zscore, or range (divided by the type's "
                        "largest value); auto: range for 8-bit images, else percentile. Prediction does the same")
    p.add_argument("--percentiles", type=ranged(float, 0, 100), nargs=2, default=DEFAULT_PERCENTILES,
                   metavar=("LOW", "HIGH"), help="--normalize percentile: the percentiles mapped to 0 and 1")
    object_size_flags(p, f"auto: measured on each image's objects, and every image rescaled so that they are as wide "
                         f"as the training images' median ({STANDARD_DIAMETER} pixels for numbered objects), as "
                         f"prediction then rescales new images (instances.py); default: auto where the labels number "
                         f"their objects (DSB 2018, Cellpose, --instance-labels), else each image at its own scale",
                      default=None)
    p.add_argument("--img-size", type=ranged(int, MIN_SIDE, also=(0,)), default=0,
                   help="resize every image to this square for training, and for prediction (0: keep sizes; "
                        "predictions come back at each image's own size)")


def schedule_flags(p):
    """How long and how fast: the preset, epochs, batches, the optimizer."""
    p = p.add_argument_group("schedule")
    p.add_argument("--preset", choices=["auto", "cpu", "gpu"], default="auto",
                   help="defaults for the flags below: auto = gpu on CUDA, else cpu; %s" % PRESETS)
    p.add_argument("--epochs", type=ranged(int, 1),
                   help="epochs to train: passes over the training images, or of --steps-per-epoch steps "
                        "(default: as many as fit --preset's time budget)")
    p.add_argument("--time-budget", type=ranged(float, 0.1), metavar="MINUTES",
                   help="instead of --epochs: as many epochs as end training after MINUTES (measured as it goes; "
                        "the learning-rate schedule follows; start-up and calibration come on top)")
    p.add_argument("--batch-size", "--batch_size", type=ranged(int, 1), help="images per step (default: from --preset)")
    p.add_argument("--steps-per-epoch", type=ranged(int, 0),
                   help="steps of an epoch, drawing the training pairs in a new random order each pass over them "
                        "(0: one pass over the pairs) (default: from --preset)")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                   help="Adam, or the paper's SGD with high momentum")
    p.add_argument("--momentum", type=ranged(float, 0, below=1), default=0.99, help="SGD momentum (the paper's 0.99)")
    p.add_argument("--lr", type=ranged(float, 0), help="learning rate at the start (default: from --preset)")
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                   help="learning rate over the epochs: cosine decay to lr/100, or constant")


def network_flags(p):
    """The U-Net and what it sees of each image."""
    p = p.add_argument_group("network")
    p.add_argument("--base", type=ranged(int, 1, 1024), help="channels of the first level (64 = the paper's U-Net) (default: from --preset)")
    p.add_argument("--crop", type=ranged(int, MIN_SIDE, also=(0,)), help="train on random crops of this size (0: whole images) (default: from --preset)")
    p.add_argument("--bilinear", action="store_true", help="bilinear upsampling instead of transposed convs")
    p.add_argument("--norm", choices=NORMS, help="normalization layers of the U-Net (default: from --preset)")
    p.add_argument("--padding", choices=PADDINGS, default="same",
                   help="valid: the paper's unpadded U-Net (572 -> 388), trained on mirrored tiles")
    p.add_argument("--dropout", type=ranged(float, 0, below=1), default=0.0, help="dropout at the end of the contracting path")


def loss_flags(p):
    """The loss, the augmentations, the decision threshold, and what picks best.npz."""
    p = p.add_argument_group("loss and checkpoints")
    p.add_argument("--dice-weight", type=ranged(float, 0),
                   help="weight of a soft-Dice term added to the cross-entropy (default 0 with one class, 1 with more)")
    p.add_argument("--weight-map", action=argparse.BooleanOptionalAction,
                   help="weight the loss per pixel as the U-Net paper does (weightmap.py), to separate cells; "
                        "default: on for one class in image folders and TIFFs (EM membranes), off otherwise")
    p.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                   help="after training, move the 0.5 decision to the threshold that fits the training images best")
    p.add_argument("--w0", type=ranged(float, 0), default=10.0, help="weight-map border weight")
    p.add_argument("--sigma", type=ranged(float, 0.1), default=5.0, help="weight-map border width, pixels")
    for name, default in DEFAULT_PROBABILITIES.items():
        p.add_argument(f"--aug-{name}", type=probability, default=default,
                       help=f"probability of the {name} augmentation (augment.py)")
    p.add_argument("--best-metric", default="auto",
                   choices=["auto", "val_v_rand", "val_dice", "val_pixel_error", "val_loss", "val_miou",
                            "val_pixel_accuracy", "val_map"],
                   help="validation score that picks best.npz; auto: val_miou with classes > 1, val_dice for "
                        "DSB 2018 nuclei, else the ISBI V_rand (train_loss when there is no validation set); "
                        "val_map: the DSB 2018 object score, where labels number objects")
    p.add_argument("--val-every", type=ranged(int, 1), default=1,
                   help="validate (and so pick best.npz) every N epochs and after the last")
    p.add_argument("--patience", type=ranged(int, 0), default=0,
                   help="stop after this many epochs without a better --best-metric (0: never)")


def run_flags(p):
    """Where it runs and what it writes."""
    p = p.add_argument_group("run")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--amp", choices=backend.PRECISIONS, default="off",
                   help="mixed precision of the forward pass: bf16 or fp16 (with loss scaling) on CUDA; "
                        "bf16 also on a CPU with PyTorch. Validation stays float32")
    p.add_argument("--seed", type=ranged(int, 0), default=0, help="the same seed gives the same run")
    p.add_argument("--loader-workers", type=ranged(int, 0, 64),
                   help="processes preparing the next batches (crops, augmentation, weight maps) while a step "
                        "runs; the same weights whatever the number (default: on CUDA the cores the training "
                        "processes leave, on a CPU 0, where the cores compute)")
    p.add_argument("--checkpoint-dir", type=folder_to_write, default="checkpoints", help="where best.npz and last.npz go")
    p.add_argument("--resume", action="store_true", help="continue from CHECKPOINT_DIR/last.npz")
    p.add_argument("--log-file", "--log", dest="log", type=file_to_write, default="Unet_train.txt",
                   help="human-readable training log; one JSON line per epoch goes beside it (.jsonl), read by plot.py")
    p.add_argument("--progress", type=file_to_write, default="progress.png",
                   help="picture of the curves so far, redrawn after every epoch ('' : none)")


def read_data(flags, rng):
    """(layout, training set, validation set or None) as the flags point to them: read and checked,
    the validation set held out of the training pairs (--val-fraction) unless given or listed (VOC)."""
    fmt = detect_format(flags.data_path) if flags.data_format == "auto" else flags.data_format
    label_path = flags.label_path or ("train_label" if fmt == "pairs" and not labels_beside(flags.data_path) else None)
    voc_val = fmt == "voc" and voc_split_exists(flags.data_path, "val") and not flags.val_image_path

    def read(path, labels, data_format, split, channels=None, normalization=(flags.normalize, flags.percentiles)):
        if (detect_format(path) if data_format == "auto" else data_format) == "zarr":
            return load_store(path, labels, flags.classes, flags.ignore_index, flags.img_size, channels,
                              flags.instance_labels, normalization)
        return load_dataset(find_samples(path, data_format, labels, split), flags.classes, flags.ignore_index,
                            flags.img_size, channels, flags.instance_labels, normalization)

    data = read(flags.data_path, label_path, fmt, "train")
    if flags.val_image_path or voc_val:
        val_format = flags.data_format if flags.val_image_path else fmt
        val = read(flags.val_image_path or flags.data_path, flags.val_label_path or label_path, val_format, "val",
                   data.channels, data.normalization)
        return fmt, data, val
    n_val = min(len(data) - 1, max(1, round(len(data) * flags.val_fraction))) if flags.val_fraction > 0 else 0
    order = rng.permutation(len(data))
    return fmt, data.subset(sorted(order[n_val:])), data.subset(sorted(order[:n_val])) if n_val else None


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
    return SegmentationDataset(resized(dataset.images), resized(dataset.labels, True), dataset.classes, dataset.names,
                               resized(dataset.instances, True), dataset.normalization, dataset.input_types, shapes)


def numbered_objects(dataset):
    """A dataset's numbered objects, or where it numbers none its labels' 4-connected regions (cells)."""
    return dataset.instances or lazy_map(lambda label: connected_objects(label, connectivity=1), dataset.labels)


def for_objects(dataset, target):
    """The dataset with the targets of a network for objects (instances.object_classes) as labels,
    from its numbered_objects."""
    numbered = numbered_objects(dataset)
    targets = lazy_map(lambda objects: object_classes(objects, target), numbered)
    return SegmentationDataset(dataset.images, targets, len(object_class_names(target)),
                               dataset.names, numbered, dataset.normalization, dataset.input_types, dataset.shapes)


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
        dataset = SegmentationDataset(mirror(dataset.images), mirror(dataset.labels), dataset.classes, dataset.names,
                                      normalization=dataset.normalization)
        weights = mirror(weights)
    return Sampler(dataset, config.crop, config.augment, weights)


def validate_share(model, val_set, weights, config, class_weights, rank, processes):
    """inference.validate, the images shared over the processes with one class (its scores are means
    over images, so the shares' sums give the same result); with several classes every process
    validates all images (mean IoU comes from one confusion matrix)."""
    if processes == 1 or config.classes > 1:
        return validate(model, val_set, weights, config, class_weights, config.device)
    mine = list(range(rank, len(val_set), processes))
    scores = validate(model, val_set.subset(mine), pick(weights, mine),
                      config, class_weights, config.device) if mine else {}
    names = [name for name in ONE_CLASS_SCORES if name != "val_v_rand" or scores_v_rand(config, val_set)]
    names += OBJECT_SCORES if val_set.instances is not None else ()
    sums = backend.all_sum([scores.get(name, 0.0) * len(mine) for name in names], config.device, processes)
    return {name: total / len(val_set) for name, total in zip(names, sums)}


def improves(value, best, metric):
    if best is None:
        return True
    return value < best if metric.endswith(("loss", "error")) else value > best


class TrainingError(RuntimeError):
    """Training cannot go on (a diverged loss, nothing left to do); the message says why."""


class StopRequest:
    """The first SIGINT or SIGTERM asks training to stop after the current step, with last.npz written;
    a second one stops at once (the checkpoints on disk stay whole: they are written atomically)."""

    def __init__(self):
        self.signal = None
        self.handlers = {number: signal.signal(number, self._request) for number in (signal.SIGINT, signal.SIGTERM)}

    def restore(self):
        for number, handler in self.handlers.items():
            signal.signal(number, handler)

    def _request(self, number, frame):
        self.signal = number
        signal.signal(number, signal.default_int_handler if number == signal.SIGINT else signal.SIG_DFL)

    def stop(self, where):
        number = self.signal or signal.SIGTERM  # a data-parallel process may stop for another's signal
        print(f"stopped by {signal.Signals(number).name} {where}; continue with --resume")
        sys.exit(128 + number)


def check_loss(loss, first_loss, epoch, step, lr):
    """Stop on a loss that is not finite or has grown a thousandfold: the weights would be garbage."""
    if math.isfinite(loss) and (first_loss is None or loss <= 1000 * max(first_loss, 1e-3)):
        return
    start = "" if first_loss is None else f" (first step: {first_loss:.4g})"
    raise TrainingError(f"training loss {loss:.4g} at epoch {epoch + 1}, step {step + 1}{start}: training "
                        f"diverged; try a lower --lr than {lr:g}. Checkpoints of finished epochs are kept as they were")


def resume(path, model, optimizer, rng, config):
    """Load the run saved in `path` into model, optimizer and rng; returns (epochs done, best score,
    epochs without a better one, the position inside a stopped epoch or None, seconds trained so far)."""
    meta, weights, arrays = load_checkpoint(path)
    if meta["model"] != model.config():
        raise CheckpointError(f"{path}: model {meta['model']} differs from the flags' {model.config()}")
    written = meta.get("config", meta.get("args"))
    written_with = written.get("optimizer", "adam") if isinstance(written, dict) else None
    if written_with != config.optimizer:
        raise CheckpointError(f"{path}: written with --optimizer {written_with}; resume with the same")
    trained_on = input_normalization(meta)
    if trained_on != (config.normalize, config.percentiles):
        raise CheckpointError(f"{path}: trained on images normalized by {trained_on[0]} {trained_on[1]}, these by "
                              f"{config.normalize} {config.percentiles}: resume with the same --normalize")
    target = meta.get("data", {}).get("object_target", "boundary")  # (the only target before there were three)
    if config.instances and target != config.object_target:
        raise CheckpointError(f"{path}: trained for --object-target {target}; resume with the same")
    load_weights(model, weights, path)
    restore_optimizer(optimizer, meta, arrays, path)
    try:
        epochs_done, best, stale = int(meta["epoch"]), meta["best"], int(meta.get("stale_epochs", 0))
        partial = meta.get("partial")
        rng.bit_generator.state = meta["rng"]
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: holds no usable training state to resume ({type(err).__name__})")
    if epochs_done >= config.epochs and not partial and not config.time_budget:
        raise TrainingError(f"{path} has trained {epochs_done} epochs already: ask for more with --epochs")
    seconds = float(meta.get("trained_seconds", 0.0))
    if config.time_budget and not partial and config.time_budget * 60 - seconds < seconds / max(1, epochs_done):
        raise TrainingError(f"{path} has trained {seconds / 60:.1f} minutes of --time-budget {config.time_budget:g}, "
                            f"and an epoch does not fit in what is left: give a larger budget to train on")
    print(f"resumed from {path} after epoch {epochs_done}" + (f", step {partial['step']}" if partial else ""))
    return epochs_done, best, stale, partial, seconds


def calibrate(model, checkpoints, train_set, config, rank, processes):
    """Record in each checkpoint (path, its weights) the output shift that puts probability 0.5 on
    the threshold with the best pixel accuracy on the training images. Weighted losses (--weight-map)
    bias the network towards membranes; this moves its decision back (V_rand's sweep is unaffected).
    Every process sweeps its share of the images (the shares' sums are the sweep of all); rank 0 writes."""
    mine = train_set.subset(range(rank, len(train_set), processes))
    for path, weights in checkpoints:
        load_weights(model, weights, path)
        model.eval()
        errors = backend.all_sum(threshold_errors(model, mine, config.device).tolist(), config.device, processes)
        threshold, error, error_at_half = best_threshold(np.array(errors) / len(train_set))
        if rank == 0:
            update_meta(path, output_shift=float(np.log(threshold / (1 - threshold))), calibrated_threshold=threshold)
        print(f"calibrated {path}: cell threshold {threshold:.2f} on the training images "
              f"(pixel error there {error:.4f}, {error_at_half:.4f} at 0.5)")


def report_epoch(epoch, scores, lr, seconds, improved, config):
    """The epoch's line in the log, its JSON line beside it, and progress.png redrawn. Run by the
    checkpoint folder's writer thread after the epoch's checkpoints are written: off the steps' path,
    and a line in the log means its epoch is on disk."""
    print(f"epoch {epoch + 1}/{config.epochs} " + " ".join(f"{k} {v:.4f}" for k, v in scores.items())
          + f" time {seconds:.1f}s" + (" *best" if improved else ""))
    append_json(json_log_path(config.log), dict(epoch=epoch + 1, epochs=config.epochs, **scores, lr=lr,
                                                time=round(seconds, 2), best=improved))
    if not config.progress:
        return
    try:
        plot_curves(read_log(json_log_path(config.log)), config.progress)
    except (OSError, ValueError) as err:  # a picture must not stop training
        print(f"warning: {config.progress} not drawn ({err})", file=sys.stderr)


def prepare(flags, processes):
    """(config, rng, training set, validation set or None): the data read, the configuration settled
    from the flags, the data and the number of processes, printed, and logged as the run's first JSON line."""
    device = backend.resolve_device(flags.device)
    backend.seed_everything(flags.seed)
    rng = np.random.default_rng(flags.seed)
    data_format, train_set, val_set = read_data(flags, rng)
    train_set, val_set, object_size = at_object_size(flags, train_set, val_set)
    config = settle(flags, data_facts(data_format, train_set, val_set, object_size), device, backend.NAME, processes)
    if config.instances:
        train_set, val_set = (for_objects(train_set, config.object_target),
                              val_set and for_objects(val_set, config.object_target))
    print(describe(config))
    if note := backend.cpu_speed_note(device, "bash train.sh", "trains 5-7x faster"):
        print(note)
    print(f"data: {len(train_set)} training pairs from {config.data_path} ({data_format}, "
          f"{config.channels} channel{'s' if config.channels > 1 else ''}, {config.classes} "
          f"class{'es' if config.classes > 1 else ''}, normalized by {config.normalize})"
          f", {len(val_set) if val_set else 0} for validation")
    if processes > 1:
        print(f"data parallel: {processes} processes, each {config.batch_size // processes} of the "
              f"{config.batch_size} images of a step, learning rate {config.lr:g} for the whole step")
    if flags.log:
        append_json(json_log_path(config.log), dict(event="resumed" if config.resume else "run", command=sys.argv,
                                                    time=time.strftime("%Y-%m-%d %H:%M:%S"), config=as_dict(config)))
    return config, rng, train_set, val_set


def build_network(config):
    """The U-Net and its optimizer as the configuration describes them."""
    model = UNet(n_channels=config.channels, n_classes=config.outputs, bilinear=config.bilinear, base=config.base,
                 norm=config.norm, padding=config.padding, dropout=config.dropout).to(config.device)
    if config.optimizer == "sgd":
        return model, flow.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    return model, flow.optim.Adam(model.parameters(), lr=config.lr)


def checkpoint_writer(folder, model, optimizer, rng, config, train_set, rank):
    """save(path, epoch, best, stale, with_optimizer=True, **more): the checkpoint of the run so far,
    written by rank 0 alone, with what --resume and prediction need to know of the run (a network
    trained on images divided by their type's range also keeps their types and intensity levels, so
    that prediction can map images of other types onto them: checkpoint.network_input)."""
    data = dict(format=config.data_format, img_size=config.img_size, ignore_index=config.ignore_index,
                instance_labels=config.instance_labels, instances=config.instances, object_size=config.object_size,
                object_target=config.object_target, normalize=config.normalize, percentiles=config.percentiles)
    if config.normalize == "range":
        data.update(input_types=train_set.input_types, input_levels=intensity_levels(train_set.images, config.percentiles))
    run = dict(best_metric=config.best_metric, input_scale=1.0, config=as_dict(config), data=data)

    def save(path, epoch, best, stale, with_optimizer=True, **more):
        if rank == 0:
            folder.save(path, model, optimizer if with_optimizer else None, **{
                **run, "epoch": epoch, "best": best, "stale_epochs": stale, "rng": rng.bit_generator.state, **more})
    return save


def planned_epochs(config, epochs_done, epochs_run, seconds, rank, processes, seconds_before=0.0):
    """The Config with as many epochs as fit --time-budget: those done, and as many more as the time
    left holds at the mean time of the `epochs_run` epochs this run took `seconds` for (after
    `seconds_before` of the run it resumed; all processes take rank 0's plan). The cosine schedule follows the plan."""
    left = config.time_budget * 60 - seconds_before - seconds
    more = max(0, int(left // (seconds / epochs_run))) if rank == 0 else 0
    more = int(backend.all_sum([float(more)], config.device, processes)[0])
    return Config(**{**vars(config), "epochs": epochs_done + more})


def set_learning_rate(optimizer, epoch, config):
    lr = learning_rate(epoch, config)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def epoch_plan(partial, rng, pairs, draws=0):
    """(order of the pairs, first step, losses so far) of an epoch: a new permutation (with `draws`,
    as many permutations one after the other as give that many pairs), or for an epoch stopped midway
    (`partial`, from --resume) the same order from the next step on."""
    if partial:
        return np.array(partial["order"]), partial["step"], partial["losses"]
    if not draws:
        return rng.permutation(pairs), 0, []
    return np.concatenate([rng.permutation(pairs) for _ in range(-(-draws // pairs))])[:draws], 0, []


def step_batches(order, first_step, steps, epoch, config, rank, processes):
    """(this process's pairs, seed) of each step from `first_step`: the seed of a pair's crop and
    augmentation is (seed, epoch), and the step too where an epoch may draw a pair twice (--steps-per-epoch)."""
    for step in range(first_step, steps):
        indices = order[step * config.batch_size:(step + 1) * config.batch_size][rank::processes]
        yield indices, (config.seed, epoch) + ((step,) if config.steps_per_epoch else ())


def step_loss(net, batch, config, class_weights, stop, processes):
    """(loss tensor of this process's share of a batch, the step's mean loss over the processes,
    whether any process was asked to stop): one exchange per step, so every process agrees."""
    images, labels, weights = batch
    with backend.autocast(config.device, config.amp):
        logits = net(backend.to_tensor(images, config.device))
    loss = segmentation_loss(logits.float(), labels, weights, config, class_weights, config.device)
    loss_sum, stops = backend.all_sum([loss.item(), float(bool(stop.signal))], config.device, processes)
    return loss, loss_sum / processes, stops > 0


def apply_gradients(optimizer, scaler, loss):
    optimizer.zero_grad()
    if scaler:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def train(flags, folder, stop, rank=0, processes=1):
    """The run the flags ask for, into the RunFolder `folder`; `stop` (a StopRequest) ends it early.
    In a data-parallel run every process trains on its share of each step and validates alike (so
    all take the same decisions); only rank 0 (holding `folder`) writes checkpoints and logs."""
    config, rng, train_set, val_set = prepare(flags, processes)
    device = config.device
    last, best_path = (os.path.join(config.checkpoint_dir, name) for name in ("last.npz", "best.npz"))
    sampler = training_sampler(train_set, pixel_weights(train_set, config), config)
    val_weights = pixel_weights(val_set, config)
    class_weights = None if config.class_weights is None else backend.to_tensor(config.class_weights, device)
    model, optimizer = build_network(config)
    net = backend.data_parallel(model, device) if processes > 1 else model
    scaler = backend.grad_scaler(config.amp)
    save = checkpoint_writer(folder, model, optimizer, rng, config, train_set, rank)
    calibrating = config.calibrate and config.outputs == 1  # then every process keeps best.npz's weights
    start_epoch, best, stale, partial, best_weights, seconds_before = 0, None, 0, None, None, 0.0
    if config.resume:
        start_epoch, best, stale, partial, seconds_before = resume(last, model, optimizer, rng, config)
        if config.time_budget:  # what is left of the budget, planned as the run goes on
            config = Config(**{**vars(config), "epochs": start_epoch + 1})
        if calibrating and os.path.exists(best_path):
            best_weights = load_checkpoint(best_path)[1]
    first_loss = None
    loader = BatchLoader(sampler, config.loader_workers)
    try:
        epoch, run_start = start_epoch, time.perf_counter()
        while epoch < config.epochs:  # --time-budget plans config.epochs as it goes
            begin = time.perf_counter()
            lr = set_learning_rate(optimizer, epoch, config)
            model.train()
            order, first_step, losses = epoch_plan(partial, rng, len(sampler), config.steps_per_epoch * config.batch_size)
            partial = None
            # Alone, the last step takes what is left; data parallel, every process needs its equal share.
            steps = math.ceil(len(order) / config.batch_size) if processes == 1 else len(order) // config.batch_size
            batches = loader.batches(step_batches(order, first_step, steps, epoch, config, rank, processes))
            done = first_step

            def save_midway():
                save(last, epoch, best, stale, partial=dict(step=done, order=order.tolist(), losses=losses),
                     trained_seconds=seconds_before + time.perf_counter() - run_start)
                if folder is not None:
                    folder.flush()
                return f"in epoch {epoch + 1}, after step {done} of {steps}: {last} holds that state"
            try:
                for step, batch in zip(tqdm(range(first_step, steps), total=steps, initial=first_step, leave=False,
                                            desc=f"epoch {epoch + 1}/{config.epochs}", file=sys.stderr,
                                            disable=rank > 0), batches):
                    loss, value, stop_now = step_loss(net, batch, config, class_weights, stop, processes)
                    # before the step: a NaN never reaches the weights
                    check_loss(value, first_loss, epoch, step, config.lr)
                    first_loss = value if first_loss is None else first_loss
                    apply_gradients(optimizer, scaler, loss)
                    losses.append(value)
                    done = step + 1
                    if stop_now and done < steps:
                        stop.stop(save_midway())
            except WorkersDied as err:
                if done == first_step:
                    raise TrainingError(f"{err}; stopped before a step of epoch {epoch + 1}: checkpoints kept as "
                                        f"they were")
                raise TrainingError(f"{err}; stopped {save_midway()}; continue with --resume")
            scores = dict(train_loss=float(np.mean(losses)))
            if val_set is not None and ((epoch + 1) % config.val_every == 0 or epoch + 1 == config.epochs):
                scores.update(validate_share(model, val_set, val_weights, config, class_weights, rank, processes))
            improved = config.best_metric in scores and improves(scores[config.best_metric], best, config.best_metric)
            if config.best_metric in scores:  # a validated epoch (or no validation set at all)
                best, stale = (scores[config.best_metric], 0) if improved else (best, stale + 1)
            seconds = time.perf_counter() - begin
            run_seconds = time.perf_counter() - run_start
            if config.time_budget:
                config = planned_epochs(config, epoch + 1, epoch + 1 - start_epoch, run_seconds, rank, processes,
                                        seconds_before)
            save(last, epoch + 1, best, stale, scores=scores, config=as_dict(config),
                 trained_seconds=seconds_before + run_seconds)
            if improved:
                best_weights = model_weights(model) if calibrating else None
                save(best_path, epoch + 1, best, stale, with_optimizer=False, scores=scores, config=as_dict(config))
            if rank == 0:
                folder.in_background(report_epoch, epoch, scores, lr, seconds, improved, config)
            stop_now = backend.all_sum([float(bool(stop.signal))], device, processes)[0] > 0
            if stop_now and epoch + 1 < config.epochs:
                if folder is not None:
                    folder.flush()  # the epoch's line before the stop's
                stop.stop(f"after epoch {epoch + 1}: {last} holds it")
            if config.patience and stale >= config.patience:
                print(f"early stop: {config.best_metric} has not improved for {stale} epochs")
                break
            epoch += 1
    finally:
        loader.close()
    if folder is not None:
        folder.flush()  # a write's error stops the run here, in a line; calibration rewrites the files
    if calibrating:
        checkpoints = ([(best_path, best_weights)] if best_weights else []) + [(last, model_weights(model))]
        calibrate(model, checkpoints, train_set, config, rank, processes)
    print(f"checkpoints: {best_path} (best {config.best_metric} {best:.4f}), {last}")
    backend.wait_for_all(device, processes)


def join_launched_run(processes):
    """A process of a data-parallel run: as many threads as its share of the cores (threads spinning
    against each other slow every process down), and killed with its launcher, which stops the whole
    run when any process fails (a process waiting for a dead peer would wait for ever)."""
    backend.set_threads(backend.cores() // int(os.environ.get("LOCAL_WORLD_SIZE", processes)))
    die_with_parent()  # checkpoints are written atomically


def main(argv=None):
    flags = parse_args(argv)
    rank, processes = backend.distributed()
    if processes == 1:
        return train_and_log(flags, rank, processes)
    join_launched_run(processes)
    code = 0
    try:
        train_and_log(flags, rank, processes)
    except SystemExit as stop:  # exit at once: OneFlow's exit would wait for the other processes
        if isinstance(stop.code, str) and rank == 0:  # the others met the same error
            print(stop.code, file=sys.stderr)
        code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    # Finished too: tearing down the process group at the interpreter's exit aborted now and then
    # ("terminate called without an active exception"); everything is written and closed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def train_and_log(flags, rank, processes):
    if rank > 0:  # rank 0 speaks for the run; the others' errors still reach stderr
        flags.log, flags.progress, sys.stdout = "", "", open(os.devnull, "w")
    stop = StopRequest()
    logger = Logger(flags.log or os.devnull)
    logger.header(("resumed" if flags.resume else "run") + ": " + " ".join(sys.argv))
    folder = None
    try:
        folder = RunFolder(flags.checkpoint_dir, resuming=flags.resume) if rank == 0 else None
        train(flags, folder, stop, rank, processes)
    except (DataError, ConfigError, CheckpointError, TrainingError, OSError) as err:
        logger.fail(f"error: {err}")
    except KeyboardInterrupt:
        logger.fail("error: interrupted; the checkpoints of finished epochs are kept as they were")
    finally:
        logger.close()
        stop.restore()
        if folder is not None:
            folder.close()


if __name__ == "__main__":
    main()
