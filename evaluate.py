"""Score predicted masks against labels, matched by file name: a table per image and the mean.

    python evaluate.py predict_image/ test_label/ [--json scores.json]

Predictions are masks (0/255 or 0/1); cell (255) is the positive class of Dice.
"""
import argparse
import json
import os
import sys

import numpy as np

from dataloader import DataError, atomic_write, pair_by_name, read_label
from metrics import dice, pixel_accuracy


def score_folder(pred_dir, label_dir):
    """{image name: {metric: value}} plus "mean" over images."""
    rows = {}
    for pred_path, label_path in pair_by_name(pred_dir, label_dir):
        pred, label = read_label(pred_path), read_label(label_path)
        if pred.shape != label.shape:
            raise DataError(f"{pred_path}: prediction is {pred.shape[1]}x{pred.shape[0]}, "
                            f"label {label_path} is {label.shape[1]}x{label.shape[0]}")
        accuracy = pixel_accuracy(pred, label)
        rows[os.path.basename(pred_path)] = dict(pixel_accuracy=accuracy, pixel_error=1 - accuracy,
                                                 dice=dice(pred, label), membrane_dice=dice(pred == 0, label == 0))
    metrics = next(iter(rows.values())).keys()
    return dict(images=rows, mean={m: float(np.mean([r[m] for r in rows.values()])) for m in metrics})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pred_dir", help="folder of predicted masks")
    p.add_argument("label_dir", help="folder of labels with the same file names")
    p.add_argument("--json", help="also write the scores to this JSON file")
    args = p.parse_args(argv)
    try:
        scores = score_folder(args.pred_dir, args.label_dir)
    except DataError as err:
        sys.exit(f"error: {err}")
    metrics = list(scores["mean"])
    print(f"{'image':<20}" + "".join(f"{m:>16}" for m in metrics))
    for name, row in list(scores["images"].items()) + [("mean", scores["mean"])]:
        print(f"{name:<20}" + "".join(f"{row[m]:>16.4f}" for m in metrics))
    if args.json:
        atomic_write(args.json, lambda f: f.write(json.dumps(scores, indent=2).encode()))


if __name__ == "__main__":
    main()
