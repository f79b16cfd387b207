"""The Train dock widget: a U-Net trained from an image layer and its labels layer (annotations, or
a predicted layer corrected with the brush and eraser) or from a folder in any layout the scripts
read, with train.sh's settled configuration and presets, fine-tuning the chosen model by default.

Training runs in a process of its own (training_process.py: the framework and the GIL must not
freeze the viewer); its progress comes back as JSON lines in the run's folder, drawn as curves and
a progress bar. Stop sends it SIGINT, which ends it after the current step with last.npz and
best.npz kept, as for the script; Resume goes on from there.
When it ends, its best checkpoint becomes the Segment widget's model.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, Label, ProgressBar, PushButton
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QTimer

from biounet.napari_plugin.model_choice import CHOSEN, listen, one_line
from biounet.training.config import PRESETS

SOURCES = ("layers", "folder")


def training_pairs(image, labels):
    """(images, labels, instance_labels) of an image layer's data and its labels layer's: one pair
    per slice of a stack; labels other than 0/1 are numbered objects."""
    image, labels = np.asarray(image), np.asarray(labels)
    if labels.shape != image.shape[:labels.ndim] or labels.ndim not in (2, 3):
        raise ValueError(f"the labels are {labels.shape}, the image {image.shape}: draw the labels over the image")
    if not labels.any():
        raise ValueError("the labels layer is empty: paint the cells or objects to train on")
    images, label_list = ([image], [labels]) if labels.ndim == 2 else (list(image), list(labels))
    return images, label_list, bool(labels.max() > 1)


class TrainWidget(Container):
    """Train: the data (layers or a folder), the time budget, fine-tuning; Train, Stop, Resume; the curves."""

    def __init__(self, napari_viewer):
        self.viewer = napari_viewer
        self.source = ComboBox(label="train from", choices=SOURCES, value="layers")
        self.image_layer = ComboBox(label="image", choices=lambda _: self._layers(Image))
        self.label_layer = ComboBox(label="labels", choices=lambda _: self._layers(Labels))
        self.folder = FileEdit(label="data folder", mode="d")
        self.preset = ComboBox(label="preset", choices=["auto", "cpu", "gpu"], value="auto")
        self.minutes = FloatSpinBox(label="time budget (min)", min=0.1, max=10000.0, step=0.5,
                                    value=PRESETS["cpu"]["time_budget"])
        self.fine_tune = CheckBox(label="fine-tune the chosen model", value=True)
        self.checkpoint_dir = FileEdit(label="save into", mode="d",
                                       value=os.path.join(os.path.expanduser("~"), "biounet-models"))
        self.train_button, self.stop_button = PushButton(text="Train"), PushButton(text="Stop", enabled=False)
        self.resume_button = PushButton(text="Resume", enabled=False)
        self.bar = ProgressBar(label="progress", min=0, max=1, value=0)
        self.status = Label(value="")
        self.figure = Figure(figsize=(4, 2.5), layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(220)
        super().__init__(widgets=[self.source, self.image_layer, self.label_layer, self.folder, self.preset,
                                  self.minutes, self.fine_tune, self.checkpoint_dir, self.train_button, self.stop_button,
                                  self.resume_button, self.bar, self.status])
        self.native.layout().addWidget(self.canvas)
        self.process, self.job, self.events, self.read_so_far, self.epochs = None, None, None, 0, []
        self.timer = QTimer()
        self.timer.timeout.connect(self.poll)
        self.train_button.changed.connect(lambda: self.start(resume=False))
        self.resume_button.changed.connect(lambda: self.start(resume=True))
        self.stop_button.changed.connect(self.stop)
        self.source.changed.connect(self._show_source)
        self._show_source()
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            listen(self, event, self.reset_choices)

    def _layers(self, kind):
        return [layer.name for layer in self.viewer.layers if isinstance(layer, kind)]

    def _show_source(self, _=None):
        from_layers = self.source.value == "layers"
        self.image_layer.visible = self.label_layer.visible = from_layers
        self.folder.visible = not from_layers

    def training_job(self, resume):
        """The keywords of biounet.train for what the widget shows."""
        if resume:
            return dict(self.job, resume=True)
        folder = os.path.join(str(self.checkpoint_dir.value), time.strftime("run-%Y%m%d-%H%M%S"))
        job = dict(checkpoint_dir=folder, preset=self.preset.value, time_budget=self.minutes.value)
        if self.source.value == "layers":
            if not self.image_layer.value or not self.label_layer.value:
                raise ValueError("choose an image layer and the labels layer drawn over it")
            images, labels, numbered = training_pairs(self.viewer.layers[self.image_layer.value].data,
                                                      self.viewer.layers[self.label_layer.value].data)
            job.update(images=images, labels=labels, instance_labels=numbered or None)
        else:
            if str(self.folder.value) in ("", "."):
                raise ValueError("choose the data folder")
            job.update(data_path=str(self.folder.value))
        if self.fine_tune.value and CHOSEN.checkpoint:
            import biounet
            job.update(biounet.load_model(CHOSEN.checkpoint, device="cpu").fine_tuning())
        return job

    def start(self, resume=False):
        """Start (or resume) the training process."""
        if self.process is not None:
            return
        try:
            job = self.training_job(resume)
            if "images" in job:  # written once here, so that the process (and Resume) read files
                from biounet.api import save_pairs
                data_path, label_path = save_pairs(job.pop("images"), job.pop("labels"),
                                                   os.path.join(job["checkpoint_dir"], "training_data"))
                job.update(data_path=data_path, label_path=label_path)
        except Exception as error:
            self._failed(one_line(error))
            return
        self.job = job
        os.makedirs(job["checkpoint_dir"], exist_ok=True)
        job_file = os.path.join(job["checkpoint_dir"], "napari_job.json")
        with open(job_file, "w") as out:
            json.dump(job, out)
        self.events, self.read_so_far = os.path.join(job["checkpoint_dir"], "napari_events.jsonl"), 0
        if os.path.exists(self.events):
            os.remove(self.events)  # a resumed run's events start anew
        self.process = subprocess.Popen([sys.executable, "-m", "biounet.napari_plugin.training_process", job_file,
                                         self.events])
        if not resume:
            self.epochs = []
        self._buttons(running=True)
        self.status.value = f"{'resuming' if resume else 'training'} into {job['checkpoint_dir']} ..."
        self.timer.start(200)

    def stop(self, _=None):
        if self.process is not None:
            self.process.send_signal(signal.SIGINT)
            self.status.value = "stopping after this step (last.npz and best.npz are kept) ..."

    def poll(self):
        """Draw what the training process has said since the last look."""
        if self.process is None:
            return
        exit_code = self.process.poll()
        for update in self._new_events():
            getattr(self, f"_on_{update['kind']}")(update)
        if exit_code is not None and self.process is not None:  # it ended without saying so: killed
            self._ended()
            self._failed(f"the training process ended with code {exit_code}")

    def _new_events(self):
        if not os.path.exists(self.events):
            return []
        with open(self.events, "rb") as events:
            events.seek(self.read_so_far)
            lines = events.readlines()
        complete = [line for line in lines if line.endswith(b"\n")]  # a line being written waits for the next look
        self.read_so_far += sum(map(len, complete))
        return [json.loads(line) for line in complete]

    def _on_step(self, update):
        steps = update["steps"] * update["epochs"]
        self.bar.max = max(1, steps)
        self.bar.value = min(steps, (update["epoch"] - 1) * update["steps"] + update["step"])
        self.status.value = f"epoch {update['epoch']}/{update['epochs']}, step {update['step']}/{update['steps']}, " \
                            f"loss {update['loss']:.4f} ..."

    def _on_epoch(self, update):
        self.epochs.append(dict(update["scores"], epoch=update["epoch"]))
        self.draw()

    def _on_end(self, update):
        self._ended()
        if not update["stopped"]:  # a time budget plans its epochs as it goes: the last may come sooner
            self.bar.value = self.bar.max
        if os.path.exists(update["best"]):
            CHOSEN.choose(update["best"])
        self.status.value = f"{update['stopped'] or 'done'}: model {update['best']}"
        show_info(f"biounet: trained: {update['best']} is the model now")
        self.resume_button.enabled = bool(update["stopped"])

    def _on_error(self, update):
        self._ended()
        self._failed(update["message"])

    def _failed(self, message):
        self.status.value = f"error: {message}"
        show_error(f"biounet: {message}")

    def _ended(self):
        self.timer.stop()
        if self.process is not None:
            self.process.wait(timeout=30)
        self.process = None
        self._buttons(running=False)

    def _buttons(self, running):
        self.train_button.enabled, self.stop_button.enabled = not running, running
        self.resume_button.enabled = False

    def draw(self):
        """The loss curves (left) and the validation scores (right) by epoch."""
        self.figure.clear()
        losses, scores = self.figure.add_subplot(1, 2, 1), self.figure.add_subplot(1, 2, 2)
        epochs = [e["epoch"] for e in self.epochs]
        for key in sorted({k for e in self.epochs for k in e if k != "epoch"}):
            axes = losses if key.endswith("loss") else scores
            axes.plot(epochs, [e.get(key, np.nan) for e in self.epochs], marker=".", label=key)
        for axes, title in ((losses, "loss"), (scores, "validation")):
            axes.set_title(title, fontsize=8)
            axes.set_xlabel("epoch", fontsize=7)
            axes.tick_params(labelsize=6)
            if axes.lines:
                axes.legend(fontsize=6)
        self.canvas.draw_idle()
