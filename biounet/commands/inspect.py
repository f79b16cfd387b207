"""Look at a dataset before training on it: what was found there, and what training makes of it.

    biounet-inspect ../shared/data/dsb2018/stage1_train     # layout, count, sizes, label values
    biounet-inspect train_image --label-path train_label --augmented augmented.png --weight-map weights.png

--augmented draws the first labelled image and augmented samples of it (every augmentation on,
membranes or classes tinted); --weight-map draws the U-Net paper's loss weights of its label.
"""
import sys
from collections import Counter

import numpy as np

from biounet.core.cli import ArgumentParser, ranged
from biounet.core.files import DataError, write_png
from biounet.core.visualize import grid, overlay, weight_picture
from biounet.data.augment import DEFAULT_PROBABILITIES, augment
from biounet.data.datasets import (FORMATS, detect_format, find_samples, labels_beside, nnunet_description,
                                   read_sample_label)
from biounet.data.loader import auto_normalization, channels_of, normalize
from biounet.data.weightmap import weight_map


def summary(path, data_format, samples):
    """Lines saying what was found: layout and counts, image sizes, label values."""
    sizes = Counter()
    for sample in samples:
        image = sample.read_image()
        channels = channels_of(image)
        sizes[f"{image.shape[1]}x{image.shape[0]} {image.dtype}{f' x {channels} channels' if channels > 1 else ''}"] += 1
    labelled = [s for s in samples if s.read_label]
    lines = [f"{path}: {data_format}, {len(samples)} images ({len(labelled)} labelled)",
             "sizes: " + ", ".join(f"{k} ({v})" for k, v in sizes.most_common())]
    if data_format == "nnunet":
        description = nnunet_description(path)
        channels = description.get("channel_names") or description.get("modality") or {}
        lines.append("dataset.json: channels " + ", ".join(f"{k} {v}" for k, v in channels.items()) +
                     "; labels " + ", ".join(f"{k} = {v}" for k, v in (description.get("labels") or {}).items()))
    if labelled:
        values = np.unique(np.concatenate([np.unique(s.read_label()) for s in labelled]))
        lines.append("label values: " + ", ".join(str(v) for v in values))
    return lines


def augmented_samples(image, label, count, seed):
    """The image with its label, then `count` augmented samples, each with every augmentation on."""
    rng = np.random.default_rng(seed)
    every = {name: 1.0 for name in DEFAULT_PROBABILITIES}
    samples = [augment(image, label, None, rng=rng, probabilities=every)[:2] for _ in range(count)]
    return grid([overlay(im, lab.astype(bool)) for im, lab in [(image, label)] + samples])


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("path", nargs="?", default="train_image",
                   help="image folder, DSB 2018 folder, VOC root, nnU-Net or Cellpose dataset, or TIFF volume")
    p.add_argument("--label-path", help="label folder or TIFF (pairs, tiff; default for an image folder without its "
                                        "labels beside it: train_label, as training reads it)")
    p.add_argument("--data-format", choices=("auto",) + FORMATS, default="auto")
    p.add_argument("--split", help="VOC split (train, val, ...)")
    p.add_argument("--augmented", help="write augmented samples of the first labelled image to this PNG")
    p.add_argument("--samples", type=ranged(int, 1, 64), default=8, help="how many augmented samples")
    p.add_argument("--seed", type=ranged(int, 0), default=0)
    p.add_argument("--weight-map", help="write the loss weight map of the first label to this PNG")
    p.add_argument("--w0", type=ranged(float, 0), default=10.0, help="weight-map border weight")
    p.add_argument("--sigma", type=ranged(float, 0.1), default=5.0, help="weight-map border width, pixels")
    args = p.parse_args(argv)
    try:
        data_format = detect_format(args.path) if args.data_format == "auto" else args.data_format
        if args.label_path is None and data_format == "pairs" and not labels_beside(args.path):
            args.label_path = "train_label"
        samples = find_samples(args.path, data_format, args.label_path, args.split)
        print("\n".join(summary(args.path, data_format, samples)))
        if args.augmented or args.weight_map:
            first = next((s for s in samples if s.read_label), None)
            if first is None:
                raise DataError(f"{args.path}: no labelled image to draw")
            raw = first.read_image()
            image = normalize(raw, auto_normalization([raw]), source=first.source)
            # nonzero = cell or object, for binary masks and numbered objects alike
            label = read_sample_label(first, image.shape[:2], instance_labels=True)[0]
        if args.augmented:
            write_png(args.augmented, augmented_samples(image, label, args.samples, args.seed))
            print(f"wrote {args.augmented}: {first.source} (top left) and {args.samples} augmented samples")
        if args.weight_map:
            weights = weight_map(label, args.w0, args.sigma)
            write_png(args.weight_map, weight_picture(weights))
            print(f"wrote {args.weight_map}: weights of {first.label_source}, {weights.min():.2f} .. {weights.max():.2f}")
    except DataError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
