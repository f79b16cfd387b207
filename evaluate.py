"""Score predictions against labels, matched by name: a table per image, the mean, and JSON.

    python evaluate.py predict_prob/ test_label/ [--json scores.json]
    python evaluate.py predict_image/ ../stage1_train/                      # DSB 2018 masks
    python evaluate.py predict_image/ VOC2012/ --classes 21 --split val     # mean IoU
    python evaluate.py --instances predict_instances/ ../stage1_train/     # DSB 2018 object scores

One class: predictions are masks (0/255) or cell-probability maps (8- or 16-bit PNG,
`predict_unet_test.py --save-prob`). The ISBI challenge's V_rand and V_info sweep the threshold,
so they reward probability maps; pixel scores and scikit-image's adapted Rand error and VI use 0.5.
Several classes: predictions are class-index PNGs; the mean row comes from the confusion matrix
summed over all images (as VOC scores), with IoU and accuracy per class.
--instances: predictions are label images numbering objects (16-bit PNG or TIFF, `bash test.sh`
writes them to predict_instances/), labels DSB 2018 masks/ folders or label images numbering
objects; scores per object (instances.py): the DSB 2018 metric map_05_095, ap50, f1_50, aji.
"""
import json
import os
import sys

import numpy as np

from cli import ArgumentParser, file_to_write, ranged
from dataloader import label_to_classes, normalize, read_label_array, read_tiff_stack
from datasets import FORMATS, detect_format, find_samples, label_files, page_names
from files import DataError, atomic_write, list_images
from instances import object_scores
from metrics import all_scores, confusion_matrix, confusion_scores

BINARY_TABLE = ["pixel_error", "dice", "iou", "mean_iou", "v_rand", "v_info", "adapted_rand_error", "vi"]
MULTICLASS_TABLE = ["pixel_accuracy", "mean_accuracy", "mean_iou"]
INSTANCE_TABLE = ["map_05_095", "ap50", "f1_50", "aji", "objects_predicted", "objects_true"]


def score_binary(items, threshold=0.5):
    """{"images": {name: scores}, "mean": {metric: mean over images}} of (name, prob, truth) items."""
    rows = {name: all_scores(prob, truth, threshold) for name, prob, truth in items}
    metrics = next(iter(rows.values())).keys()
    return dict(images=rows, mean={m: float(np.mean([r[m] for r in rows.values()])) for m in metrics})


def score_multiclass(items, classes, ignore_index=255):
    """Scores of (name, probabilities H x W x N or class indices H x W, truth) items; "mean" from
    the summed confusion matrix."""
    rows, total = {}, np.zeros((classes, classes), np.int64)
    for name, pred, truth in items:
        pred = pred.argmax(axis=2) if pred.ndim == 3 else pred
        matrix = confusion_matrix(pred, truth, classes, ignore_index)
        rows[name] = {k: v for k, v in confusion_scores(matrix).items() if k in MULTICLASS_TABLE}
        total += matrix
    return dict(images=rows, mean=confusion_scores(total), classes=classes)


def score_instances(items):
    """{"images": {name: object scores}, "mean": {score: mean over images}} of (name, pred, truth) items."""
    rows = {name: object_scores(pred, truth) for name, pred, truth in items}
    return dict(images=rows, mean={m: float(np.mean([r[m] for r in rows.values()])) for m in INSTANCE_TABLE},
                instances=True)


def format_table(scores):
    columns = MULTICLASS_TABLE if "classes" in scores else INSTANCE_TABLE if "instances" in scores else BINARY_TABLE
    width = max([16] + [len(name) + 2 for name in scores["images"]])
    lines = [f"{'image':<{width}}" + "".join(f"{m:>{max(len(m), 7) + 2}}" for m in columns)]
    for name, row in list(scores["images"].items()) + [("mean", scores["mean"])]:
        lines.append(f"{name:<{width}}" + "".join(f"{row[m]:>{max(len(m), 7) + 2}.4f}" for m in columns))
    if "classes" in scores:
        mean = scores["mean"]
        lines += [f"class {k:>3}: IoU {mean[f'iou_{k}']:.4f}  accuracy {mean[f'accuracy_{k}']:.4f}"
                  for k in range(scores["classes"])]
    return "\n".join(lines)


def _json_ready(value):
    """NaN (a class in neither truth nor prediction has no IoU) as null: JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    return None if isinstance(value, float) and np.isnan(value) else value


def write_json(path, scores):
    atomic_write(path, lambda f: f.write(json.dumps(_json_ready(scores), indent=2, allow_nan=False).encode()))


def read_labels(label_path, data_format="auto", split=None, instances=False):
    """{name: (source, raw label array)} from a label folder or a dataset of any layout; with
    `instances`, the numbered objects (DSB 2018: its masks/ made one label image)."""
    data_format = detect_format(label_path) if data_format == "auto" else data_format
    if data_format == "pairs":
        return {stem: (path, read_label_array(path)) for stem, path in label_files(label_path).items()}
    samples = find_samples(label_path, data_format, split=split)
    if instances:
        return {s.name: (s.label_source, s.read_instances()) for s in samples if s.read_instances}
    return {s.name: (s.label_source, s.read_label()) for s in samples if s.read_label}


def predictions(pred_dir):
    """(name, source, values) of every prediction in a folder: an image file each (named by its
    file), or each page of a TIFF stack (what prediction writes for a volume), named as datasets.py
    names a volume's pages."""
    for path in list_images(pred_dir):
        if path.lower().endswith((".tif", ".tiff")):
            pages = read_tiff_stack(path)
            if len(pages) > 1:
                yield from ((name, f"{path} page {i}", page) for i, (name, page) in
                            enumerate(zip(page_names(path, len(pages)), pages)))
                continue
        yield os.path.splitext(os.path.basename(path))[0], path, read_label_array(path)


def score_folder(pred_dir, label_path, classes=1, ignore_index=255, data_format="auto", split=None,
                 instance_labels=False, instances=False):
    """Scores of every prediction in `pred_dir` against its label (every prediction needs one);
    `instances`: per object, of label images against numbered labels."""
    labels = read_labels(label_path, data_format, split, instances)
    items = []
    for name, pred_path, raw_pred in predictions(pred_dir):
        if name not in labels:
            raise DataError(f"{pred_path}: no label named {name} in {label_path}")
        source, raw = labels[name]
        if instances:
            truth, pred = raw, raw_pred
        else:
            truth = label_to_classes(raw, source, classes, ignore_index, instance_labels)
            pred = normalize(raw_pred, "range", source=pred_path) if classes == 1 else label_to_classes(
                raw_pred, pred_path, classes, ignore_index)
        if pred.shape[:2] != truth.shape:
            raise DataError(f"{pred_path}: prediction is {pred.shape[1]}x{pred.shape[0]}, "
                            f"label {source} is {truth.shape[1]}x{truth.shape[0]}")
        shown = name + ".png" if " page " in pred_path else os.path.basename(pred_path)
        items.append((shown, pred if pred.ndim == 2 else pred[..., 0], truth))
    if instances:
        return score_instances(items)
    return score_binary(items) if classes == 1 else score_multiclass(items, classes, ignore_index)


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("pred_dir", help="folder of predicted masks, probability maps or class-index PNGs")
    p.add_argument("labels", help="label folder with the same file names (255 = cell), or a DSB 2018, VOC or "
                                  "TIFF dataset")
    p.add_argument("--data-format", choices=("auto",) + FORMATS, default="auto", help="layout of LABELS")
    p.add_argument("--split", default="val", help="VOC: the ImageSets/Segmentation list")
    p.add_argument("--classes", type=ranged(int, 1, 255), default=1, help="classes the network predicts (1: binary)")
    p.add_argument("--ignore-index", type=ranged(int, 0, 255), default=255, help="label value left out of the scores")
    p.add_argument("--instance-labels", action="store_true", help="labels number objects: nonzero = object")
    p.add_argument("--instances", action="store_true",
                   help="score objects: PRED_DIR holds label images numbering objects, LABELS numbers them too")
    p.add_argument("--json", type=file_to_write, help="also write every score, per image and mean, to this JSON file")
    args = p.parse_args(argv)
    try:
        scores = score_folder(args.pred_dir, args.labels, args.classes, args.ignore_index, args.data_format,
                              args.split, args.instance_labels, args.instances)
    except DataError as err:
        sys.exit(f"error: {err}")
    print(format_table(scores))
    if args.json:
        write_json(args.json, scores)


if __name__ == "__main__":
    main()
