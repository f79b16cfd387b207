"""Score predictions against labels, matched by file name: a table per image, the mean, and JSON.

    python evaluate.py predict_image/ test_label/ [--json scores.json]

Predictions are masks (0/255) or cell-probability maps (8- or 16-bit PNG, `predict_unet_test.py
--save-prob`). The ISBI challenge's V_rand and V_info sweep the threshold, so they reward
probability maps; pixel scores and scikit-image's adapted Rand error and VI use 0.5.
"""
import argparse
import json
import os
import sys

import numpy as np

from dataloader import DataError, atomic_write, pair_by_name, read_image, read_label
from metrics import all_scores

TABLE = ["pixel_error", "dice", "iou", "mean_iou", "v_rand", "v_info", "adapted_rand_error", "vi"]


def score_folder(pred_dir, label_dir):
    """{"images": {name: scores}, "mean": {metric: mean over images}}."""
    rows = {}
    for pred_path, label_path in pair_by_name(pred_dir, label_dir):
        prob, label = read_image(pred_path), read_label(label_path)
        if prob.shape != label.shape:
            raise DataError(f"{pred_path}: prediction is {prob.shape[1]}x{prob.shape[0]}, "
                            f"label {label_path} is {label.shape[1]}x{label.shape[0]}")
        rows[os.path.basename(pred_path)] = all_scores(prob, label)
    metrics = next(iter(rows.values())).keys()
    return dict(images=rows, mean={m: float(np.mean([r[m] for r in rows.values()])) for m in metrics})


def format_table(scores):
    lines = [f"{'image':<16}" + "".join(f"{m:>{max(len(m), 7) + 2}}" for m in TABLE)]
    for name, row in list(scores["images"].items()) + [("mean", scores["mean"])]:
        lines.append(f"{name:<16}" + "".join(f"{row[m]:>{max(len(m), 7) + 2}.4f}" for m in TABLE))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pred_dir", help="folder of predicted masks or probability maps")
    p.add_argument("label_dir", help="folder of labels with the same file names (255 = cell)")
    p.add_argument("--json", help="also write every score, per image and mean, to this JSON file")
    args = p.parse_args(argv)
    try:
        scores = score_folder(args.pred_dir, args.label_dir)
    except DataError as err:
        sys.exit(f"error: {err}")
    print(format_table(scores))
    if args.json:
        atomic_write(args.json, lambda f: f.write(json.dumps(scores, indent=2).encode()))


if __name__ == "__main__":
    main()
