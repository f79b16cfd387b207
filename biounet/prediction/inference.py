"""Inference: a trained network's probabilities for whole images of any size, and its scores.

Used by prediction (predict_unet_test.py) and by training (validation, threshold calibration):
the forward pass with the borders each network needs, overlapping tiles blended for large images,
the 8 flips and rotations averaged, the decision threshold that fits a set of images best, and the
validation scores with the loss computed exactly as training computes it.
"""
import sys

import numpy as np

from biounet.data.labels import cells
from biounet.data.loader import match_channels, resize, stack_batch
from biounet.evaluation.instances import (estimate_diameter, foreground, in_diameters, object_method, object_scores,
                                          objects_of, seeded_cells, size_scale)
from biounet.evaluation.metrics import (confusion_matrix, confusion_scores, isbi_scores, pixel_scores,
                                        rand_and_info_scores)
from biounet.model import backend
from biounet.model.backend import flow
from biounet.model.losses import segmentation_loss
from biounet.model.meta import TrainingData
from biounet.model.unet import MIN_SIDE, mirror_for_valid, smallest_side


def image_logits(model, image, device, input_scale=1.0):
    """The network's output (1 x N x H x W tensor) for one whole [0, 1] image, H x W or H x W x C."""
    return batch_logits(model, [image], device, input_scale)


def batch_logits(model, images, device, input_scale=1.0):
    """The network's output (B x N x H x W tensor) for whole [0, 1] images of one shape, in one pass.

    The unpadded net sees an image with mirrored borders (the paper's overlap-tile input); an image
    smaller than a padded net takes is mirrored up to its smallest input; either way the output is
    cut back to the image."""
    height, width = images[0].shape[:2]
    batch = np.stack([_network_planes(model, image) for image in images])
    return model(backend.to_tensor(batch * input_scale, device))[:, :, :height, :width]


def _network_planes(model, image):
    if model.padding == "valid":
        image = mirror_for_valid(image)
    else:
        grow = [(0, max(0, smallest_side(model.norm) - side)) for side in image.shape[:2]]
        image = np.pad(image, grow + [(0, 0)] * (image.ndim - 2), mode="symmetric")
    return np.ascontiguousarray(image.transpose(2, 0, 1) if image.ndim == 3 else image[None])


def probability_of(logits):
    """Probabilities of one image's logits as numpy: H x W (cell/object) with one class, H x W x N with N."""
    logits = logits.float()  # from a half-precision forward pass (--amp) too
    if logits.shape[1] == 1:
        return backend.to_numpy(flow.sigmoid(logits))[0, 0]
    return backend.to_numpy(flow.softmax(logits, dim=1))[0].transpose(1, 2, 0)


def _forward(model, image, device, input_scale):
    with flow.no_grad():
        return probability_of(image_logits(model, image, device, input_scale))


def _tile_starts(length, tile, stride):
    return list(range(0, length - tile, stride)) + [length - tile]


def _blend_window(height, width, overlap):
    """Tile weights: 1 inside, falling linearly towards the edges over `overlap` pixels."""
    def ramp(n):
        k = min(overlap, n // 2)
        r = np.ones(n, np.float32)
        if k:
            r[:k] = (np.arange(k) + 1) / (k + 1)
            r[n - k:] = r[:k][::-1]
        return r
    return np.outer(ramp(height), ramp(width))


def predict_tiled(model, image, device, input_scale=1.0, tile=1024, overlap=128):
    """Cell probability of an image of any size, `tile` x `tile` pieces at a time (0: whole image).

    Overlapping tiles are blended with weights that fade out at their edges, so seams do not show
    and memory stays bounded by the tile size."""
    height, width = image.shape[:2]
    if tile <= 0 or (height <= tile and width <= tile):
        return _forward(model, image, device, input_scale)
    th, tw = min(tile, height), min(tile, width)
    window = _blend_window(th, tw, overlap)
    total, weight = None, np.zeros((height, width), np.float32)
    for y in _tile_starts(height, th, tile - overlap):
        for x in _tile_starts(width, tw, tile - overlap):
            prob = _forward(model, image[y:y + th, x:x + tw], device, input_scale)
            if total is None:
                total = np.zeros((height, width) + prob.shape[2:], np.float32)
            total[y:y + th, x:x + tw] += (window if prob.ndim == 2 else window[..., None]) * prob
            weight[y:y + th, x:x + tw] += window
    return total / (weight if total.ndim == 2 else weight[..., None])


VIEWS = [(k, flip) for k in range(4) for flip in (False, True)]  # the 8 flips and 90-degree rotations


def predict_probability(model, image, device, input_scale=1.0, tile=1024, overlap=128, tta=False, batch=1):
    """Cell probability (H x W float32; H x W x N for N classes) of a [0, 1] image (H x W or
    H x W x C); with `tta` the mean over its 8 flips and 90-degree rotations, each mapped back,
    up to `batch` views in one forward pass where the image fits in one tile."""
    if not tta:
        return predict_tiled(model, image, device, input_scale=input_scale, tile=tile, overlap=overlap)
    views = [np.ascontiguousarray(np.rot90(image, k)[:, ::-1] if flip else np.rot90(image, k)) for k, flip in VIEWS]
    if batch > 1 and (tile <= 0 or max(image.shape[:2]) <= tile):
        probs = _batched_views(model, views, device, input_scale=input_scale, batch=batch)
    else:
        probs = [predict_tiled(model, view, device, input_scale=input_scale, tile=tile, overlap=overlap)
                 for view in views]
    return sum(np.rot90(prob[:, ::-1] if flip else prob, -k) for prob, (k, flip) in zip(probs, VIEWS)) / 8


def _batched_views(model, views, device, input_scale, batch):
    """The probabilities of the views, those of one shape (all, or every other: the quarter turns of a
    rectangle) `batch` at a time."""
    probs = [None] * len(views)
    for shape in {view.shape for view in views}:
        same = [i for i, view in enumerate(views) if view.shape == shape]
        for start in range(0, len(same), batch):
            chunk = same[start:start + batch]
            with flow.no_grad():
                logits = batch_logits(model, [views[i] for i in chunk], device, input_scale)
            for n, i in enumerate(chunk):
                probs[i] = probability_of(logits[n:n + 1])
    return probs


def predict_sample(model, meta, image, *, device="cpu", tile=1024, overlap=128, tta=False, source="image", batch=1):
    """Probability map of a normalized image at its own size, whatever the size trained on
    (grey and RGB fit networks for either; other channel counts must match the network's);
    tiles, views and batch as predict_probability's."""
    image = match_channels(image, model.n_channels, source)
    size = TrainingData.of(meta).img_size
    resized = resize(image, (size, size)) if size else image
    prob = predict_probability(model, resized, device, input_scale=meta.get("input_scale", 1.0), tile=tile,
                               overlap=overlap, tta=tta, batch=batch)
    return resize(prob, image.shape[:2]) if size else prob


def predict_at_object_size(model, meta, image, *, object_size="auto", **forward):
    """(probability map at the image's own size, its objects' median diameter in pixels or None):
    predict_sample of the image rescaled so that its objects are as wide as the network's training
    objects (the checkpoint's object_size), their diameter given (`object_size` pixels) or, with
    auto, estimated from two quick passes (instances.estimate_diameter); "off", or a network
    trained at every image's own scale, predicts at the image's own scale (a given diameter is still
    returned, for the objects' post-processing). `forward`: predict_sample's keywords."""
    data = TrainingData.of(meta)
    standard = data.object_size
    if object_size == "off" or (object_size == "auto" and not standard):
        return predict_sample(model, meta, image, **forward), None

    def scaled_prediction(scale, views):
        shape = tuple(max(MIN_SIDE, round(side * scale)) for side in image.shape[:2])
        return predict_sample(model, meta, resize(image, shape), **{**forward, "tta": views})
    diameter = object_size
    if object_size == "auto":
        method = "cells" if object_method(data.format) == "cells" else "watershed"  # on the foreground alone
        diameter, warning = estimate_diameter(lambda scale: foreground(scaled_prediction(scale, False)), standard,
                                              method)
        if warning:
            print(f"warning: {forward.get('source', 'image')}: {warning}", file=sys.stderr)
    scale = size_scale(diameter, standard) if standard else 1.0
    return resize(scaled_prediction(scale, forward.get("tta", False)), image.shape[:2]), diameter


def probability_values(prob, bits):
    """Probabilities in [0, 1] as written: 8- or 16-bit integers (0 .. 2^bits - 1), or float32."""
    if bits == 32:
        return prob.astype(np.float32)
    return np.round(prob * (2 ** bits - 1)).astype(np.uint16 if bits == 16 else np.uint8)


THRESHOLDS = np.round(np.arange(0.05, 0.96, 0.05), 2)  # the cell-probability thresholds calibration tries
SEEDS = [(threshold, size) for threshold in (0.3, 0.5, 0.7) for size in (0, 50, 200)]  # and the seeds of cells


def threshold_sweeps(model, dataset, device, seeds=False):
    """(per threshold of THRESHOLDS the pixel error (share of wrong pixels) of each of a dataset's
    images, with `seeds` per (seed threshold, least seed size) of SEEDS the challenge's V_rand of
    the seeded_cells, each summed over the images: sums of a dataset's parts add up to the whole's)."""
    errors, v_rands = np.zeros(len(THRESHOLDS)), np.zeros(len(SEEDS))
    for image, label in zip(dataset.images, dataset.labels):
        prob = predict_probability(model, image, device, tile=0)
        errors += [np.mean((prob > t) != label) for t in THRESHOLDS]
        if seeds:
            truth = cells(label)
            v_rands += [rand_and_info_scores(seeded_cells(prob, *seed), truth)[0] for seed in SEEDS]
    return errors, v_rands


def best_threshold(errors):
    """(threshold, its pixel error, the pixel error at 0.5) of the mean `errors` per threshold of THRESHOLDS:
    the threshold with the fewest wrong pixels."""
    best = int(np.argmin(errors))
    return float(THRESHOLDS[best]), float(errors[best]), float(errors[list(THRESHOLDS).index(0.5)])


def best_seeds(v_rands, threshold):
    """((seed threshold, least seed size), their mean V_rand) of the mean `v_rands` per seeds of SEEDS,
    the threshold said in the probabilities of a network calibrated to decide at `threshold` (its
    0.5): raw p becomes p (1 - t) / (p (1 - t) + (1 - p) t)."""
    best = int(np.argmax(v_rands))
    raw, size = SEEDS[best]
    shifted = raw * (1 - threshold) / (raw * (1 - threshold) + (1 - raw) * threshold)
    return (float(shifted), size), float(v_rands[best])


def scores_v_rand(config, dataset):
    """Whether validation computes ISBI's V_rand (ten watersheds an image): for membranes, not for
    numbered objects (scored by val_map) unless --best-metric asks for it."""
    return dataset.instances is None or config.best_metric == "val_v_rand"


def _validation_logits(model, dataset, batch, device):
    """(index, image, label, its 1 x N x H x W logits) of each validation image, the forward passes
    taking up to `batch` consecutive images of one shape at once (a GPU's speed; the same logits)."""
    start = 0
    while start < len(dataset):
        end = start + 1  # the shapes are known without reading the images (lazy ones may not stay cached)
        while end < min(len(dataset), start + batch) and dataset.shapes[end] == dataset.shapes[start]:
            end += 1
        images = [dataset.images[i] for i in range(start, end)]
        logits = batch_logits(model, images, device)
        for k, image in enumerate(images):
            yield start + k, image, dataset.labels[start + k], logits[k:k + 1]
        start = end


def validate(model, dataset, weights, config, class_weights, device):
    """Scores of whole validation images: val_loss as training computes its loss (segmentation_loss,
    with the pixel `weights` if any, the Dice term and class weights); with one class the mean pixel
    error, Dice and ISBI V_rand (where objects are numbered, instead the DSB 2018 object score of
    the watershed's objects, val_map; a network for objects is scored on its foreground and
    objects); with several the pixel accuracy and mean IoU of the summed confusion."""
    model.eval()
    losses, rows, confusion = [], [], 0
    method = object_method(config.data_format, config.instances, config.object_target)
    with flow.no_grad():
        batch = max(1, config.batch_size // config.processes)
        for i, image, label, logits in _validation_logits(model, dataset, batch, device):
            _, labels, pixel_weights = stack_batch([(image, label, None if weights is None else weights[i])],
                                                   dataset.classes)
            losses.append(segmentation_loss(logits, labels, pixel_weights, config=config, class_weights=class_weights,
                                            device=device).item())
            prob = probability_of(logits)
            if config.classes > 1:
                confusion = confusion + confusion_matrix(prob.argmax(axis=2), label, dataset.classes,
                                                         config.ignore_index)
            else:
                cell, label = foreground(prob), label > 0  # objects' three classes: background or not
                pixel = pixel_scores(cell > 0.5, label)
                rows.append(dict(val_pixel_error=pixel["pixel_error"], val_dice=pixel["dice"]))
                if scores_v_rand(config, dataset):
                    rows[-1]["val_v_rand"] = isbi_scores(cell, label)["v_rand"]
                if dataset.instances is not None:  # numbered objects: the DSB 2018 object score too
                    objects = objects_of(prob, 0.5, method, *in_diameters(config.object_size or None))
                    rows[-1]["val_map"] = object_scores(objects, dataset.instances[i])["map_05_095"]
    scores = dict(val_loss=float(np.mean(losses)))
    if config.classes > 1:
        overall = confusion_scores(confusion)
        return dict(scores, val_pixel_accuracy=overall["pixel_accuracy"], val_miou=overall["mean_iou"])
    return dict(scores, **{key: float(np.mean([row[key] for row in rows])) for key in rows[0]})
