"""Drag a checkpoint (.npz) onto the viewer to make it the model; save a Labels layer as training
reads it: 0/255 for a mask (1 = cell or object), the numbers kept for numbered objects."""
import numpy as np
from napari.utils.notifications import show_error, show_info

from biounet.core.files import DataError, write_png, write_tiff
from biounet.model.checkpoint import CheckpointError, load_checkpoint
from biounet.napari_plugin.model_choice import CHOSEN, one_line


def checkpoint_reader(path):
    if isinstance(path, str) and path.lower().endswith(".npz"):
        return read_checkpoint
    return None


def read_checkpoint(path):
    """The checkpoint made the plugin's model; no layer is added (a damaged one: one line, nothing changes)."""
    try:
        load_checkpoint(path)
    except CheckpointError as error:
        show_error(f"biounet: {one_line(error)}")
        return [(None,)]
    CHOSEN.choose(path)
    show_info(f"biounet: model {path}")
    return [(None,)]


def training_label(data, path):
    """A Labels layer's data as a label file holds it: a mask (values 0/1) as 0/255, numbered objects as they are."""
    data = np.asarray(data)
    if data.min(initial=0) < 0 or data.max(initial=0) >= 2 ** 16:
        raise DataError(f"{path}: labels must be 0-65535 to be saved for training")
    if data.max(initial=0) <= 1:
        return (data * 255).astype(np.uint8)
    return data.astype(np.uint16)


def write_labels(path, data, meta):
    """napari's writer: `path` (.tif: 2D or a stack; .png: 2D). A problem: one line, nothing written."""
    try:
        label = training_label(data, path)
        if path.lower().endswith(".png") and label.ndim != 2:
            raise DataError(f"{path}: a PNG holds one 2D label; save a stack as .tif")
        (write_png if path.lower().endswith(".png") else write_tiff)(path, label)
    except (DataError, OSError) as error:
        show_error(f"biounet: {one_line(error)}")
        return []
    return [path]
