"""The Segment dock widget: an image layer segmented by the chosen model off the UI thread, with a
progress bar and Cancel; the probabilities, mask and numbered objects added as layers named after
the image; the threshold and object size changed afterwards without predicting again.

2D images and stacks are predicted slice by slice; dask- or zarr-backed layers and images larger
than BLOCKWISE_PIXELS block by block, as test.sh predicts volumes (their outputs are zarr stores
in a temporary folder, shown lazily).
"""
import queue
import tempfile
import threading
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, FloatSlider, FloatSpinBox, Label, PushButton
from napari.layers import Image
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info

from biounet.api import Model, load_model
from biounet.napari_plugin.model_choice import CHOSEN, listen, one_line

BLOCKWISE_PIXELS = 4096 * 4096  # larger 2D images are predicted block by block


class Cancelled(Exception):
    """The user pressed Cancel."""


@dataclass
class Predicted:
    """What a run kept of one layer: its probability maps per slice (to decide them again) or, block
    by block, the output arrays."""
    name: str
    stack: bool
    maps: List[np.ndarray] = field(default_factory=list)
    diameters: List[Optional[float]] = field(default_factory=list)
    blocks: Optional[dict] = None


def layer_kind(layer, model):
    """How a layer's data is predicted: "image" (2D, with channels), "stack" (slices) or "blocks"."""
    data = layer.data[0] if layer.multiscale else layer.data
    in_memory = isinstance(data, np.ndarray)
    planes = data.ndim - (1 if layer.rgb else 0)
    channels_first = data.ndim == 3 and not layer.rgb and model.channels > 1 and data.shape[0] == model.channels
    if channels_first:
        planes = 2
    if planes not in (2, 3):
        raise ValueError(f"{layer.name}: {data.ndim} dimensions {tuple(data.shape)}: segment a 2D image, a stack "
                         f"of slices, or an image with channels")
    pixels = int(np.prod(data.shape[-2:] if not layer.rgb else data.shape[-3:-1]))
    if not in_memory or (planes == 2 and pixels > BLOCKWISE_PIXELS):
        if layer.rgb or channels_first:
            raise ValueError(f"{layer.name}: block by block needs one channel (a zarr or dask layer of "
                             f"{tuple(data.shape)})")
        return "blocks"
    return "image" if planes == 2 else "stack"


def predict_layer(model, layer, kind, cancelled, **settings):
    """A generator of (done, total) as the layer is predicted; returns its Predicted. Stops with
    Cancelled after the slice or block in progress once `cancelled` is set."""
    data = layer.data[0] if layer.multiscale else layer.data
    predicted = Predicted(layer.name, stack=kind != "image")
    if kind == "blocks":
        predicted.blocks = yield from blocks_in_thread(model, data, cancelled, **settings)
        return predicted
    axis = -1 if layer.rgb else (0 if data.ndim == 3 and kind == "image" else None)
    planes = [data] if kind == "image" else list(data)
    for number, plane in enumerate(planes):
        if cancelled.is_set():
            raise Cancelled()
        maps, diameter = model.probability_maps(np.asarray(plane), channel_axis=axis, **settings)
        predicted.maps.append(maps)
        predicted.diameters.append(diameter)
        yield number + 1, len(planes)
    return predicted


def blocks_in_thread(model, data, cancelled, **settings):
    """Model.predict_blocks of `data` in a thread of its own, yielding (done, total) after each block."""
    updates, outcome = queue.Queue(), {}

    def report(done, total):
        updates.put((done, total))
        if cancelled.is_set():
            raise Cancelled()

    def run():
        try:
            outcome["arrays"] = model.predict_blocks(data, tempfile.mkdtemp(prefix="biounet-napari-"), workers=1,
                                                     progress=report, **settings)
        except BaseException as error:  # handed to the waiting generator
            outcome["error"] = error
        finally:
            updates.put(None)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    while (update := updates.get()) is not None:
        yield update
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["arrays"]


class SegmentWidget(Container):
    """Segment: image layer, model, Run / Cancel; threshold and object size decided again live."""

    def __init__(self, napari_viewer):
        self.viewer = napari_viewer
        self.image = ComboBox(label="image", choices=self._image_layers)
        self.checkpoint = FileEdit(label="model", mode="r", filter="*.npz")
        self.pretrained = PushButton(text="Use the published ISBI 2012 model")
        self.tta = CheckBox(label="8 views (flips, rotations)", value=True)
        self.threshold = FloatSlider(label="threshold", min=0.0, max=1.0, step=0.01, value=0.5)
        self.object_size = FloatSpinBox(label="object size (px, 0: auto)", min=0.0, max=10000.0, step=1.0, value=0.0)
        self.estimate = Label(label="objects", value="")
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.status = Label(value="")
        super().__init__(widgets=[self.image, self.checkpoint, self.pretrained, self.tta, self.run_button,
                                  self.cancel_button, self.threshold, self.object_size, self.estimate, self.status])
        self.model: Optional[Model] = None
        self.predicted: Optional[Predicted] = None
        self.worker = None
        self._cancelled = threading.Event()
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.pretrained.changed.connect(self.use_pretrained)
        self.threshold.changed.connect(self.decide_again)
        self.object_size.changed.connect(self.decide_again)
        self.checkpoint.changed.connect(lambda path: str(path) not in ("", ".") and CHOSEN.choose(path))
        listen(self, CHOSEN.changed, self._chosen)
        if CHOSEN.checkpoint:
            self._chosen(CHOSEN.checkpoint)
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            listen(self, event, self.reset_choices)

    def _image_layers(self, _=None):
        return [layer.name for layer in self.viewer.layers if isinstance(layer, Image)]

    def _chosen(self, checkpoint):
        if str(self.checkpoint.value) != checkpoint:
            self.checkpoint.value = checkpoint
        self.model = None  # loaded when next used

    def use_pretrained(self, _=None):
        """The original example's published checkpoint, downloaded once (off the UI thread)."""
        self.status.value = "fetching the published ISBI 2012 model ..."
        worker = create_worker(lambda: load_model(pretrained=True), _ignore_errors=True)
        worker.returned.connect(self._pretrained_loaded)
        worker.errored.connect(self._failed)
        worker.start()

    def _pretrained_loaded(self, model):
        CHOSEN.choose(model.checkpoint)
        self.model = model
        self.status.value = f"model: {model.checkpoint}"

    def _loaded_model(self):
        if self.model is None:
            if not CHOSEN.checkpoint:
                raise ValueError("choose a model: a checkpoint (.npz), the published ISBI model, or train one")
            self.model = load_model(CHOSEN.checkpoint)
        return self.model

    def run(self, _=None):
        """Predict the chosen image layer in a worker thread."""
        if self.worker is not None:
            return
        try:
            if not self.image.value:
                raise ValueError("add an image layer to segment")
            layer = self.viewer.layers[self.image.value]
            model = self._loaded_model()
            kind = layer_kind(layer, model)
        except Exception as error:  # one line in napari, whatever it was
            self._failed(error)
            return
        self._cancelled.clear()
        settings = dict(threshold=self.threshold.value, object_size=self.object_size.value or "auto",
                        tta=self.tta.value)
        self.worker = create_worker(predict_layer, model, layer, kind, self._cancelled, _ignore_errors=True,
                                    **settings)
        self.bar = progress(total=0, desc=f"segmenting {layer.name}")
        self.worker.yielded.connect(self._advance)
        self.worker.returned.connect(self.show)
        self.worker.errored.connect(self._failed)
        self.worker.finished.connect(self._finished)
        self.run_button.enabled, self.cancel_button.enabled = False, True
        self.status.value = f"segmenting {layer.name} ({kind}) on {model.device} ..."
        self.worker.start()

    def cancel(self, _=None):
        self._cancelled.set()
        self.status.value = "cancelling after the slice or block in progress ..."

    def _advance(self, update):
        done, total = update
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    def _failed(self, error):
        if isinstance(error, Cancelled):
            self.status.value = "cancelled: the viewer's layers are as they were"
            show_info(f"biounet: {self.status.value}")
        else:
            self.status.value = f"error: {one_line(error)}"
            show_error(f"biounet: {one_line(error)}")

    def _finished(self):
        self.worker = None
        if getattr(self, "bar", None) is not None:
            self.bar.close()
            self.bar = None
        self.run_button.enabled, self.cancel_button.enabled = True, False

    def show(self, predicted):
        """The layers of a finished run, added or (run again) updated."""
        self.predicted = predicted
        if predicted.blocks is not None:
            arrays = predicted.blocks
            self._put(f"{predicted.name} probabilities", arrays.get("probabilities"), "image")
            self._put(f"{predicted.name} mask", arrays["masks"], "labels")
            self._put(f"{predicted.name} objects", arrays.get("objects"), "labels")
            self.estimate.value = "block by block: predict again to change the threshold"
            self.status.value = f"segmented {predicted.name} block by block"
            return
        self.decide_again()
        self.status.value = f"segmented {predicted.name}"

    def decide_again(self, _=None):
        """Mask and objects of the kept probability maps at the current threshold and object size."""
        predicted = self.predicted
        if predicted is None or predicted.blocks is not None:
            return
        try:
            sizes = [self.object_size.value or d for d in predicted.diameters]
            decided = [self.model.decide(maps, diameter=size, threshold=self.threshold.value)
                       for maps, size in zip(predicted.maps, sizes)]
        except Exception as error:
            self._failed(error)
            return
        stacked = (lambda arrays: np.stack(arrays)) if predicted.stack else (lambda arrays: arrays[0])
        one_class = self.model.classes == 1
        self._put(f"{predicted.name} probabilities", stacked([d.probabilities for d in decided])
                  if decided[0].probabilities.ndim == 2 else None, "image")
        masks = stacked([d.mask for d in decided])
        self._put(f"{predicted.name} mask", (masks > 0).astype(np.uint8) if one_class else masks, "labels")
        if decided[0].objects is not None:
            self._put(f"{predicted.name} objects", stacked([d.objects for d in decided]), "labels")
            count = sum(int(d.objects.max()) for d in decided)
            known = [s for s in sizes if s]
            self.estimate.value = f"{count} objects" + (f", {np.median(known):.0f} px wide" if known else "") + (
                " (estimated)" if not self.object_size.value else " (as given)")

    def _put(self, name, data, kind):
        if data is None:
            return
        if name in self.viewer.layers:
            self.viewer.layers[name].data = data
        elif kind == "image":
            self.viewer.add_image(data, name=name, colormap="magma", blending="additive", opacity=0.5, visible=False)
        else:
            self.viewer.add_labels(data, name=name, opacity=0.5)
