"""Checkpoints as plain .npz files: weights, model configuration and optimizer state, no code.

`flow.load` and `torch.load` unpickle arbitrary objects, so a downloaded checkpoint could run
commands. Ours hold only numpy arrays plus one JSON string, read with `allow_pickle=False`; the
weights are framework-neutral, so a checkpoint written on OneFlow loads on PyTorch and back.
The original OneFlow example's checkpoint folder (`flow.save` format) is read by a restricted
unpickler that builds nothing but tensors and plain containers.

A training run holds its checkpoint folder through RunFolder: locked for the run, stale temporaries
cleared, an earlier run's checkpoints moved aside before its first write.
"""
import fcntl
import json
import math
import os
import pickle
import re
import sys
import time
import zipfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from biounet.core.files import atomic_write
from biounet.data.loader import apply_normalization, map_onto_levels, normalization_of
from biounet.model import backend
from biounet.model.ensemble import Ensemble
from biounet.model.meta import (FORMAT, MODEL_ADDED_LATER,  # noqa: F401 (CheckpointError: the callers')
                                CheckpointError, TrainingData, check_meta)
from biounet.model.unet import UNet

# ---- encoding nested state (optimizer state dicts) as JSON + arrays -------------------------

def _encode(obj, arrays, name):
    if hasattr(obj, "detach") or isinstance(obj, np.ndarray):
        arrays[name] = backend.to_numpy(obj) if hasattr(obj, "detach") else obj
        return {"__array__": name}
    if isinstance(obj, dict):
        return {"__items__": [[_encode(k, arrays, f"{name}/k{i}"), _encode(v, arrays, f"{name}/{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, arrays, f"{name}/{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, (np.generic,)):
        return obj.item()
    return obj


def _decode(obj, arrays):
    if isinstance(obj, list):
        return [_decode(v, arrays) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__array__" in obj:
        return backend.to_tensor(arrays[obj["__array__"]], dtype=None)
    if "__tuple__" in obj:
        return tuple(_decode(v, arrays) for v in obj["__tuple__"])
    return {_decode(k, arrays): _decode(v, arrays) for k, v in obj["__items__"]}


# ---- our .npz checkpoints -------------------------------------------------------------------

def _first_non_finite(arrays):
    return next((k for k, v in arrays.items() if v.dtype.kind in "fc" and not np.isfinite(v).all()), None)


def write_npz(f, arrays):
    """What np.savez writes, but closing the zip whatever happens: np.savez leaves it open when a
    write fails (a full disk), and its clean-up then fails again later with a second traceback."""
    with zipfile.ZipFile(f, "w", allowZip64=True) as archive:
        for name, array in arrays.items():
            with archive.open(name + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def model_weights(model):
    """A copy of the model's weights as numpy arrays by name, as a checkpoint holds them (to_numpy alone
    shares a CPU tensor's memory, which the next step overwrites)."""
    return {k: np.array(backend.to_numpy(v)) for k, v in model.state_dict().items()}


def save_checkpoint(path, model, optimizer=None, **info):
    """Write weights, model config, optional optimizer state and `info` atomically to `path`;
    weights or optimizer state that are not finite (a diverged run) are never written."""
    write_checkpoint(path, checkpoint_arrays(path, model, optimizer, **info))


def checkpoint_arrays(path, model, optimizer=None, **info):
    """What save_checkpoint writes to `path`, copied (training may go on while it is written);
    CheckpointError where weights or optimizer state are not finite."""
    arrays = {f"model/{k}": backend.to_numpy(v) for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "backend": backend.NAME, "model": model.config(), **info}
    if optimizer is not None:
        meta["optimizer"] = _encode(optimizer.state_dict(), arrays, "optimizer")
    bad = _first_non_finite(arrays)
    if bad:
        raise CheckpointError(f"{path}: not written: {bad} holds NaN or infinity (training diverged; lower --lr)")
    arrays = {name: np.array(array) for name, array in arrays.items()}  # to_numpy shares a CPU tensor's memory
    arrays["__meta__"] = np.array(json.dumps(meta))
    return arrays


def write_checkpoint(path, arrays):
    atomic_write(path, lambda f: write_npz(f, arrays))


def load_checkpoint(path):
    """(meta, weights, arrays) of a checkpoint: an .npz of ours or an original OneFlow folder."""
    if os.path.isdir(path):
        return _load_oneflow_folder(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found (train first, or use --pretrained)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        meta = json.loads(str(arrays.pop("__meta__")))
    except Exception as err:  # zipfile and zlib raise many kinds on damaged files (even NotImplementedError)
        raise CheckpointError(f"{path}: damaged or not a U-Net checkpoint ({type(err).__name__}: {err})")
    if isinstance(meta, dict) and isinstance(meta.get("model"), dict):  # an earlier version's network
        meta["model"] = {**MODEL_ADDED_LATER, **meta["model"]}
    check_meta(meta, path)
    weights = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
    return meta, weights, arrays


def load_weights(model, weights, path):
    """Copy numpy `weights` into `model`, or stop with a one-line reason why they do not fit."""
    state = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [k for k in expected if k in weights and tuple(weights[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            problems.append(f"{len(wrong)} of another shape (e.g. {k}: {tuple(weights[k].shape)} "
                            f"in the file, {expected[k]} in the model)")
        raise CheckpointError(f"{path}: does not fit the model: weights {'; '.join(problems)}")
    odd = next((k for k in expected if weights[k].dtype.kind not in "fiub"), None)
    if odd:
        raise CheckpointError(f"{path}: weight {odd} holds {weights[odd].dtype} values, not numbers")
    bad = _first_non_finite(weights)
    if bad:
        raise CheckpointError(f"{path}: weight {bad} holds NaN or infinity: the run that wrote it diverged")
    model.load_state_dict({k: backend.to_tensor(v.astype(backend.to_numpy(state[k]).dtype), dtype=None)
                           for k, v in weights.items()})


def restore_optimizer(optimizer, meta, arrays, path):
    if meta.get("backend") != backend.NAME:
        raise CheckpointError(f"{path}: optimizer state was written by {meta.get('backend')}; "
                              f"resume with UNET_BACKEND={meta.get('backend')}")
    if "optimizer" not in meta:
        raise CheckpointError(f"{path}: holds no optimizer state to resume from")
    try:
        optimizer.load_state_dict(_decode(meta["optimizer"], arrays))
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise CheckpointError(f"{path}: its optimizer state does not fit this optimizer ({type(err).__name__}: {err})")


def config_from_weights(weights, path):
    """UNet arguments implied by a state dict's names and shapes (for checkpoints without config)."""
    try:
        return dict(n_channels=int(weights["inc.double_conv.0.weight"].shape[1]),
                    n_classes=int(weights["outc.conv.weight"].shape[0]),
                    bilinear="up1.up.weight" not in weights,
                    base=int(weights["inc.double_conv.0.weight"].shape[0]),
                    norm="batch" if "inc.double_conv.1.running_mean" in weights else "instance",
                    padding="same", dropout=0.0)  # what the original example's network used
    except KeyError as err:
        raise CheckpointError(f"{path}: weights are not a U-Net's: no {err}")
    except IndexError:
        raise CheckpointError(f"{path}: weights are not a U-Net's: a convolution's weight is not 4-D")


def predicted_classes(meta):
    """Classes a checkpoint's masks hold: its outputs, or 1 for a network trained for objects (its
    outputs are background and classes of object pixels: instances.object_class_names)."""
    return 1 if TrainingData.of(meta).instances else meta["model"]["n_classes"]


def input_normalization(meta):
    """(method, percentiles) of dataloader.normalize the network was trained with (range before they were kept)."""
    data = TrainingData.of(meta)
    return data.normalize, data.percentiles


def network_input(meta, raw, source="image"):
    """(image, note or None): a raw image normalized for the network as its training images were."""
    mapping = input_mapping(meta, raw, source)
    return map_input(raw, mapping), mapping[2]


def input_mapping(meta, raw, source="image"):
    """(normalization, levels or None, note or None): how network_input maps raw images like `raw`
    (map_input), taken from `raw` (a whole image, or a sample of a slice too large to hold).

    A network trained on images divided by their type's range (8-bit PNGs, say) would see a 12- or
    16-bit image of the same scene at another brightness (a 12-bit image in a 16-bit file at 1/16):
    an image of a type it was not trained on has its percentiles mapped onto the training images'
    normalized ones instead, and the note says so."""
    method, percentiles = input_normalization(meta)
    data = TrainingData.of(meta)
    trained_on, levels = data.input_types, data.input_levels
    if method != "range" or not trained_on or not levels or str(raw.dtype) in trained_on:
        return normalization_of(raw, method, percentiles, source), None, None
    note = (f"{raw.dtype} image, the network was trained on {'/'.join(trained_on)}: its {percentiles[0]:g}-"
            f"{percentiles[1]:g} percentiles mapped onto the training images' levels")
    return normalization_of(raw, "percentile", percentiles, source), levels, note


def map_input(raw, mapping):
    """A raw image (or a block of one) normalized by the `mapping` of input_mapping."""
    normalization, levels, _ = mapping
    if levels is None:
        return apply_normalization(raw, normalization)
    return map_onto_levels(raw, None, levels, normalization)


def build_model(path, device):
    """(the network a checkpoint describes, with its weights, in eval mode; its metadata). `path`: a
    checkpoint, or a list of them: an Ensemble (build_ensemble).

    A calibrated checkpoint's `output_shift` is applied to the output bias here, so that cell
    probability 0.5 is its decision threshold; the stored weights stay as trained (for --resume)."""
    if isinstance(path, (list, tuple)):
        return build_ensemble(path, device) if len(path) > 1 else build_model(path[0], device)
    meta, weights, _ = load_checkpoint(path)
    model = UNet(**meta["model"])
    if meta.get("output_shift") and "outc.conv.bias" in weights:
        weights = {**weights, "outc.conv.bias": (weights["outc.conv.bias"] - meta["output_shift"]).astype(np.float32)}
    load_weights(model, weights, path)
    return model.to(device).eval(), meta


def build_ensemble(paths, device):
    """(an Ensemble of the checkpoints at `paths`, averaging their probabilities; the first one's
    metadata, whose decisions it takes). They must take the same input and
    give the same outputs, else a CheckpointError names the one that differs and how."""
    built = [build_model(path, device) for path in paths]
    first = built[0][1]
    for path, (_, meta) in zip(paths[1:], built[1:]):
        for what, of in ENSEMBLE_AGREES.items():
            if of(meta) != of(first):
                raise CheckpointError(f"{path}: cannot be averaged with {paths[0]}: they differ in {what} "
                                      f"({of(meta)} against {of(first)})")
    return Ensemble([network for network, _ in built]).to(device).eval(), first


ENSEMBLE_AGREES = {  # what the checkpoints of an ensemble must share: what their input and outputs mean
    "input channels": lambda meta: meta["model"]["n_channels"],
    "outputs": lambda meta: meta["model"]["n_classes"],
    "padding": lambda meta: meta["model"].get("padding", "same"),
    "input scale": lambda meta: meta.get("input_scale", 1.0),
    "training data (layout, normalization, object size, targets)": lambda meta: meta.get("data"),
}


def update_meta(path, **info):
    """Rewrite a checkpoint with `info` added to its metadata, atomically; the arrays stay as they are."""
    meta, _, arrays = load_checkpoint(path)
    arrays = {**arrays, "__meta__": np.array(json.dumps({**meta, **info}))}
    atomic_write(path, lambda f: write_npz(f, arrays))


# ---- the original example's OneFlow checkpoint folder, read without unpickling code -----------

_ONEFLOW_DTYPES = {"kFloat": np.float32, "kDouble": np.float64, "kFloat16": np.float16,
                   "kInt8": np.int8, "kUInt8": np.uint8, "kInt32": np.int32, "kInt64": np.int64,
                   "kBool": np.bool_}


class _TensorRef:
    """Stands in for oneflow.Tensor/Parameter while unpickling: remembers the tensor's folder."""

    def __setstate__(self, state):
        self.path = state["path"] if isinstance(state, dict) else None


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module.split(".")[0] == "oneflow" and name in ("Tensor", "Parameter"):
            return _TensorRef
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a checkpoint holds only tensors")


def _read_oneflow_tensor(folder, ref):
    """A tensor's values from its sub-folder, which must be a plain name inside `folder`."""
    name = str(ref.path) if isinstance(ref.path, (str, int)) else ""
    sub = os.path.join(folder, name)
    if os.path.dirname(os.path.realpath(sub)) != os.path.realpath(folder):  # refuses "", ".", "..", "a/b", "/x"
        raise CheckpointError(f"{folder}: refusing tensor folder {ref.path!r}: not a folder inside the checkpoint")
    if not os.path.isdir(sub):
        raise CheckpointError(f"{folder}: tensor folder {ref.path!r} missing")
    try:
        with open(os.path.join(sub, "meta"), errors="replace") as f:
            meta = f.read(1 << 16)
        shape = tuple(int(d) for d in re.findall(r"dim:\s*(\d+)", meta))
        dtype = _ONEFLOW_DTYPES.get((re.findall(r"data_type:\s*(\w+)", meta) or ["kFloat"])[0])
        if dtype is None:
            raise CheckpointError(f"{sub}: unsupported tensor type in {meta[:80]!r}")
        data = np.fromfile(os.path.join(sub, "out"), dtype=dtype)
    except OSError as err:
        raise CheckpointError(f"{sub}: unreadable tensor ({err.strerror or err})")
    if data.size != math.prod(shape):
        raise CheckpointError(f"{sub}: holds {data.size} values, its meta says shape {shape}")
    return data.reshape(shape)


def _resolve(obj, folder):
    if isinstance(obj, _TensorRef):
        return _read_oneflow_tensor(folder, obj)
    if isinstance(obj, dict):
        return {k: _resolve(v, folder) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_resolve(v, folder) for v in obj]
    return obj


def read_oneflow_folder(folder):
    """The object `flow.save` wrote to `folder`, with tensors as numpy arrays; no code runs."""
    pickled = os.path.join(folder, "pickled_data")
    if not os.path.isfile(pickled):
        raise CheckpointError(f"{folder}: not a OneFlow checkpoint folder (no pickled_data)")
    try:
        with open(pickled, "rb") as f:
            obj = _RestrictedUnpickler(f).load()
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"{pickled}: unsafe or damaged OneFlow checkpoint ({err})")
    if isinstance(obj, dict) and "protocol_version" in obj and "data" in obj:
        obj = obj["data"]
    return _resolve(obj, folder)


def _load_oneflow_folder(folder):
    obj = read_oneflow_folder(folder)
    weights = obj.get("net", obj) if isinstance(obj, dict) else None
    if not isinstance(weights, dict) or not all(isinstance(v, np.ndarray) for v in weights.values()):
        raise CheckpointError(f"{folder}: OneFlow checkpoint holds no model state dict")
    # The original example fed raw 0-255 pixels to the network, so its weights expect them.
    meta = {"format": FORMAT, "backend": "oneflow", "model": config_from_weights(weights, folder),
            "input_scale": 255.0, "source": "original OneFlow example checkpoint"}
    return meta, weights, {}


# ---- the checkpoint folder of a training run ---------------------------------------------------

class RunFolder:
    """A training run's checkpoint folder: best.npz and last.npz, held by this run alone.

    Temporary files a killed run left are deleted; an earlier run's checkpoints are moved into
    previous-<time>/ just before this run first writes, so a run that fails before then (bad
    data, a diverged first epoch) leaves them where prediction looks for them."""

    def __init__(self, folder, resuming=False):
        self.folder = folder
        self.best, self.last = os.path.join(folder, "best.npz"), os.path.join(folder, "last.npz")
        self.previous_kept = resuming  # a resumed run goes on with the checkpoints there
        self.writer, self.pending = ThreadPoolExecutor(1), []
        os.makedirs(folder, exist_ok=True)
        self.lock = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the process ends, however
        except BlockingIOError:
            os.close(self.lock)
            raise CheckpointError(f"{folder}: another training run is writing there; wait for it to end, "
                                  f"or give this one another --checkpoint-dir")
        for name in os.listdir(folder):
            if name.startswith(".tmp-"):
                os.remove(os.path.join(folder, name))

    def save(self, path, model, optimizer=None, **info):
        """Save a checkpoint: its arrays copied now, written by a background thread while training goes
        on (atomically: a file is whole or as it was); an earlier write's error is raised here."""
        if not self.previous_kept:
            self._keep_previous_run()
            self.previous_kept = True
        arrays = checkpoint_arrays(path, model, optimizer, **info)
        while len(self.pending) > 1:  # at most two checkpoints in memory at once
            self.pending.pop(0).result()
        self.pending.append(self.writer.submit(write_checkpoint, path, arrays))

    def in_background(self, function, *args):
        """function(*args) in the writer thread once the writes before it are done, unless one failed
        (an epoch's line in the log: its checkpoints are on disk)."""
        before = list(self.pending)

        def after_writes():
            if all(write.exception() is None for write in before):
                function(*args)
        self.pending.append(self.writer.submit(after_writes))

    def flush(self):
        """Wait until everything saved so far is written; raises the first write's error."""
        while self.pending:
            self.pending.pop(0).result()

    def _keep_previous_run(self):
        found = [path for path in (self.best, self.last) if os.path.exists(path)]
        if not found:
            return
        kept = os.path.join(self.folder, "previous-" + time.strftime("%Y%m%d-%H%M%S"))
        while os.path.exists(kept):
            kept += "+"
        os.makedirs(kept)
        for path in found:
            os.replace(path, os.path.join(kept, os.path.basename(path)))
        names = " and ".join(os.path.basename(path) for path in found)
        print(f"kept the previous run's {names} in {kept}/ (--resume continues a run instead)")

    def close(self):
        """Finish the writes (a run that stops early too); one that fails says so in a line."""
        try:
            self.flush()
        except (OSError, CheckpointError) as err:
            print(f"error: {err}", file=sys.stderr)
        finally:
            self.writer.shutdown()
            os.close(self.lock)
