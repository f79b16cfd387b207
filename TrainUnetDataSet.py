"""Train the U-Net on a dataset of any layout datasets.py reads; keeps the best and the last checkpoint.

    python TrainUnetDataSet.py                                # ISBI folders, preset for this machine
    python TrainUnetDataSet.py --epochs 40 --batch-size 4 --base 64
    python TrainUnetDataSet.py --resume                       # go on from checkpoints/last.npz
    python TrainUnetDataSet.py --data-path stage1_train       # DSB 2018 nuclei, RGB
    python TrainUnetDataSet.py --data-path VOC2012 --classes 21 --img-size 256
    UNET_BACKEND=torch python TrainUnetDataSet.py             # same code on PyTorch

Every epoch prints (and tees into the log) one line: train loss, and on held-out images the
validation loss, pixel error, Dice and the ISBI challenge's V_rand (several classes: pixel
accuracy and mean IoU), and the time. `python3 plot.py` draws the curves from that log.
"""
import argparse
import fcntl
import math
import os
import signal
import sys
import time

import numpy as np
from tqdm import tqdm

import backend
from backend import F, flow
from cli import ArgumentParser, probability, ranged
from checkpoint import (CheckpointError, build_model, load_checkpoint, load_weights, restore_optimizer,
                        save_checkpoint, update_meta)
from augment import DEFAULT_PROBABILITIES
from dataloader import SegmentationDataset, make_batch
from files import DataError
from datasets import FORMATS, detect_format, find_samples, labels_beside, load_dataset, voc_split_exists
from log import Logger
from metrics import confusion_matrix, confusion_scores, isbi_scores, pixel_scores
from predict_unet_test import predict_probability
from unet import MIN_SIDE, VALID_MARGIN, UNet, center_crop, mirror_for_valid, smallest_side, valid_input_size
from weightmap import weight_map

# Chosen for the machine the run is on (BENCHMARKS.md has the measurements). CPU: a base-16 net
# on 256x256 crops, one per step, so a OneFlow run finishes in about 25 minutes on 2 cores
# (PyTorch: 5-8); with batches of one crop, BatchNorm's running statistics fail on whole slices
# (V_rand 0.39 against 0.95), hence instance norm. GPU: the paper's base-64 net on whole slices.
PRESETS = {
    "cpu": dict(base=16, crop=256, batch_size=1, epochs=40, lr=1e-3, norm="instance"),
    "gpu": dict(base=64, crop=0, batch_size=4, epochs=40, lr=1e-3, norm="batch"),
}
# The paper's weight map beat the plain loss on ISBI membranes (V_rand and pixel error), but on
# DSB 2018 nuclei it cost 0.04 Dice (0.888 -> 0.848), and it is defined for one class only.
WEIGHT_MAP_FORMATS = ("pairs", "tiff")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--data-path", "--data_path", default="train_image",
                   help="training images: a folder (labels in --label-path), a DSB 2018 stage1_train folder, "
                        "a VOC root or a TIFF volume")
    p.add_argument("--label-path", "--label_path",
                   help="labels matched to images by file name (255 = cell, 0 = membrane), or the labels' TIFF; "
                        "default: train_label/, or for a TIFF volume its name with 'volume' -> 'labels'")
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
    p.add_argument("--ignore-index", type=ranged(int, 0, 255), default=255, help="label value left out of loss and scores (classes > 1)")
    p.add_argument("--class-weights", help="classes > 1: cross-entropy weights, e.g. 1,2,2, or 'auto' "
                                           "(median frequency balancing on the training labels)")
    p.add_argument("--img-size", type=ranged(int, MIN_SIDE, also=(0,)), default=0,
                   help="resize every image to this square for training, and for prediction (0: keep sizes; "
                        "predictions come back at each image's own size)")
    p.add_argument("--preset", choices=["auto", "cpu", "gpu"], default="auto",
                   help="defaults for the flags below: auto = gpu on CUDA, else cpu; %s" % PRESETS)
    p.add_argument("--epochs", type=ranged(int, 1), help="passes over the training images")
    p.add_argument("--batch-size", "--batch_size", type=ranged(int, 1), help="images per step")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                   help="Adam, or the paper's SGD with high momentum")
    p.add_argument("--momentum", type=ranged(float, 0, below=1), default=0.99, help="SGD momentum (the paper's 0.99)")
    p.add_argument("--lr", type=ranged(float, 0), help="learning rate at the start")
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                   help="learning rate over the epochs: cosine decay to lr/100, or constant")
    p.add_argument("--base", type=ranged(int, 1, 1024), help="channels of the first level (64 = the paper's U-Net)")
    p.add_argument("--crop", type=ranged(int, MIN_SIDE, also=(0,)), help="train on random crops of this size (0: whole images)")
    p.add_argument("--bilinear", action="store_true", help="bilinear upsampling instead of transposed convs")
    p.add_argument("--norm", choices=["batch", "instance"], help="normalization layers of the U-Net")
    p.add_argument("--padding", choices=["same", "valid"], default="same",
                   help="valid: the paper's unpadded U-Net (572 -> 388), trained on mirrored tiles")
    p.add_argument("--dropout", type=ranged(float, 0, below=1), default=0.0, help="dropout at the end of the contracting path")
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
                            "val_pixel_accuracy"],
                   help="validation score that picks best.npz; auto: val_miou with classes > 1, val_dice for "
                        "DSB 2018 nuclei, else the ISBI V_rand (train_loss when there is no validation set)")
    p.add_argument("--patience", type=ranged(int, 0), default=0,
                   help="stop after this many epochs without a better --best-metric (0: never)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--seed", type=ranged(int, 0), default=0, help="the same seed gives the same run")
    p.add_argument("--checkpoint-dir", default="checkpoints", help="where best.npz and last.npz go")
    p.add_argument("--resume", action="store_true", help="continue from CHECKPOINT_DIR/last.npz")
    p.add_argument("--log", default="Unet_train.txt", help="training log read by plot.py")
    return p.parse_args(argv)


def apply_preset(args, device):
    name = args.preset if args.preset != "auto" else ("gpu" if device.startswith("cuda") else "cpu")
    chosen = {k: v for k, v in PRESETS[name].items() if getattr(args, k) is None}
    for key, value in chosen.items():
        setattr(args, key, value)
    shown = ", ".join(f"{k}={getattr(args, k)}" for k in PRESETS[name])
    print(f"preset {name} ({backend.NAME} on {device}): {shown}")


def augment_probabilities(args):
    return {name: getattr(args, f"aug_{name}") for name in DEFAULT_PROBABILITIES}


def read_data(path, label_path, args, data_format="auto", split=None, **kwargs):
    samples = find_samples(path, data_format, label_path, split)
    return load_dataset(samples, args.classes, args.ignore_index, args.img_size,
                        instance_labels=args.instance_labels, **kwargs)


def split_data(args, rng):
    """(train, val) datasets; val is None when there is nothing to validate on."""
    fmt = detect_format(args.data_path) if args.data_format == "auto" else args.data_format
    label_path = args.label_path or ("train_label" if fmt == "pairs" and not labels_beside(args.data_path) else None)
    voc_val = fmt == "voc" and voc_split_exists(args.data_path, "val") and not args.val_image_path
    data = read_data(args.data_path, label_path, args, fmt, split="train", crop=args.crop or None,
                     augment=augment_probabilities(args))
    if args.val_image_path or voc_val:
        val_format = args.data_format if args.val_image_path else fmt
        val = read_data(args.val_image_path or args.data_path, args.val_label_path or label_path, args, val_format,
                        split="val", channels=data.channels)
        train = data
    else:
        n_val = min(len(data) - 1, max(1, round(len(data) * args.val_fraction))) if args.val_fraction > 0 else 0
        order = rng.permutation(len(data))
        val = data.subset(sorted(order[:n_val])) if n_val > 0 else None
        if val is not None:
            val.crop, val.augment = None, None
        train = data.subset(sorted(order[n_val:]))
    if args.weight_map is None:
        args.weight_map = args.classes == 1 and fmt in WEIGHT_MAP_FORMATS
    if args.weight_map and args.classes == 1:
        train.weights = [weight_map(label, args.w0, args.sigma, numbered)
                         for label, numbered in zip(train.labels, train.instances or [None] * len(train))]
    return fmt, train, val


def class_weights(args, train):
    """Cross-entropy weights from --class-weights: listed, or 'auto': median frequency / frequency."""
    if not args.class_weights:
        return None
    if args.class_weights == "auto":
        counts = sum(np.bincount(label[label < args.classes].ravel(), minlength=args.classes) for label in train.labels)
        frequency = counts / max(counts.sum(), 1)
        weights = np.where(frequency > 0, np.median(frequency[frequency > 0]) / np.maximum(frequency, 1e-12), 0.0)
    else:
        weights = np.array([float(w) for w in args.class_weights.split(",")])
        if len(weights) != args.classes:
            raise DataError(f"--class-weights: {len(weights)} weights for {args.classes} classes")
    print("class weights: " + ", ".join(f"{w:.3f}" for w in weights))
    return weights.astype(np.float32)


def learning_rate(epoch, args):
    if args.schedule == "constant" or args.epochs <= 1:
        return args.lr
    progress = epoch / (args.epochs - 1)
    return args.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


def loss_fn(logits, target, dice_weight, weights=None):
    """One class: BCE (weighted per pixel by `weights`) + dice_weight x (1 - soft Dice)."""
    loss = F.binary_cross_entropy_with_logits(logits, target, weight=weights)
    if dice_weight:
        prob = flow.sigmoid(logits)
        soft_dice = (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
        loss = loss + dice_weight * (1 - soft_dice)
    return loss


def multiclass_loss_fn(logits, target, dice_weight, class_weights=None, ignore_index=255):
    """Several classes: cross-entropy + dice_weight x (1 - soft Dice averaged over the classes),
    both leaving out pixels labelled `ignore_index`."""
    loss = F.cross_entropy(logits, target, weight=class_weights, ignore_index=ignore_index)
    if dice_weight:
        keep = (target != ignore_index).unsqueeze(1).to(logits.dtype)
        onehot = F.one_hot(target * (target != ignore_index).to(target.dtype), logits.shape[1])
        onehot = onehot.permute(0, 3, 1, 2).to(logits.dtype) * keep
        prob = flow.softmax(logits, dim=1) * keep
        overlap, total = (prob * onehot).sum(dim=(0, 2, 3)), (prob + onehot).sum(dim=(0, 2, 3))
        loss = loss + dice_weight * (1 - ((2 * overlap + 1) / (total + 1)).mean())
    return loss


def evaluate(model, val, device, ignore_index=255):
    """Over whole validation images: one class: the mean loss (BCE), pixel error, Dice and ISBI
    V_rand; several: loss (cross-entropy), pixel accuracy and mean IoU of the summed confusion matrix."""
    model.eval()
    if val.classes > 1:
        return evaluate_multiclass(model, val, device, ignore_index)
    rows = []
    for image, label in zip(val.images, val.labels):
        prob = np.clip(predict_probability(model, image, device, tile=0), 1e-7, 1 - 1e-7)
        loss = -np.mean(label * np.log(prob) + (1 - label) * np.log(1 - prob))
        pixel = pixel_scores(prob > 0.5, label)
        rows.append(dict(val_loss=loss, val_pixel_error=pixel["pixel_error"], val_dice=pixel["dice"],
                         val_v_rand=isbi_scores(prob, label)["v_rand"]))
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}


def evaluate_multiclass(model, val, device, ignore_index):
    losses, total = [], 0
    for image, label in zip(val.images, val.labels):
        prob = np.clip(predict_probability(model, image, device, tile=0), 1e-7, 1)
        keep = label != ignore_index
        losses.append(-np.mean(np.log(np.take_along_axis(prob, np.minimum(label, val.classes - 1)[..., None], 2))[keep])
                      if keep.any() else 0.0)
        total = total + confusion_matrix(prob.argmax(axis=2), label, val.classes, ignore_index)
    scores = confusion_scores(total)
    return dict(val_loss=float(np.mean(losses)), val_pixel_accuracy=scores["pixel_accuracy"],
                val_miou=scores["mean_iou"])


def mirrored_for_valid(train):
    """The training set with each array's borders mirrored as prediction does (unpadded net)."""
    def pad(arrays):
        return None if arrays is None else [mirror_for_valid(a) for a in arrays]
    return SegmentationDataset(pad(train.images), pad(train.labels), train.crop, train.augment, pad(train.weights),
                               train.classes)


def calibrate(path, train, device):
    """Record in the checkpoint at `path` the output shift that puts probability 0.5 on the
    threshold with the best pixel accuracy on the training images. Weighted losses (--weight-map)
    bias the network towards membranes; this moves its decision back (V_rand's sweep is unaffected)."""
    model = build_model(path, device)[0]
    probs = [predict_probability(model, image, device, tile=0) for image in train.images]
    thresholds = np.round(np.arange(0.05, 0.96, 0.05), 2)
    errors = [np.mean([np.mean((p > t) != label) for p, label in zip(probs, train.labels)]) for t in thresholds]
    best = float(thresholds[int(np.argmin(errors))])
    update_meta(path, output_shift=float(np.log(best / (1 - best))), calibrated_threshold=best)
    print(f"calibrated {path}: cell threshold {best:.2f} on the training images "
          f"(pixel error there {min(errors):.4f}, {errors[list(thresholds).index(0.5)]:.4f} at 0.5)")


def best_metric(args, data_format):
    if args.best_metric != "auto":
        return args.best_metric
    if args.classes > 1:
        return "val_miou"
    return "val_dice" if data_format == "dsb2018" else "val_v_rand"


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
        name = signal.Signals(self.signal).name
        print(f"stopped by {name} {where}; continue with --resume")
        sys.exit(128 + self.signal)


def lock_checkpoint_dir(folder):
    """Hold `folder` for this run (until the returned descriptor is closed or the process ends, however
    it ends) and delete the temporary files a killed run left there; a second run into it stops."""
    os.makedirs(folder, exist_ok=True)
    lock = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        raise TrainingError(f"{folder}: another training run is writing there; wait for it to end, "
                            f"or give this one another --checkpoint-dir")
    for name in os.listdir(folder):
        if name.startswith(".tmp-"):
            os.remove(os.path.join(folder, name))
    return lock


def keep_previous_run(folder):
    """Move a previous run's best.npz and last.npz into folder/previous-<time>/ before this run writes."""
    found = [name for name in ("best.npz", "last.npz") if os.path.exists(os.path.join(folder, name))]
    if not found:
        return
    kept = os.path.join(folder, "previous-" + time.strftime("%Y%m%d-%H%M%S"))
    while os.path.exists(kept):
        kept += "+"
    os.makedirs(kept)
    for name in found:
        os.replace(os.path.join(folder, name), os.path.join(kept, name))
    print(f"kept the previous run's {' and '.join(found)} in {kept}/ (--resume continues a run instead)")


def check_loss(loss, first_loss, epoch, step, lr):
    """Stop on a loss that is not finite or has grown a thousandfold: the weights would be garbage."""
    if math.isfinite(loss) and (first_loss is None or loss <= 1000 * max(first_loss, 1e-3)):
        return
    start = "" if first_loss is None else f" (first step: {first_loss:.4g})"
    raise TrainingError(f"training loss {loss:.4g} at epoch {epoch + 1}, step {step + 1}{start}: training "
                        f"diverged; try a lower --lr than {lr:g}. Checkpoints of finished epochs are kept as they were")


def resume(path, model, optimizer, rng, args):
    """Load the run saved in `path` into model, optimizer and rng; returns (epochs done, best score,
    epochs without a better one, the position inside a stopped epoch or None)."""
    meta, weights, arrays = load_checkpoint(path)
    if meta["model"] != model.config():
        raise CheckpointError(f"{path}: model {meta['model']} differs from the flags' {model.config()}")
    written_with = meta.get("args", {}).get("optimizer", "adam") if isinstance(meta.get("args"), dict) else None
    if written_with != args.optimizer:
        raise CheckpointError(f"{path}: written with --optimizer {written_with}; resume with the same")
    load_weights(model, weights, path)
    restore_optimizer(optimizer, meta, arrays, path)
    try:
        epochs_done, best, stale = int(meta["epoch"]), meta["best"], int(meta.get("stale_epochs", 0))
        partial = meta.get("partial")
        rng.bit_generator.state = meta["rng"]
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: holds no usable training state to resume ({type(err).__name__})")
    if epochs_done >= args.epochs and not partial:
        raise TrainingError(f"{path} has trained {epochs_done} epochs already: ask for more with --epochs")
    print(f"resumed from {path} after epoch {epochs_done}" + (f", step {partial['step']}" if partial else ""))
    return epochs_done, best, stale, partial


def train(args, stop):
    device = backend.resolve_device(args.device)
    apply_preset(args, device)
    if args.padding == "valid" and args.crop:
        args.crop = valid_input_size(max(args.crop - 2 * VALID_MARGIN, 1))
        print(f"unpadded U-Net: training tiles of {args.crop} pixels give {args.crop - 2 * VALID_MARGIN}")
    if args.instance_labels and args.classes > 1:
        raise DataError("--instance-labels numbers objects of one class: it needs --classes 1")
    backend.seed_everything(args.seed)
    rng = np.random.default_rng(args.seed)
    data_format, train_set, val_set = split_data(args, rng)
    print(f"data: {len(train_set)} training pairs from {args.data_path} ({data_format}, "
          f"{'RGB' if train_set.channels == 3 else 'grey'}, {args.classes} class{'es' if args.classes > 1 else ''}), "
          f"{len(val_set) if val_set else 0} for validation")
    sizes = {image.shape[:2] for image in train_set.images}
    small = [name for name, image in zip(train_set.names, train_set.images)
             if args.padding == "same" and min(image.shape[:2]) < smallest_side(args.norm)]
    if small:
        raise DataError(f"{small[0]}: image smaller than {smallest_side(args.norm)} pixels a side, the least the "
                        f"U-Net takes with {args.norm} norm: train with --img-size {MIN_SIDE} or more")
    if len(sizes) > 1 and not train_set.crop and args.batch_size > 1 and args.padding == "same":
        train_set.crop = min(min(size) for size in sizes) // 16 * 16
        print(f"images of {len(sizes)} sizes: batches of random {train_set.crop}x{train_set.crop} crops "
              f"(--crop or --img-size to choose)")
    if args.dice_weight is None:
        args.dice_weight = 1.0 if args.classes > 1 else 0.0
    weights_per_class = class_weights(args, train_set)
    weights_per_class = None if weights_per_class is None else backend.to_tensor(weights_per_class, device)

    model = UNet(n_channels=train_set.channels, n_classes=args.classes, bilinear=args.bilinear, base=args.base,
                 norm=args.norm, padding=args.padding, dropout=args.dropout).to(device)
    if args.optimizer == "sgd":
        optimizer = flow.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    else:
        optimizer = flow.optim.Adam(model.parameters(), lr=args.lr)
    last_path = os.path.join(args.checkpoint_dir, "last.npz")
    best_path = os.path.join(args.checkpoint_dir, "best.npz")
    metric = best_metric(args, data_format) if val_set is not None else "train_loss"
    start_epoch, best, stale, partial = 0, None, 0, None
    if args.resume:
        start_epoch, best, stale, partial = resume(last_path, model, optimizer, rng, args)
    previous_kept = args.resume

    def save_last(epoch, **more):
        """Write last.npz (a new run first moves an earlier run's checkpoints aside, so a run that
        fails before its first write leaves them where they were); returns what it stored."""
        nonlocal previous_kept
        if not previous_kept:
            keep_previous_run(args.checkpoint_dir)
            previous_kept = True
        info = dict(epoch=epoch, best=best, best_metric=metric, stale_epochs=stale, rng=rng.bit_generator.state,
                    input_scale=1.0, args=vars(args), **more,
                    data=dict(format=data_format, img_size=args.img_size, ignore_index=args.ignore_index,
                              instance_labels=args.instance_labels))
        save_checkpoint(last_path, model, optimizer, **info)
        return info

    fit_set = mirrored_for_valid(train_set) if args.padding == "valid" else train_set
    first_loss = None
    for epoch in range(start_epoch, args.epochs):
        begin = time.perf_counter()
        lr = learning_rate(epoch, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        if partial:  # an epoch stopped midway: the same order, from the next step on
            order, first_step, losses = np.array(partial["order"]), partial["step"], partial["losses"]
            partial = None
        else:
            order, first_step, losses = rng.permutation(len(fit_set)), 0, []
        steps = math.ceil(len(order) / args.batch_size)
        for step in tqdm(range(first_step, steps), total=steps, initial=first_step, leave=False,
                         desc=f"epoch {epoch + 1}/{args.epochs}", file=sys.stderr):
            images, labels, weights = make_batch(fit_set, order[step * args.batch_size:(step + 1) * args.batch_size],
                                                 rng)
            logits = model(backend.to_tensor(images, device))
            crop = lambda a: center_crop(a, logits.shape[2], logits.shape[3])  # noqa: E731  (unpadded net)
            if args.classes > 1:
                loss = multiclass_loss_fn(logits, backend.to_tensor(crop(labels), device, dtype=np.int64),
                                          args.dice_weight, weights_per_class, args.ignore_index)
            else:
                loss = loss_fn(logits, backend.to_tensor(crop(labels), device), args.dice_weight,
                               None if weights is None else backend.to_tensor(crop(weights), device))
            value = loss.item()
            check_loss(value, first_loss, epoch, step, args.lr)  # before the step: a NaN never reaches the weights
            first_loss = value if first_loss is None else first_loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(value)
            if stop.signal and step + 1 < steps:
                save_last(epoch, partial=dict(step=step + 1, order=order.tolist(), losses=losses))
                stop.stop(f"in epoch {epoch + 1}, after step {step + 1} of {steps}: {last_path} holds that state")
        scores = dict(train_loss=float(np.mean(losses)))
        if val_set is not None:
            scores.update(evaluate(model, val_set, device, args.ignore_index))
        improved = improves(scores[metric], best, metric)
        best, stale = (scores[metric], 0) if improved else (best, stale + 1)
        info = save_last(epoch + 1, scores=scores)
        if improved:
            save_checkpoint(best_path, model, **info)
        print(f"epoch {epoch + 1}/{args.epochs} " + " ".join(f"{k} {v:.4f}" for k, v in scores.items())
              + f" time {time.perf_counter() - begin:.1f}s" + (" *best" if improved else ""))
        if stop.signal and epoch + 1 < args.epochs:
            stop.stop(f"after epoch {epoch + 1}: {last_path} holds it")
        if args.patience and stale >= args.patience:
            print(f"early stop: {metric} has not improved for {stale} epochs")
            break
    if args.calibrate and args.classes == 1:
        for path in (best_path, last_path):
            calibrate(path, train_set, device)
    print(f"checkpoints: {best_path} (best {metric} {best:.4f}), {last_path}")


def main(argv=None):
    args = parse_args(argv)
    stop = StopRequest()
    logger = Logger(args.log)
    logger.header(("resumed" if args.resume else "run") + ": " + " ".join(sys.argv))
    lock = None
    try:
        lock = lock_checkpoint_dir(args.checkpoint_dir)
        train(args, stop)
    except (DataError, CheckpointError, TrainingError, OSError) as err:
        logger.fail(f"error: {err}")
    except KeyboardInterrupt:
        logger.fail("error: interrupted; the checkpoints of finished epochs are kept as they were")
    finally:
        logger.close()
        stop.restore()
        if lock is not None:
            os.close(lock)


if __name__ == "__main__":
    main()
