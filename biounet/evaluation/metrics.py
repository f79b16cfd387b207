"""Segmentation scores: pixel scores per class, and the ISBI 2012 challenge's Rand and information scores.

Masks: 1 (True) = cell, 0 = membrane. Probability maps: the cell probability in [0, 1].

The challenge (Arganda-Carreras et al. 2015, Fiji's "Segmentation evaluation after border
thinning") scores each 2D slice like this: threshold the cell probability at 0.0, 0.1, ..., 0.9;
ground-truth cells are the 4-connected components of cell pixels, membrane pixels are left out
(foreground restriction); predicted cells are the 4-connected components of the thresholded map,
grown over the predicted borders by a 4-connected watershed until the borders are one pixel wide;
each remaining border pixel is a segment of its own. V_rand and V_info are F-scores of the Rand
and information-theoretic split/merge scores; the best over the thresholds counts.
"""
import numpy as np
from skimage.metrics import adapted_rand_error as skimage_adapted_rand_error
from skimage.metrics import variation_of_information

from biounet.data.labels import cells
from biounet.evaluation.instances import seeded_cells

THRESHOLDS = np.round(np.arange(0.0, 1.0, 0.1), 1)


# ---- pixel scores ---------------------------------------------------------------------------

def _ratio(numerator, denominator):
    return 1.0 if denominator == 0 else float(numerator / denominator)


def class_scores(pred, truth):
    """Dice (= F1), IoU, precision and recall of the positive class (1.0 where both are empty)."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    tp = np.count_nonzero(pred & truth)
    fp = np.count_nonzero(pred & ~truth)
    fn = np.count_nonzero(~pred & truth)
    return dict(dice=_ratio(2 * tp, 2 * tp + fp + fn), iou=_ratio(tp, tp + fp + fn),
                precision=_ratio(tp, tp + fp), recall=_ratio(tp, tp + fn))


def dice(pred, truth):
    return class_scores(pred, truth)["dice"]


def pixel_accuracy(pred, truth):
    return float(np.mean(np.asarray(pred, bool) == np.asarray(truth, bool)))


def pixel_scores(pred, truth):
    """Pixel error and accuracy; Dice, IoU, precision, recall of cells and of membranes; mean IoU."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    cell, membrane = class_scores(pred, truth), class_scores(~pred, ~truth)
    accuracy = pixel_accuracy(pred, truth)
    return dict(pixel_error=1.0 - accuracy, pixel_accuracy=accuracy, **cell,
                **{f"membrane_{k}": v for k, v in membrane.items()},
                mean_iou=(cell["iou"] + membrane["iou"]) / 2)


# ---- ISBI 2012 challenge scores -------------------------------------------------------------

def thinned_segments(prob, threshold):
    """Predicted cells at `threshold`, grown over the borders by a 4-connected watershed on the
    membrane probability, leaving one-pixel borders (0): instances.seeded_cells seeded there."""
    return seeded_cells(prob, threshold)


def _entropy(p):
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def rand_and_info_scores(segments, truth_cells):
    """(V_rand, V_info) of `segments` (0 = border: every such pixel is a segment of its own)
    against ground-truth cells (0 = membrane, left out)."""
    inside = truth_cells > 0
    n = np.count_nonzero(inside)
    if n == 0:
        return 1.0, 1.0
    t, s = truth_cells[inside].astype(np.int64), segments[inside].astype(np.int64)
    border = s == 0
    singles = np.count_nonzero(border) / n  # share of the foreground that is single-pixel segments
    pair = t[~border] * (s.max() + 1) + s[~border]
    counts = np.bincount(pair) if pair.size and pair.max() < 1 << 24 else np.unique(pair, return_counts=True)[1]
    joint = counts[counts > 0] / n
    a = np.bincount(t)[1:] / n                 # ground-truth cells (border pixels included)
    b = np.bincount(s[~border])[1:] / n        # predicted segments
    # Rand with N^2 normalization: every single-pixel segment adds (1/n)^2 to the sums.
    sum_ab, sum_a, sum_b = (joint ** 2).sum() + singles / n, (a ** 2).sum(), (b ** 2).sum() + singles / n
    precision, recall = sum_ab / sum_b, sum_ab / sum_a
    v_rand = 2 * precision * recall / (precision + recall)
    # Information: every single-pixel segment adds (1/n) log n to H(S) and to H(S, T).
    single_entropy = singles * np.log(n)
    h_s, h_t = _entropy(b) + single_entropy, _entropy(a)
    mutual = h_s + h_t - (_entropy(joint) + single_entropy)
    v_info = 1.0 if h_s + h_t == 0 else 2 * mutual / (h_s + h_t)
    return float(v_rand), float(v_info)


def isbi_scores(prob, truth, thresholds=THRESHOLDS):
    """The challenge's V_rand and V_info of one slice: each the best over `thresholds`."""
    truth_cells = cells(truth)
    scores = [rand_and_info_scores(thinned_segments(prob, t), truth_cells) for t in thresholds]
    return dict(v_rand=max(s[0] for s in scores), v_info=max(s[1] for s in scores))


def skimage_scores(pred, truth):
    """scikit-image's adapted Rand error and variation of information (in bits) of the predicted
    cells against the true cells (label 0 = membrane left out of the ground truth)."""
    truth_cells, pred_cells = cells(truth), cells(pred)
    error = skimage_adapted_rand_error(truth_cells, pred_cells)[0]
    return dict(adapted_rand_error=float(error),
                vi=float(sum(variation_of_information(truth_cells, pred_cells, ignore_labels=(0,)))))


def all_scores(prob, truth, threshold=0.5):
    """Every score of one slice: pixel scores and skimage's at `threshold`, ISBI's over the sweep."""
    pred = prob > threshold
    return {**pixel_scores(pred, truth), **isbi_scores(prob, truth), **skimage_scores(pred, truth)}


# ---- several classes ------------------------------------------------------------------------

def confusion_matrix(pred, truth, classes, ignore_index=255):
    """classes x classes pixel counts: row = true class, column = predicted; `ignore_index` left out."""
    truth, pred = np.asarray(truth).ravel(), np.asarray(pred).ravel()
    keep = truth != ignore_index
    pairs = truth[keep].astype(np.int64) * classes + pred[keep].astype(np.int64)
    return np.bincount(pairs, minlength=classes * classes).reshape(classes, classes)


def confusion_scores(matrix):
    """Pixel accuracy, and per class IoU and accuracy (recall) with their means (the VOC table).

    A class neither in the truth nor the prediction has no IoU (NaN) and is left out of the mean
    IoU; the mean accuracy is over the classes present in the truth."""
    matrix = np.asarray(matrix, np.float64)
    tp, in_truth, in_pred = np.diag(matrix), matrix.sum(1), matrix.sum(0)
    union = in_truth + in_pred - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        accuracy = np.where(in_truth > 0, tp / in_truth, np.nan)
    scores = dict(pixel_accuracy=_ratio(tp.sum(), matrix.sum()),
                  mean_accuracy=float(np.nanmean(accuracy)) if np.any(in_truth > 0) else 1.0,
                  mean_iou=float(np.nanmean(iou)) if np.any(union > 0) else 1.0)
    scores.update({f"iou_{k}": float(v) for k, v in enumerate(iou)})
    scores.update({f"accuracy_{k}": float(v) for k, v in enumerate(accuracy)})
    return scores
