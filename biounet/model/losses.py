"""What training minimizes: the losses (one class, several classes), class weights and the learning rate.

Training steps and validation both call `segmentation_loss`, so the two loss curves measure the same thing.
"""
import math

import numpy as np

from biounet.model import backend
from biounet.model.backend import F, flow
from biounet.model.unet import center_crop


def binary_loss(logits, target, dice_weight, weights=None):
    """One class: BCE (weighted per pixel by `weights`) + dice_weight x (1 - soft Dice)."""
    loss = F.binary_cross_entropy_with_logits(logits, target, weight=weights)
    if dice_weight:
        prob = flow.sigmoid(logits)
        soft_dice = (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
        loss = loss + dice_weight * (1 - soft_dice)
    return loss


def multiclass_loss(logits, target, dice_weight, class_weights=None, ignore_index=255):
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


def segmentation_loss(logits, labels, weights, config, class_weights, device):
    """The loss of a batch as `dataloader.stack_batch` gives it (numpy labels and pixel weights),
    cut to the logits' size first (the unpadded net's output is smaller than its input)."""
    crop = lambda a: center_crop(a, logits.shape[2], logits.shape[3])  # noqa: E731
    if config.outputs > 1:  # several classes, or the three of a network for objects
        return multiclass_loss(logits, backend.to_tensor(crop(labels), device, dtype=np.int64),
                               config.dice_weight, class_weights=class_weights, ignore_index=config.ignore_index)
    return binary_loss(logits, backend.to_tensor(crop(labels), device), config.dice_weight,
                       None if weights is None else backend.to_tensor(crop(weights), device))


def median_frequency_weights(counts):
    """Cross-entropy weights from pixel counts per class: median frequency / frequency (absent classes: 0)."""
    frequency = np.asarray(counts, np.float64) / max(int(np.sum(counts)), 1)
    present = frequency > 0
    return np.where(present, np.median(frequency[present]) / np.maximum(frequency, 1e-12), 0.0).astype(np.float32)


def learning_rate(epoch, config, epochs=None):
    """config.lr, or with the cosine schedule falling from it to lr/100 at the last of `epochs`
    (those planned; default config.epochs)."""
    epochs = config.epochs if epochs is None else epochs
    if config.schedule == "constant" or epochs <= 1:
        return config.lr
    progress = epoch / (epochs - 1)
    return config.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))
