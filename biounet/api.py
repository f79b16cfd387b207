"""The Python API: what the scripts do, from a notebook or another program, with arrays in and out.

    import biounet
    model = biounet.load_model("checkpoints/best.npz")        # or pretrained=True: the original example's
    result = model.predict(image)                              # 2D, any bit depth, channels last or first
    result.mask, result.objects, result.probabilities          # numpy arrays at the image's size
    stack = model.predict_stack(volume)                        # Z x H x W, slice by slice
    stores = model.predict_blocks("big.ome.zarr", out="pred")  # zarr / dask, block by block, as test.sh does
    run = biounet.train("train_image", "train_label", time_budget=5)   # or images=[...], labels=[...]
    scores = biounet.evaluate(result.mask, truth)              # the scores biounet-evaluate prints

Nothing is written unless asked (predict_blocks writes its stores into `out`, a temporary folder by
default). Settings are keyword arguments with the scripts' defaults: PredictionSettings for
prediction, the training flags (`biounet-train --help`, dashes as underscores) for train.
"""
import contextlib
import io
import os
import tempfile
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Union

import numpy as np
import tifffile

from biounet.core.files import DataError, atomic_write
from biounet.data.loader import MAX_GUESSED_CHANNELS, image_from_array
from biounet.evaluation.scores import score_items, scored_item
from biounet.model import backend
from biounet.model.checkpoint import RunFolder, build_model, network_input, predicted_classes
from biounet.model.meta import TrainingData
from biounet.prediction.segment import PredictionSettings, Segmentation, decide, object_method_for, probability_maps
from biounet.prediction.volumes import HALO, predict_volume
from biounet.training import flags as training_flags
from biounet.training.train import Stopped, StopRequest
from biounet.training.train import train as run_training

PathLike = Union[str, os.PathLike]


class Model:
    """A trained U-Net with what its checkpoint says of it (load_model makes one)."""

    def __init__(self, network, meta: dict, checkpoint: str, device: str):
        self.network, self.meta, self.checkpoint, self.device = network, meta, checkpoint, device

    @property
    def channels(self) -> int:
        """The image channels the network takes (grey and RGB images fit either 1 or 3)."""
        return self.network.n_channels

    @property
    def classes(self) -> int:
        """The classes of its masks: 1 (cells or objects against background) or several."""
        return predicted_classes(self.meta)

    @property
    def training_data(self) -> TrainingData:
        """What it was trained on: layout, normalization, object size ..."""
        return TrainingData.of(self.meta)

    def fine_tuning(self) -> dict:
        """The training keywords that start a run from this model's weights, with its network and
        input normalization: biounet.train(images=..., labels=..., **model.fine_tuning())."""
        if isinstance(self.checkpoint, tuple):
            raise ValueError(f"an ensemble of {len(self.checkpoint)} checkpoints cannot be fine-tuned as one: "
                             f"load one of them")
        network, data = self.meta["model"], self.training_data
        keywords = dict(init_from=self.checkpoint, base=network["base"], norm=network["norm"],
                        padding=network["padding"], bilinear=network["bilinear"] or None, dropout=network["dropout"],
                        instances=data.instances, normalize=data.normalize, percentiles=list(data.percentiles))
        if data.instances:
            keywords["object_target"] = data.object_target
        else:
            keywords["classes"] = self.classes
        return keywords

    def predict(self, image: np.ndarray, *, channel_axis: Optional[int] = None, objects: bool = True,
                **settings) -> Segmentation:
        """Segment one 2D image (H x W, or with channels: last, first, or at `channel_axis`; any bit
        depth) as predict_unet_test.py does. `settings`: PredictionSettings' fields (threshold, tta,
        tile, object_size, objects, min_size ...). Returns its probabilities, mask and (one class,
        `objects`) numbered objects."""
        maps, diameter = self.probability_maps(image, channel_axis=channel_axis, **settings)
        return self.decide(maps, diameter=diameter, objects=objects, **settings)

    def probability_maps(self, image: np.ndarray, *, channel_axis: Optional[int] = None, **settings):
        """(the network's probability maps of one image, the objects' diameter or None): what predict
        decides from. `decide` them again with another threshold or object size without predicting again."""
        settings = self._settings(settings)
        image, _ = network_input(self.meta, as_image(image, channel_axis), "image")
        return probability_maps(self.network, self.meta, image, settings)

    def decide(self, maps: np.ndarray, *, diameter: Optional[float] = None, objects: bool = True,
               **settings) -> Segmentation:
        """The Segmentation of probability_maps' `maps`: the mask at `settings`' threshold and the
        numbered objects, sized for objects `diameter` pixels wide (None: from the settings)."""
        settings = self._settings(settings)
        method = object_method_for(self.meta, settings.objects, self.checkpoint) if objects else None
        return decide(maps, self.meta, settings, diameter=diameter, method=method)

    def predict_stack(self, stack: np.ndarray, *, channel_axis: Optional[int] = None, objects: bool = True,
                      **settings) -> Segmentation:
        """Segment each slice of a Z x H x W stack (channels at `channel_axis`, counted in the stack's
        axes) as predict does; the results stacked (objects numbered per slice, as test.sh's stacks)."""
        stack = np.asarray(stack)
        if channel_axis is not None:
            stack = np.moveaxis(stack, channel_axis, -1)
        slices = [self.predict(plane, channel_axis=-1 if channel_axis is not None else None, objects=objects,
                               **settings) for plane in stack]
        return Segmentation(np.stack([s.probabilities for s in slices]), np.stack([s.mask for s in slices]),
                            None if slices[0].objects is None else np.stack([s.objects for s in slices]),
                            None if any(s.diameter is None for s in slices) else float(
                                np.median([s.diameter for s in slices])))

    def predict_blocks(self, source, out: Optional[PathLike] = None, *, objects: bool = True, block: int = 1024,
                       halo: int = HALO, workers: int = 1, scheduler: Optional[str] = None,
                       overwrite: bool = False, levels: Optional[int] = None, prob_bits: int = 16,
                       progress: Optional[Callable[[int, int], None]] = None, **settings) -> Dict[str, object]:
        """Segment a volume or slide larger than memory block by block, as test.sh does for zarr
        inputs: `source` is a zarr / OME-Zarr store or TIFF path, a zarr array, or a dask or numpy
        array (Z x H x W or H x W; written into a zarr store in `out` first, block by block). The
        OME-Zarr stores go into `out` (masks/, prob/, objects/; a new temporary folder by default),
        over `workers` local processes or the Dask cluster at `scheduler`; `progress(done, total)`
        after each block (raising in it stops the run; the same call later goes on with the rest).
        Returns their full resolution arrays by kind: "masks", "probabilities", "objects"."""
        import zarr
        out = str(out) if out is not None else tempfile.mkdtemp(prefix="biounet-")
        path = volume_path(source, out)
        folders = dict(masks=os.path.join(out, "masks"), prob=os.path.join(out, "prob"),
                       instances=os.path.join(out, "objects") if objects else None, prob_bits=prob_bits)
        stores = predict_volume(path, self.checkpoint, folders, settings=self._settings(settings), block=block,
                                halo=halo, workers=workers, scheduler=scheduler, overwrite=overwrite, meta=self.meta,
                                levels=levels, progress=progress)
        names = dict(masks="masks", prob="probabilities", objects="objects")
        return {names[os.path.basename(os.path.dirname(store))]: zarr.open_array(os.path.join(store, "0"), mode="r")
                for store in stores}

    def _settings(self, settings):
        return PredictionSettings(**{"device": self.device, **settings})


def load_model(checkpoint: Union[PathLike, Sequence[PathLike], None] = None, *, pretrained: bool = False,
               device: str = "auto") -> Model:
    """A model from one of our checkpoints (.npz) or the original OneFlow example's checkpoint
    folder, or from a list of checkpoints: an ensemble that averages their probabilities (the runs of
    two seeds); `pretrained`: the original example's published ISBI checkpoint, downloaded once into
    ~/.cache/biounet. Loads on either backend (the one this environment runs, see biounet-train
    --help); `device`: auto (CUDA when present), cpu, cuda ..."""
    if pretrained == (checkpoint is not None):
        raise ValueError("give a checkpoint, or pretrained=True")
    if pretrained:
        from biounet.data.fetch import fetch_pretrained
        cache = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
        checkpoint = fetch_pretrained(os.path.join(cache, "biounet", "pretrained"))
    device = backend.resolve_device(device)
    if isinstance(checkpoint, (list, tuple)):
        checkpoint = tuple(map(str, checkpoint)) if len(checkpoint) > 1 else checkpoint[0]
    checkpoint = checkpoint if isinstance(checkpoint, tuple) else str(checkpoint)
    network, meta = build_model(checkpoint, device)
    return Model(network, meta, checkpoint, device)


def as_image(image, channel_axis=None, source="image"):
    """An array as the H x W or H x W x C image the readers give: channels moved last (from
    `channel_axis`, or guessed: a first axis of at most MAX_GUESSED_CHANNELS beside a longer last one)."""
    array = np.asarray(image)
    if channel_axis is not None:
        array = np.moveaxis(array, channel_axis, -1)
    elif array.ndim == 3 and array.shape[-1] > MAX_GUESSED_CHANNELS >= array.shape[0]:
        array = np.moveaxis(array, 0, -1)
    elif array.ndim == 3 and array.shape[-1] > MAX_GUESSED_CHANNELS:
        raise DataError(f"{source}: shape {array.shape} is a stack, not an image: use predict_stack, or give "
                        f"channel_axis")
    return image_from_array(array, source)


def volume_path(source, folder):
    """The path of a store or TIFF to predict blockwise: `source` itself, a zarr array's own store,
    or an array copied block by block into a zarr store in `folder`."""
    import zarr
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, zarr.Array) and isinstance(source.store, zarr.storage.DirectoryStore):
        return os.path.join(source.store.path, source.path)
    path = os.path.join(folder, "input.zarr")
    if getattr(source, "dask", None) is not None:  # a dask array: computed chunk by chunk
        source.to_zarr(path, overwrite=True)
    else:
        zarr.save_array(path, np.asarray(source))
    return path


@dataclass
class TrainingRun:
    """What train did: its checkpoints, the last epoch's scores, and why it stopped early (or None)."""
    best: str
    last: str
    scores: dict
    stopped: Optional[str] = None


def train(data_path: Optional[PathLike] = None, label_path: Optional[PathLike] = None, *,
          images: Optional[Sequence[np.ndarray]] = None, labels: Optional[Sequence[np.ndarray]] = None,
          checkpoint_dir: PathLike = "checkpoints", progress: Optional[Callable[[dict], None]] = None,
          stop: Optional[threading.Event] = None, **flags) -> TrainingRun:
    """Train as TrainUnetDataSet.py does, with its settled configuration and defaults (time budget,
    presets, resume=True ...): from `data_path` (any layout the scripts read, with `label_path`
    where the labels lie apart), or from arrays (`images`, `labels`: one per image, saved as TIFF
    pairs into checkpoint_dir/training_data/ so that a resumed or repeated run reads the same).
    `flags`: the training flags as keywords (time_budget=5, base=32, preset="cpu", epochs=40 ...).
    `progress` is called with a dict per step (kind "step": epoch, epochs, step, steps, loss) and
    per epoch (kind "epoch": epoch, epochs, scores, lr, best); setting `stop` (a threading.Event,
    from another thread) ends the run after the current step with last.npz written, as SIGINT does.
    One process (the scripts' data-parallel runs start through train.sh)."""
    checkpoint_dir = str(checkpoint_dir)
    if images is not None or labels is not None:
        if data_path is not None or images is None or labels is None:
            raise ValueError("give data_path (and label_path), or both images and labels")
        data_path, label_path = save_pairs(images, labels, os.path.join(checkpoint_dir, "training_data"))
    if data_path is None:
        raise ValueError("give data_path (and label_path), or images and labels")
    argv = ["--data-path", str(data_path), "--checkpoint-dir", checkpoint_dir] + (
        ["--label-path", str(label_path)] if label_path is not None else []) + flags_argv(
        dict(dict(log=os.path.join(checkpoint_dir, "train_log.txt"),
                  progress=os.path.join(checkpoint_dir, "progress.png")), **flags))
    settled = parse_training_flags(argv)
    request = StopRequest(stop)
    folder = RunFolder(checkpoint_dir, resuming=settled.resume)
    try:
        scores, stopped = run_training(settled, folder, request, progress=progress), None
    except Stopped as stopping:
        scores, stopped = {}, str(stopping)
    finally:
        request.restore()
        folder.close()
    return TrainingRun(best=folder.best, last=folder.last, scores=scores, stopped=stopped)


def flags_argv(flags):
    """Keyword arguments as the training flags' command line: time_budget=5 -> --time-budget 5,
    tta=True -> --tta, tta=False -> --no-tta, a list -> its values."""
    options = training_flags.parser()._option_string_actions
    argv = []
    for key, value in flags.items():
        option = "--" + key.replace("_", "-")
        if option not in options:
            raise ValueError(f"{key}: not a training flag (see biounet-train --help)")
        if isinstance(value, bool):
            negative = "--no-" + key.replace("_", "-")
            if not value and negative not in options:
                raise ValueError(f"{key}=False: the flag {option} cannot be turned off")
            argv.append(option if value else negative)
        elif isinstance(value, (list, tuple)):
            argv += [option, *map(str, value)]
        elif value is not None:
            argv += [option, str(value)]
    return argv


def parse_training_flags(argv):
    """The training flags parsed as the script parses them; a mistake raises ValueError with the script's line."""
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            return training_flags.parse_args(argv)
    except SystemExit:
        line = said.getvalue().strip().replace(" (see --help)", "")
        raise ValueError(line[len("error: "):] if line.startswith("error: ") else line) from None


def save_pairs(images, labels, folder):
    """Images and labels as TIFF pairs (0000.tif ...) in folder/train_image and folder/train_label."""
    if len(images) != len(labels) or not len(images):
        raise ValueError(f"{len(images)} images and {len(labels)} labels: give one label per image")
    paths = os.path.join(folder, "train_image"), os.path.join(folder, "train_label")
    for number, (image, label) in enumerate(zip(images, labels)):
        for path, array in zip(paths, (image, label)):
            encoded = io.BytesIO()
            tifffile.imwrite(encoded, np.asarray(array))
            atomic_write(os.path.join(path, f"{number:04d}.tif"), lambda f: f.write(encoded.getbuffer()))
    return paths


def evaluate(predictions, labels, *, classes: int = 1, instances: bool = False, instance_labels: bool = False,
             ignore_index: int = 255, names: Optional[Sequence[str]] = None) -> dict:
    """The scores biounet-evaluate prints, of predictions against labels (an array each, or lists of
    them), read as it reads files: one class: 0/255 masks or probability maps (any type: divided by
    its range) against 0/255 or 0/1 labels (pixel error, Dice, IoU, V_rand ...); `classes` > 1:
    class indices (mean IoU ...); `instances`: numbered objects against numbered labels (the DSB 2018
    score map_05_095, AP50, F1, AJI). Returns {"images": {name: scores}, "mean": {score: value}}
    (names: `names`, or the images' numbers)."""
    if isinstance(predictions, np.ndarray) and isinstance(labels, np.ndarray) and labels.ndim == 2:
        predictions, labels = [predictions], [labels]
    names = list(names or [str(n) for n in range(len(predictions))])
    if not len(predictions) == len(labels) == len(names):
        raise ValueError(f"{len(predictions)} predictions, {len(labels)} labels: give one label per prediction")
    items = [scored_item(name, np.asarray(pred), np.asarray(label), sources=(f"prediction {name}", f"label {name}"),
                         classes=classes, ignore_index=ignore_index, instance_labels=instance_labels,
                         instances=instances) for name, pred, label in zip(names, predictions, labels)]
    return score_items(items, classes=classes, ignore_index=ignore_index, instances=instances)


__all__ = ["Model", "PredictionSettings", "Segmentation", "TrainingRun", "evaluate", "load_model", "train"]
