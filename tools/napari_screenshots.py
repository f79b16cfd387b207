"""The README's napari screenshots, made by driving the plugin as a person does (under Xvfb):

    ISBI_DATA_DIR=../shared/data/isbi2012 xvfb-run -a -s "-screen 0 1600x1200x24" \\
        .venv-torch/bin/python tools/napari_screenshots.py --train-folder ../shared/data/isbi2012/train_image

opens the ISBI sample, trains a model for a minute from --train-folder, segments the sample,
corrects two objects with the eraser and the brush, retrains a minute from the corrected layers
(fine-tuning) and segments again; a screenshot of the window after each step goes into
docs/images/napari-*.png.
"""
import argparse
import os
import tempfile
import time

import napari
import numpy as np
from qtpy.QtWidgets import QApplication

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "images")


def wait(condition, timeout=1800):
    end = time.time() + timeout
    while not condition() and time.time() < end:
        QApplication.processEvents()
        time.sleep(0.05)
    for _ in range(20):
        QApplication.processEvents()
        time.sleep(0.02)


def shoot(viewer, name):
    path = os.path.join(OUT, f"napari-{name}.png")
    viewer.screenshot(path, canvas_only=False, size=None)
    print(path)


def train(train_widget, minutes):
    train_widget.minutes.value = minutes
    train_widget.train_button.native.click()
    wait(lambda: train_widget.process is None and train_widget.train_button.enabled)
    print(train_widget.status.value)


def segment(widget, name):
    widget.image.value = name
    widget.run_button.native.click()
    wait(lambda: widget.worker is None and widget.run_button.enabled)
    print(widget.status.value, widget.estimate.value)


def correct_two_objects(objects, mask):
    """The eraser drawn through the two largest objects (cells merged across a faint membrane are
    the commonest fault): a membrane painted into the `mask` layer, as a person fixes it by hand."""
    sizes = np.bincount(objects.ravel())
    mask.selected_label, mask.brush_size = 0, 5
    for number in np.argsort(sizes[1:])[::-1][:2] + 1:
        ys, xs = np.nonzero(objects == number)
        for y in range(ys.min(), ys.max() + 1, 2):
            mask.paint((y, int(np.median(xs))), 0)  # cut in two along its middle
    mask.refresh()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-folder", required=True, help="images to train the first model on (labels beside)")
    p.add_argument("--minutes", type=float, default=1.0, help="each training run's time budget")
    args = p.parse_args()
    os.makedirs(OUT, exist_ok=True)
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1500, 1000)
    viewer.open_sample("biounet", "isbi2012")
    name = viewer.layers[0].name
    _, segment_widget = viewer.window.add_plugin_dock_widget("biounet", "Segment")
    _, train_widget = viewer.window.add_plugin_dock_widget("biounet", "Train")
    train_widget.checkpoint_dir.value = tempfile.mkdtemp(prefix="biounet-screenshots-")
    train_widget.source.value, train_widget.folder.value = "folder", args.train_folder
    train(train_widget, args.minutes)
    segment(segment_widget, name)
    viewer.layers[f"{name} mask"].visible = False
    shoot(viewer, "1-segmented")
    correct_two_objects(viewer.layers[f"{name} objects"].data, viewer.layers[f"{name} mask"])
    viewer.layers[f"{name} mask"].visible, viewer.layers[f"{name} objects"].visible = True, False
    shoot(viewer, "2-corrected")
    train_widget.source.value = "layers"
    train_widget.image_layer.value, train_widget.label_layer.value = name, f"{name} mask"
    train(train_widget, args.minutes)
    shoot(viewer, "3-retrained")
    segment(segment_widget, name)
    viewer.layers[f"{name} mask"].visible, viewer.layers[f"{name} objects"].visible = False, True
    shoot(viewer, "4-segmented-again")


if __name__ == "__main__":
    main()
