"""The napari plugin measured as a person uses it, in a shown viewer (run under Xvfb):

    xvfb-run -a .venv-torch/bin/python benchmarks/bench_napari.py --checkpoint MODEL.npz \\
        --dsb ../shared/data/dsb2018/stage1_train [--minutes 3]

prints a table: the time from Run to the layers for a 512x512 slice and a 4096x4096 image, the
memory a zarr-backed stack costs (peak resident memory against the stack's size), and what one
correction round buys: the model (trained on another kind of image) scored on held-out DSB 2018
nuclei, then fine-tuned in the Train widget on two corrected images (their true masks painted as
the labels layer) for --minutes, and scored again.
"""
import argparse
import os
import resource
import sys
import tempfile
import time

import numpy as np
import zarr
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import napari  # noqa: E402
from qtpy.QtWidgets import QApplication  # noqa: E402

import biounet  # noqa: E402
from biounet.data.fetch import synthetic_em_slice  # noqa: E402
from biounet.napari_plugin.model_choice import CHOSEN  # noqa: E402


def wait(condition, timeout=3600):
    end = time.time() + timeout
    while not condition() and time.time() < end:
        QApplication.processEvents()
        time.sleep(0.02)


def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def segment_seconds(viewer, segment, name, data):
    """Seconds from pressing Run to the layers of `data` being in the viewer."""
    viewer.add_image(data, name=name)
    segment.image.value = name
    start = time.perf_counter()
    segment.run_button.native.click()
    wait(lambda: f"{name} objects" in viewer.layers and segment.worker is None)
    return time.perf_counter() - start


def dsb_samples(folder, count):
    """(image, numbered nuclei) of the first `count` DSB 2018 samples."""
    samples = []
    for sample in sorted(os.listdir(folder))[:count]:
        image = np.array(Image.open(f"{folder}/{sample}/images/{sample}.png"))[..., :3]
        objects = np.zeros(image.shape[:2], np.uint16)
        for number, mask in enumerate(sorted(os.listdir(f"{folder}/{sample}/masks")), 1):
            objects[np.array(Image.open(f"{folder}/{sample}/masks/{mask}")) > 0] = number
        samples.append((image, objects))
    return samples


def scores(checkpoint, held_out):
    model = biounet.load_model(checkpoint)
    results = [model.predict(image) for image, _ in held_out]
    objects = biounet.evaluate([r.objects for r in results], [o for _, o in held_out], instances=True)["mean"]
    masks = biounet.evaluate([r.mask for r in results], [(o > 0).astype(np.uint8) for _, o in held_out])["mean"]
    return objects["map_05_095"], objects["ap50"], masks["dice"]


def correction_round(viewer, train, corrected, minutes):
    """Fine-tune the chosen model in the Train widget on the corrected images; the new checkpoint."""
    images = np.stack([image for image, _ in corrected])  # one stack of the two, as a person would make it
    labels = np.stack([objects for _, objects in corrected])
    viewer.add_image(images, name="both", rgb=True)
    viewer.add_labels(labels, name="both corrected")
    train.source.value, train.image_layer.value, train.label_layer.value = "layers", "both", "both corrected"
    train.minutes.value = minutes
    train.train_button.native.click()
    wait(lambda: train.process is None and train.train_button.enabled)
    print(f"training: {train.status.value}")
    return CHOSEN.checkpoint


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the model to start from (trained on another kind of image)")
    p.add_argument("--dsb", required=True, help="DSB 2018 stage1_train folder")
    p.add_argument("--minutes", type=float, default=3.0, help="time budget of the correction round")
    p.add_argument("--held-out", type=int, default=10, help="DSB images scored before and after")
    p.add_argument("--slices", type=int, default=8, help="slices of the zarr-backed stack")
    p.add_argument("--only-stack", action="store_true", help="measure the zarr-backed stack alone")
    args = p.parse_args()
    viewer = napari.Viewer(show=True)
    _, segment = viewer.window.add_plugin_dock_widget("biounet", "Segment")
    _, train = viewer.window.add_plugin_dock_widget("biounet", "Train")
    train.checkpoint_dir.value = tempfile.mkdtemp(prefix="bench-napari-")
    CHOSEN.choose(args.checkpoint)
    rows = []
    rng = np.random.default_rng(0)
    # first: the peak resident memory is a high-water mark
    stack = np.stack([synthetic_em_slice(2048, rng, cell_size=40)[0] for _ in range(args.slices)])
    store = zarr.open(os.path.join(tempfile.mkdtemp(), "stack.zarr"), mode="w", shape=stack.shape,
                      chunks=(1, 512, 512), dtype=stack.dtype)
    store[:] = stack
    del stack
    before = peak_mib()
    seconds = segment_seconds(viewer, segment, "zarr stack", store)
    rows.append((f"zarr-backed stack {args.slices} x 2048 x 2048 ({args.slices * 4} MiB as uint8): Run -> layers",
                 f"{seconds:.1f} s"))
    rows.append(("  peak resident memory of the viewer's process, before -> after",
                 f"{before:.0f} -> {peak_mib():.0f} MiB"))
    if args.only_stack:
        return print_table(rows)
    for side in (512, 4096):
        slice_ = synthetic_em_slice(side, rng, cell_size=40)[0]
        seconds = segment_seconds(viewer, segment, f"s{side}", slice_)
        rows.append((f"Run -> layers, {side}x{side} slice (8 views)", f"{seconds:.1f} s"))
    samples = dsb_samples(args.dsb, 40)
    shapes = [image.shape for image, _ in samples]
    pair = next(i for i in range(len(samples)) if shapes.count(shapes[i]) >= 2)  # two of one size: one stack
    corrected = [s for s in samples if s[0].shape == shapes[pair]][:2]
    held_out = [s for s in samples if not any(s is c for c in corrected)][:args.held_out]
    first = scores(args.checkpoint, held_out)
    tuned = correction_round(viewer, train, corrected, args.minutes)
    after = scores(tuned, held_out)
    for name, value_before, value_after in zip(("mAP 0.5-0.95", "AP50", "mask Dice"), first, after):
        rows.append((f"held-out DSB ({len(held_out)} images) {name}: before -> after one round",
                     f"{value_before:.3f} -> {value_after:.3f}"))
    print_table(rows)


def print_table(rows):
    width = max(len(name) for name, _ in rows)
    print(f"| {'measure'.ljust(width)} | value |\n| {'-' * width} | --- |")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")


if __name__ == "__main__":
    main()
