"""Segmentation scores on numpy masks (1 = cell, 0 = membrane/background)."""
import numpy as np


def pixel_accuracy(pred, truth):
    return float(np.mean(np.asarray(pred, bool) == np.asarray(truth, bool)))


def dice(pred, truth):
    """Dice (= F1) of the positive class; 1.0 when both masks are empty."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(pred, truth).sum() / total)
