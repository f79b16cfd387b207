"""The training losses and the learning-rate schedule, against the same sums written out in numpy."""
import argparse

import numpy as np
import pytest

from biounet.model.backend import to_tensor
from biounet.model.losses import binary_loss, learning_rate, multiclass_loss

rng = np.random.default_rng(0)
LOGITS = rng.normal(size=(2, 1, 5, 6)).astype(np.float32)
TARGET = (rng.random((2, 1, 5, 6)) > 0.5).astype(np.float32)
WEIGHTS = rng.uniform(0.5, 10, (2, 1, 5, 6)).astype(np.float32)


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_the_one_class_loss_is_the_mean_of_per_pixel_weighted_binary_cross_entropy():
    p = sigmoid(LOGITS)
    bce = -(TARGET * np.log(p) + (1 - TARGET) * np.log(1 - p))
    assert binary_loss(to_tensor(LOGITS), to_tensor(TARGET), 0.0).item() == pytest.approx(bce.mean(), rel=1e-5)
    weighted = binary_loss(to_tensor(LOGITS), to_tensor(TARGET), 0.0, to_tensor(WEIGHTS)).item()
    assert weighted == pytest.approx((WEIGHTS * bce).mean(), rel=1e-5)


def test_the_dice_term_adds_its_weight_times_one_minus_soft_dice():
    p = sigmoid(LOGITS)
    soft_dice = (2 * (p * TARGET).sum() + 1) / (p.sum() + TARGET.sum() + 1)
    plain = binary_loss(to_tensor(LOGITS), to_tensor(TARGET), 0.0).item()
    with_dice = binary_loss(to_tensor(LOGITS), to_tensor(TARGET), 0.5).item()
    assert with_dice - plain == pytest.approx(0.5 * (1 - soft_dice), rel=1e-5)


def test_several_classes_weigh_cross_entropy_by_class_and_average_dice_over_classes_leaving_out_ignored():
    logits = rng.normal(size=(1, 3, 4, 5)).astype(np.float32)
    target = rng.integers(0, 3, (1, 4, 5))
    target[0, 0, :2] = 255
    class_weights = np.array([1.0, 2.0, 0.5], np.float32)
    keep = target != 255
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    picked = np.take_along_axis(prob, np.where(keep, target, 0)[:, None], 1)[:, 0]
    w = class_weights[np.where(keep, target, 0)] * keep
    cross_entropy = -(w * np.log(picked)).sum() / w.sum()
    onehot = np.stack([(target == c) & keep for c in range(3)], 1)
    masked = prob * keep[:, None]
    dice = (2 * (masked * onehot).sum(axis=(0, 2, 3)) + 1) / ((masked + onehot).sum(axis=(0, 2, 3)) + 1)
    loss = multiclass_loss(to_tensor(logits), to_tensor(target, dtype=np.int64), 1.0, to_tensor(class_weights),
                              ignore_index=255).item()
    assert loss == pytest.approx(cross_entropy + (1 - dice.mean()), rel=1e-5)


def test_the_cosine_schedule_falls_from_lr_to_a_hundredth_and_constant_stays():
    cosine = argparse.Namespace(lr=0.1, epochs=5, schedule="cosine")
    rates = [learning_rate(epoch, cosine) for epoch in range(5)]
    assert rates[0] == pytest.approx(0.1) and rates[-1] == pytest.approx(0.001)
    assert rates[2] == pytest.approx(0.1 * (0.01 + 0.99 * 0.5))  # halfway: the cosine's middle
    assert all(a > b for a, b in zip(rates, rates[1:]))
    constant = argparse.Namespace(lr=0.1, epochs=5, schedule="constant")
    assert [learning_rate(epoch, constant) for epoch in range(5)] == [0.1] * 5
    assert learning_rate(0, argparse.Namespace(lr=0.1, epochs=1, schedule="cosine")) == 0.1
