"""Scores of predictions against labels: per image, their mean, tables and JSON; folders matched by name.
"""
import json
import os

import numpy as np

from biounet.core.files import DataError, atomic_write, list_images
from biounet.data.datasets import detect_format, find_samples, label_files, page_names
from biounet.data.loader import label_to_classes, normalize, read_label_array, read_tiff_stack
from biounet.evaluation.instances import object_scores
from biounet.evaluation.metrics import all_scores, confusion_matrix, confusion_scores

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
        shown = name + ".png" if " page " in pred_path else os.path.basename(pred_path)
        items.append(scored_item(shown, raw_pred, raw, sources=(pred_path, source), classes=classes,
                                 ignore_index=ignore_index, instance_labels=instance_labels, instances=instances))
    return score_items(items, classes=classes, ignore_index=ignore_index, instances=instances)


def scored_item(name, prediction, label, sources, classes=1, ignore_index=255, instance_labels=False,
                instances=False):
    """(name, prediction, truth) as the scores take them, from a raw prediction (a 0/255 mask or a
    probability map of any type; class indices; numbered objects) and a raw label; `sources` name
    the two in errors."""
    if instances:
        truth, pred = label, prediction
    else:
        truth = label_to_classes(label, sources[1], classes, ignore_index=ignore_index, instances=instance_labels)
        pred = normalize(prediction, "range", source=sources[0]) if classes == 1 else label_to_classes(
            prediction, sources[0], classes, ignore_index)
    if pred.shape[:2] != truth.shape:
        raise DataError(f"{sources[0]}: prediction is {pred.shape[1]}x{pred.shape[0]}, "
                        f"label {sources[1]} is {truth.shape[1]}x{truth.shape[0]}")
    return name, pred if pred.ndim == 2 else pred[..., 0], truth


def score_items(items, classes=1, ignore_index=255, instances=False):
    """The scores of (name, prediction, truth) items (scored_item's)."""
    if instances:
        return score_instances(items)
    return score_binary(items) if classes == 1 else score_multiclass(items, classes, ignore_index)
