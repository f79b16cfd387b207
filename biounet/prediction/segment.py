"""One image segmented: the settings of a prediction, the network's probability maps at the image's
object size, and the decisions taken from them (the mask, the numbered objects). Scripts, volumes
and the Python API all segment through here, so that they give the same outputs."""
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from biounet.data.labels import renumber
from biounet.evaluation.instances import (METHODS, cells_of, foreground, in_diameters, object_method, objects_of,
                                          without_small)
from biounet.model import backend
from biounet.model.checkpoint import CheckpointError, predicted_classes
from biounet.model.meta import TrainingData
from biounet.prediction.inference import predict_at_object_size


@dataclass(frozen=True)
class PredictionSettings:
    """How images are predicted and their outputs decided; the defaults are predict_unet_test.py's."""
    threshold: float = 0.5  # object (cell) probability above which a pixel is in the mask
    seed_threshold: Optional[float] = None  # membranes: cells seeded above this (None: the checkpoint's calibration)
    device: str = "cpu"
    tile: int = 1024  # images larger than this predicted in overlapping tiles (0: whole)
    overlap: int = 128
    tta: bool = True  # the mean of the 8 flips and rotations
    amp: str = "off"  # mixed precision of the forward pass (backend.PRECISIONS)
    batch: int = 1  # views in one forward pass
    object_size: Union[str, float] = "auto"  # the objects' diameter in pixels, "auto" (estimated) or "off"
    objects: str = "auto"  # how objects are found (instances.METHODS), auto: as the checkpoint suits
    min_size: Optional[int] = None  # smallest object in pixels (None: from the object size)
    min_distance: Optional[int] = None  # watershed seeds' least distance (None: from the object size)

    def __post_init__(self):
        checks = [(0 <= self.threshold <= 1, "threshold", "a probability, 0-1"),
                  (self.seed_threshold is None or 0 <= self.seed_threshold <= 1, "seed_threshold", "a probability, 0-1"),
                  (self.objects in ("auto",) + METHODS, "objects", " or ".join(("auto",) + METHODS)),
                  (self.amp in backend.PRECISIONS, "amp", " or ".join(backend.PRECISIONS)),
                  (self.tile == 0 or 0 <= self.overlap < self.tile, "overlap", "at least 0 and below the tile"),
                  (self.object_size in ("auto", "off") or (isinstance(self.object_size, (int, float))
                                                           and self.object_size > 0), "object_size",
                   "auto, off or a diameter in pixels above 0")]
        for ok, name, what in checks:
            if not ok:
                raise ValueError(f"{name} {getattr(self, name)!r}: must be {what}")


@dataclass
class Segmentation:
    """What prediction makes of one image, each at the image's own height and width."""
    probabilities: np.ndarray  # float32: H x W (one class) or H x W x C (several, or a network for objects)
    mask: np.ndarray  # uint8: 0/255 (one class) or class indices
    objects: Optional[np.ndarray]  # uint16 numbered objects (0: background), one class only
    diameter: Optional[float]  # the objects' median diameter in pixels, where it was given or estimated


def object_method_for(meta, objects="auto", checkpoint="the checkpoint"):
    """The method that turns this network's probabilities into objects: `objects` (instances.METHODS),
    or for auto the one that suits the data it was trained on (instances.object_method)."""
    data = TrainingData.of(meta)
    if objects == "interior" and not data.instances:
        raise CheckpointError(f"{checkpoint}: --objects interior needs a network trained for objects "
                              f"(--instances); this one predicts one class: use --objects watershed")
    return object_method(data.format, data.instances, data.object_target) if objects == "auto" else objects


def seeds_for(meta, settings):
    """Where the cells between membranes are seeded (cells_of): (the settings' seed threshold, else the
    checkpoint's calibrated one, else the threshold; the checkpoint's least seed size, else 0). None
    for networks of other objects."""
    if object_method_for(meta) != "cells" or predicted_classes(meta) > 1:
        return None
    threshold = meta.get("seed_threshold", settings.threshold) if settings.seed_threshold is None else \
        settings.seed_threshold
    return threshold, meta.get("seed_size", 0)


def probability_maps(model, meta, image, settings, source="image"):
    """(the network's probability maps of a normalized image, the objects' diameter or None)."""
    with backend.autocast(settings.device, settings.amp):
        return predict_at_object_size(model, meta, image, object_size=settings.object_size, device=settings.device,
                                      tile=settings.tile, overlap=settings.overlap, tta=settings.tta, source=source,
                                      batch=settings.batch)


def decide(maps, meta, settings, diameter=None, method=None):
    """The Segmentation of probability `maps`: the mask at the settings' threshold (several classes:
    the likeliest), and with an object `method` (object_method_for) the numbered objects."""
    prob = foreground(maps) if TrainingData.of(meta).instances else maps
    if prob.ndim == 3:
        return Segmentation(prob, prob.argmax(axis=2).astype(np.uint8), None, diameter)
    seeds = seeds_for(meta, settings)
    min_size, min_distance = in_diameters(diameter, settings.min_size, settings.min_distance)
    cells = None if seeds is None else cells_of(prob, settings.threshold, seeds)  # one watershed for both
    mask = np.where(prob > settings.threshold if cells is None else cells > 0, 255, 0).astype(np.uint8)
    objects = None
    if method == "cells" and cells is not None:
        objects = without_small(renumber(cells), min_size)
    elif method:
        objects = objects_of(maps, settings.threshold, method, min_size, min_distance, seeds=seeds)
    return Segmentation(prob, mask, objects, diameter)
