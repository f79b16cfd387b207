"""A checkpoint's metadata, read and checked in one place: the fields each section may hold and
what each must be (one line naming the checkpoint and the field otherwise), and what the network
was trained on as one typed object whose defaults are those of checkpoints written before a field
existed."""
import json
import math
import re
from dataclasses import asdict, dataclass
from typing import Optional, Tuple

from biounet.data.loader import DEFAULT_PERCENTILES, NORMALIZATIONS
from biounet.evaluation.instances import OBJECT_TARGETS
from biounet.model.unet import NORMS, PADDINGS

FORMAT = "unet-npz/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_whole(value, low, high):
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_text(value):
    return isinstance(value, str) and len(value) < 4096


# What this version reads of a checkpoint's metadata, field by field: (check, what the value must be).
# Fields come and go between versions: a missing one takes its earlier default; one this version does
# not know (written by a newer one) is refused, since it may change what the network's outputs mean.
MODEL_FIELDS = {
    "n_channels": (lambda v: _is_whole(v, 1, 1024), "a whole number of channels, 1-1024"),
    "n_classes": (lambda v: _is_whole(v, 1, 255), "a whole number of outputs, 1-255"),
    "bilinear": (lambda v: isinstance(v, bool), "true or false"),
    "base": (lambda v: _is_whole(v, 1, 1024), "a whole number of channels, 1-1024"),
    "norm": (lambda v: v in NORMS, " or ".join(NORMS)),
    "padding": (lambda v: v in PADDINGS, " or ".join(PADDINGS)),
    "dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
}
MODEL_ADDED_LATER = {"norm": "batch", "padding": "same", "dropout": 0.0}  # networks written before these fields
IMAGE_TYPES = {"uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float16", "float32", "float64"}
DATA_FIELDS = {
    "format": (_is_text, "a dataset layout's name"),
    "img_size": (lambda v: _is_whole(v, 0, 1 << 16), "a whole number of pixels, 0-65536"),
    "ignore_index": (lambda v: _is_whole(v, 0, 255), "a whole number 0-255"),
    "instance_labels": (lambda v: isinstance(v, bool), "true or false"),
    "instances": (lambda v: isinstance(v, bool), "true or false"),  # trained for objects (interior, boundary ...)
    "object_size": (lambda v: _is_number(v) and 0 <= v <= 1 << 16, "a number of pixels, 0-65536"),
    "object_target": (lambda v: v in OBJECT_TARGETS, " or ".join(OBJECT_TARGETS)),
    "normalize": (lambda v: v in NORMALIZATIONS, " or ".join(NORMALIZATIONS)),
    "percentiles": (lambda v: isinstance(v, list) and len(v) == 2 and all(_is_number(p) for p in v)
                    and 0 <= v[0] < v[1] <= 100, "two percentiles, low before high"),
    "input_types": (lambda v: isinstance(v, list) and all(t in IMAGE_TYPES for t in v), "a list of numpy types"),
    "input_levels": (lambda v: isinstance(v, list) and 1 <= len(v) <= 1024 and all(
        isinstance(pair, list) and len(pair) == 2 and all(_is_number(x) for x in pair) for pair in v),
        "1-1024 pairs of numbers"),
}
TOP_FIELDS = {
    "format": (_is_text, "a format name"),  # checked first, on its own
    "backend": (lambda v: v in ("oneflow", "torch"), "oneflow or torch"),
    "source": (_is_text, "text"),
    "model": (lambda v: isinstance(v, dict), "an object"),
    "data": (lambda v: isinstance(v, dict), "an object"),
    "config": (lambda v: isinstance(v, dict), "an object"),  # the settled flags of the run
    "args": (lambda v: isinstance(v, dict), "an object"),  # the flags of the run, as written before there was a config
    "optimizer": (lambda v: True, "an optimizer's state"),  # checked by restore_optimizer
    "epoch": (lambda v: _is_whole(v, 0, 1 << 31), "a whole number of epochs"),
    "best": (lambda v: v is None or _is_number(v), "a number"),
    "best_metric": (_is_text, "a score's name"),
    "stale_epochs": (lambda v: _is_whole(v, 0, 1 << 31), "a whole number of epochs"),
    "scores": (lambda v: isinstance(v, dict), "an object"),
    "rng": (lambda v: isinstance(v, dict), "a random generator's state"),
    "partial": (lambda v: isinstance(v, dict), "an object"),
    "trained_seconds": (lambda v: _is_number(v) and v >= 0, "a number of seconds"),
    "input_scale": (lambda v: _is_number(v) and v > 0, "a number above 0"),
    "output_shift": (_is_number, "a number"),
    "calibrated_threshold": (lambda v: _is_number(v) and 0 < v < 1, "a number in (0, 1)"),
    "seed_threshold": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "seed_size": (lambda v: _is_whole(v, 0, 1 << 31), "a whole number of pixels"),
}
# The settings of the network in the run's configuration: they must be the model's (a checkpoint
# whose configuration says "groupnorm" beside a model of instance norm describes another network).
CONFIG_OF_MODEL = {"norm": "norm", "padding": "padding", "base": "base", "bilinear": "bilinear", "dropout": "dropout",
                   "channels": "n_channels", "outputs": "n_classes"}


class _Refused(Exception):
    """check_fields' one reason, without the checkpoint's path."""


def _check_fields(values, fields, section, required=()):
    if not isinstance(values, dict):
        raise _Refused(f"{section or 'the metadata'} is {type(values).__name__}, not an object")
    prefix = section + "." if section else ""
    unknown = next((key for key in values if key not in fields), None)
    if unknown is not None:
        raise _Refused(f"field {prefix}{str(unknown)[:60]} is unknown to this version (a checkpoint of a newer one?)")
    missing = next((key for key in required if key not in values), None)
    if missing is not None:
        raise _Refused(f"field {prefix}{missing} is missing")
    for key, value in values.items():
        check, what = fields[key]
        if not check(value):
            raise _Refused(f"field {prefix}{key} is {json.dumps(value)[:60]}; this version reads {what}")


def check_meta(meta, path):
    """Stop with one line naming the checkpoint and the field unless the metadata describes a network
    and its input the way this version builds and reads them."""
    version = meta.get("format") if isinstance(meta, dict) else None
    newer = isinstance(version, str) and re.fullmatch(r"unet-npz/\d{1,6}", version)
    if newer and int(version.split("/")[1]) > int(FORMAT.split("/")[1]):
        raise CheckpointError(f"{path}: written by a newer version of this program (format {version}; this "
                              f"version reads {FORMAT}): update the program to use it")
    if version != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format "
                              f"{version if isinstance(meta, dict) else type(meta).__name__!r:.60}")
    try:
        _check_fields(meta, TOP_FIELDS, "", required=("format", "model"))
        _check_fields(meta["model"], MODEL_FIELDS, "model", required=tuple(MODEL_FIELDS))
        _check_fields(meta.get("data", {}), DATA_FIELDS, "data")
        config = meta.get("config", {})
        for key, model_key in CONFIG_OF_MODEL.items():
            if key in config and config[key] != meta["model"][model_key]:
                raise _Refused(f"field config.{key} is {json.dumps(config[key])[:60]}, its model.{model_key} "
                               f"{json.dumps(meta['model'][model_key])}: the two describe different networks")
    except _Refused as reason:
        raise CheckpointError(f"{path}: {reason}")


@dataclass(frozen=True)
class TrainingData:
    """What a checkpoint says of the data its network was trained on (its `data` section). Each
    default is what checkpoints written before that field meant."""
    format: Optional[str] = None  # the dataset's layout (isbi, dsb2018, voc ...), which decides how objects are found
    img_size: int = 0  # every image resized to this square (0: each at its own size)
    ignore_index: int = 255  # the label value left out of the loss and the scores
    instance_labels: bool = False  # labels numbered objects
    instances: bool = False  # the network predicts object classes (interior, boundary ...), not one class
    object_size: float = 0  # the objects' diameter the images were rescaled to (0: not rescaled)
    object_target: str = "boundary"  # the only target before there were three
    normalize: str = "range"
    percentiles: Tuple[float, float] = DEFAULT_PERCENTILES
    input_types: Optional[Tuple[str, ...]] = None  # the training images' types (normalize "range")
    input_levels: Optional[Tuple[Tuple[float, float], ...]] = None  # and their intensity levels

    @classmethod
    def of(cls, meta):
        """The `data` section of a checkpoint's metadata (checked by check_meta) as a TrainingData."""
        data = dict(meta.get("data", {}))
        for key in ("percentiles", "input_types"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        if data.get("input_levels") is not None:
            data["input_levels"] = tuple(tuple(pair) for pair in data["input_levels"])
        return cls(**data)

    def as_meta(self):
        """The `data` section to write: JSON types, fields at their default for older data left out."""
        fields = {key: value for key, value in asdict(self).items() if value is not None}
        return {key: list(map(list, value)) if key == "input_levels" else list(value) if isinstance(value, tuple)
                else value for key, value in fields.items()}
