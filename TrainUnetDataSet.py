"""Train the U-Net on image/label folders; keeps the best and the last checkpoint.

    python TrainUnetDataSet.py                                # ISBI folders, preset for this machine
    python TrainUnetDataSet.py --epochs 40 --batch-size 4 --base 64
    python TrainUnetDataSet.py --resume                       # go on from checkpoints/last.npz
    UNET_BACKEND=torch python TrainUnetDataSet.py             # same code on PyTorch

Every epoch prints (and tees into the log) one line: train loss, and on held-out images the
validation loss, pixel error, Dice and the ISBI challenge's V_rand, and the time. `python3 plot.py` draws the curves from that log.
"""
import argparse
import math
import os
import sys
import time

import numpy as np
from tqdm import tqdm

import backend
from backend import F, flow
from checkpoint import (CheckpointError, build_model, load_checkpoint, load_weights, restore_optimizer,
                        save_checkpoint, update_meta)
from augment import DEFAULT_PROBABILITIES
from dataloader import DataError, SegmentationDataset, batches
from log import Logger
from metrics import isbi_scores, pixel_scores
from predict_unet_test import predict_probability
from unet import VALID_MARGIN, UNet, center_crop, mirror_for_valid, valid_input_size
from weightmap import weight_map

# Chosen for the machine the run is on (BENCHMARKS.md has the measurements). CPU: a base-16 net
# on 256x256 crops, one per step, so a OneFlow run finishes in about 25 minutes on 2 cores
# (PyTorch: 5-8); with batches of one crop, BatchNorm's running statistics fail on whole slices
# (V_rand 0.39 against 0.95), hence instance norm. The paper's weight map beat the plain loss on
# both V_rand and pixel error. GPU: the paper's base-64 net on whole slices.
PRESETS = {
    "cpu": dict(base=16, crop=256, batch_size=1, epochs=40, lr=1e-3, norm="instance", weight_map=True),
    "gpu": dict(base=64, crop=0, batch_size=4, epochs=40, lr=1e-3, norm="batch", weight_map=True),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the docstring's layout and shows every flag's default."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data-path", "--data_path", default="train_image", help="folder of training images")
    p.add_argument("--label-path", "--label_path", default="train_label",
                   help="folder of labels, matched to images by file name (255 = cell, 0 = membrane)")
    p.add_argument("--val-image-path", help="folder of validation images, instead of holding out --val-fraction")
    p.add_argument("--val-label-path", help="folder of validation labels (with --val-image-path)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the training pairs held out for validation (0: none)")
    p.add_argument("--preset", choices=["auto", "cpu", "gpu"], default="auto",
                   help="defaults for the flags below: auto = gpu on CUDA, else cpu; %s" % PRESETS)
    p.add_argument("--epochs", type=int, help="passes over the training images")
    p.add_argument("--batch-size", "--batch_size", type=int, help="images per step")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                   help="Adam, or the paper's SGD with high momentum")
    p.add_argument("--momentum", type=float, default=0.99, help="SGD momentum (the paper's 0.99)")
    p.add_argument("--lr", type=float, help="learning rate at the start")
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                   help="learning rate over the epochs: cosine decay to lr/100, or constant")
    p.add_argument("--base", type=int, help="channels of the first level (64 = the paper's U-Net)")
    p.add_argument("--crop", type=int, help="train on random crops of this size (0: whole images)")
    p.add_argument("--bilinear", action="store_true", help="bilinear upsampling instead of transposed convs")
    p.add_argument("--norm", choices=["batch", "instance"], help="normalization layers of the U-Net")
    p.add_argument("--padding", choices=["same", "valid"], default="same",
                   help="valid: the paper's unpadded U-Net (572 -> 388), trained on mirrored tiles")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout at the end of the contracting path")
    p.add_argument("--dice-weight", type=float, default=0.0, help="weight of a soft-Dice term added to BCE")
    p.add_argument("--weight-map", action=argparse.BooleanOptionalAction,
                   help="weight the loss per pixel as the U-Net paper does (weightmap.py), to separate cells")
    p.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                   help="after training, move the 0.5 decision to the threshold that fits the training images best")
    p.add_argument("--w0", type=float, default=10.0, help="weight-map border weight")
    p.add_argument("--sigma", type=float, default=5.0, help="weight-map border width, pixels")
    for name, probability in DEFAULT_PROBABILITIES.items():
        p.add_argument(f"--aug-{name}", type=float, default=probability,
                       help=f"probability of the {name} augmentation (augment.py)")
    p.add_argument("--best-metric", default="val_v_rand",
                   choices=["val_v_rand", "val_dice", "val_pixel_error", "val_loss"],
                   help="validation score that picks best.npz (train_loss when there is no validation set)")
    p.add_argument("--patience", type=int, default=0,
                   help="stop after this many epochs without a better --best-metric (0: never)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same run")
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


def split_data(args, rng):
    """(train, val) datasets; val is None when there is nothing to validate on."""
    data = SegmentationDataset.from_folders(args.data_path, args.label_path, crop=args.crop or None,
                                            augment=augment_probabilities(args))
    if args.val_image_path:
        val = SegmentationDataset.from_folders(args.val_image_path, args.val_label_path or args.label_path)
        train = data
    else:
        n_val = min(len(data) - 1, max(1, round(len(data) * args.val_fraction))) if args.val_fraction > 0 else 0
        order = rng.permutation(len(data))
        val = data.subset(sorted(order[:n_val])) if n_val > 0 else None
        if val is not None:
            val.crop, val.augment = None, None
        train = data.subset(sorted(order[n_val:]))
    if args.weight_map:
        train.weights = [weight_map(label, args.w0, args.sigma) for label in train.labels]
    return train, val


def learning_rate(epoch, args):
    if args.schedule == "constant" or args.epochs <= 1:
        return args.lr
    progress = epoch / (args.epochs - 1)
    return args.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


def loss_fn(logits, target, dice_weight, weights=None):
    loss = F.binary_cross_entropy_with_logits(logits, target, weight=weights)
    if dice_weight:
        prob = flow.sigmoid(logits)
        soft_dice = (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
        loss = loss + dice_weight * (1 - soft_dice)
    return loss


def evaluate(model, val, device):
    """Mean loss (BCE), pixel error, Dice and the ISBI V_rand over whole validation images."""
    model.eval()
    rows = []
    for image, label in zip(val.images, val.labels):
        prob = np.clip(predict_probability(model, image, device, tile=0), 1e-7, 1 - 1e-7)
        loss = -np.mean(label * np.log(prob) + (1 - label) * np.log(1 - prob))
        pixel = pixel_scores(prob > 0.5, label)
        rows.append(dict(val_loss=loss, val_pixel_error=pixel["pixel_error"], val_dice=pixel["dice"],
                         val_v_rand=isbi_scores(prob, label)["v_rand"]))
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}


def mirrored_for_valid(train):
    """The training set with each array's borders mirrored as prediction does (unpadded net)."""
    def pad(arrays):
        return None if arrays is None else [mirror_for_valid(a) for a in arrays]
    return SegmentationDataset(pad(train.images), pad(train.labels), train.crop, train.augment, pad(train.weights))


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


def improves(value, best, metric):
    if best is None:
        return True
    return value < best if metric.endswith(("loss", "error")) else value > best


def train(args):
    device = backend.resolve_device(args.device)
    apply_preset(args, device)
    if args.padding == "valid" and args.crop:
        args.crop = valid_input_size(max(args.crop - 2 * VALID_MARGIN, 1))
        print(f"unpadded U-Net: training tiles of {args.crop} pixels give {args.crop - 2 * VALID_MARGIN}")
    backend.seed_everything(args.seed)
    rng = np.random.default_rng(args.seed)
    train_set, val_set = split_data(args, rng)
    print(f"data: {len(train_set)} training pairs from {args.data_path}, "
          f"{len(val_set) if val_set else 0} for validation")

    model = UNet(n_channels=1, n_classes=1, bilinear=args.bilinear, base=args.base, norm=args.norm,
                 padding=args.padding, dropout=args.dropout).to(device)
    if args.optimizer == "sgd":
        optimizer = flow.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    else:
        optimizer = flow.optim.Adam(model.parameters(), lr=args.lr)
    last_path = os.path.join(args.checkpoint_dir, "last.npz")
    best_path = os.path.join(args.checkpoint_dir, "best.npz")
    metric = args.best_metric if val_set is not None else "train_loss"
    start_epoch, best, stale = 0, None, 0
    if args.resume:
        meta, weights, arrays = load_checkpoint(last_path)
        if meta["model"] != model.config():
            raise CheckpointError(f"{last_path}: model {meta['model']} differs from the flags' {model.config()}")
        load_weights(model, weights, last_path)
        restore_optimizer(optimizer, meta, arrays, last_path)
        start_epoch, best, stale = meta["epoch"], meta["best"], meta.get("stale_epochs", 0)
        rng.bit_generator.state = meta["rng"]
        print(f"resumed from {last_path} after epoch {start_epoch}")

    fit_set = mirrored_for_valid(train_set) if args.padding == "valid" else train_set
    for epoch in range(start_epoch, args.epochs):
        begin = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(epoch, args)
        model.train()
        losses = []
        steps = math.ceil(len(train_set) / args.batch_size)
        for images, labels, weights in tqdm(batches(fit_set, args.batch_size, rng), total=steps, leave=False,
                                            desc=f"epoch {epoch + 1}/{args.epochs}", file=sys.stderr):
            logits = model(backend.to_tensor(images, device))
            crop = lambda a: center_crop(a, logits.shape[2], logits.shape[3])  # noqa: E731  (unpadded net)
            loss = loss_fn(logits, backend.to_tensor(crop(labels), device), args.dice_weight,
                           None if weights is None else backend.to_tensor(crop(weights), device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        scores = dict(train_loss=float(np.mean(losses)))
        if val_set is not None:
            scores.update(evaluate(model, val_set, device))
        improved = improves(scores[metric], best, metric)
        best, stale = (scores[metric], 0) if improved else (best, stale + 1)
        info = dict(epoch=epoch + 1, best=best, best_metric=metric, stale_epochs=stale, scores=scores,
                    rng=rng.bit_generator.state, input_scale=1.0, args=vars(args))
        save_checkpoint(last_path, model, optimizer, **info)
        if improved:
            save_checkpoint(best_path, model, **info)
        print(f"epoch {epoch + 1}/{args.epochs} " + " ".join(f"{k} {v:.4f}" for k, v in scores.items())
              + f" time {time.perf_counter() - begin:.1f}s" + (" *best" if improved else ""))
        if args.patience and stale >= args.patience:
            print(f"early stop: {metric} has not improved for {stale} epochs")
            break
    if args.calibrate:
        for path in (best_path, last_path):
            calibrate(path, train_set, device)
    print(f"checkpoints: {best_path} (best {metric} {best:.4f}), {last_path}")


def main(argv=None):
    args = parse_args(argv)
    logger = Logger(args.log, "a" if args.resume else "w")
    sys.stdout = logger
    try:
        train(args)
    except (DataError, CheckpointError) as err:
        sys.exit(f"error: {err}")
    finally:
        logger.close()


if __name__ == "__main__":
    main()
