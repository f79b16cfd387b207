"""Prediction of a dataset of images or TIFF stacks: masks, probabilities, objects, pictures and
scores written per image, in worker processes where asked.
"""
import csv
import io
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from biounet.core.files import atomic_write, write_png, write_tiff
from biounet.core.processes import WatchedPool
from biounet.core.visualize import class_colors, montage, outline_objects, overlay
from biounet.data.datasets import find_samples, read_sample_label
from biounet.data.loader import channels_of, rgb_planes
from biounet.evaluation.instances import measure, roi_set
from biounet.evaluation.scores import score_binary, score_multiclass
from biounet.model import backend
from biounet.model.checkpoint import build_model, network_input, predicted_classes
from biounet.model.meta import TrainingData
from biounet.prediction.inference import probability_values
from biounet.prediction.segment import PredictionSettings, decide, object_method_for, probability_maps

MONTAGE_ROWS = 4


def write_outputs(name, image, segmentation, truth, outputs, in_stack=False):
    """Write an image's Segmentation into the folders of `outputs`: the mask (0/255, or class indices
    plus a colour picture), and the extras asked for (probabilities, objects with their ROI set,
    an overlay). A page of a stack (`in_stack`) writes only its overlay: the rest goes into
    write_stacks. Returns the objects' table (instances.measure) or None."""
    mask, objects, prob = segmentation.mask, segmentation.objects, segmentation.probabilities
    multiclass = prob.ndim == 3
    table = None if objects is None else dict(image=[name] * int(objects.max()), **measure(objects, image))
    if not in_stack:
        write_png(os.path.join(outputs["masks"], name), mask)
        if multiclass:
            write_png(os.path.join(outputs["colors"], name), class_colors(mask))
        elif outputs.get("prob"):
            write_image(os.path.join(outputs["prob"], name), probability_values(prob, outputs["prob_bits"]))
        if objects is not None:
            write_png(os.path.join(outputs["instances"], name), objects)
            rois = roi_set(objects)
            atomic_write(os.path.join(outputs["instances"], os.path.splitext(name)[0] + "_RoiSet.zip"),
                         lambda f: f.write(rois))
    if outputs.get("overlay"):
        picture = overlay(image, mask if multiclass else mask > 0, truth)
        write_png(os.path.join(outputs["overlay"], name),
                  picture if objects is None else outline_objects(picture, objects))
    return table


def write_image(path, array):
    """A PNG, or an ImageJ TIFF beside where PNG cannot hold it (float32)."""
    if array.dtype == np.float32:
        write_tiff(os.path.splitext(path)[0] + ".tif", array)
    else:
        write_png(path, array)


def write_stacks(volume, pages, outputs):
    """The predictions of a TIFF volume's pages as stacks named after it (ImageJ TIFFs, a slice per
    page): masks 8-bit, probabilities as --prob-bits, objects 16-bit with one ROI set. Returns the mask stack's path."""
    stem = os.path.splitext(os.path.basename(volume))[0]
    path = os.path.join(outputs["masks"], stem + ".tif")
    write_tiff(path, np.stack([page["mask"] for page in pages]))
    if pages[0]["prob"] is not None:
        write_tiff(os.path.join(outputs["prob"], stem + ".tif"),
                   probability_values(np.stack([page["prob"] for page in pages]), outputs["prob_bits"]))
    if pages[0]["objects"] is not None:
        objects = np.stack([page["objects"] for page in pages])
        write_tiff(os.path.join(outputs["instances"], stem + ".tif"),
                   objects.astype(np.uint16 if objects.max() <= 65535 else np.float32))
        rois = roi_set(objects)
        atomic_write(os.path.join(outputs["instances"], stem + "_RoiSet.zip"), lambda f: f.write(rois))
    return path


def write_objects_csv(path, tables):
    """One CSV row per object of every image (columns of instances.measure)."""
    columns = ["image"] + [c for c in tables[0] if c != "image"] if tables else ["image"]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    for table in tables:
        writer.writerows(zip(*(table[c] for c in columns)))
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


_loaded = {}  # what this process has loaded for a job: its network and samples (a cache, not the work)


def _set_threads(threads):
    """A prediction worker's start: its share of the cores."""
    backend.set_threads(threads)


def _load(job, samples=None):
    """(model, meta, samples) of `job` in this process, loaded once (`samples`: those already found,
    in the process that found them)."""
    key = job["key"]
    if key not in _loaded:
        _loaded.clear()
        model, meta = build_model(job["checkpoint"], job["settings"].device)
        if job["compile"]:
            model = backend.compiled(model, job["settings"].amp)
        samples = samples or find_samples(job["data_path"], job["data_format"], job["label_path"], job["split"])
        _loaded[key] = model, meta, samples
    return _loaded[key]


def _predict_one(job, index):
    """Predict sample `index` of `job` and write its outputs; returns what the report and the scores need."""
    read = _read_one(job, index)
    return _write_one(job, read, *_infer(job, read))


def _predict_overlapped(job, indices):
    """_predict_one of each index in order, with the next image read and the last one's outputs
    computed and written in threads while the network runs, so the device does not wait for files."""
    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
        reading, writing = reader.submit(_read_one, job, indices[0]), None
        for n in range(len(indices)):
            read = reading.result()
            if n + 1 < len(indices):
                reading = reader.submit(_read_one, job, indices[n + 1])
            maps, diameter = _infer(job, read)
            if writing:
                yield writing.result()
            writing = writer.submit(_write_one, job, read, maps, diameter)
        yield writing.result()


def _read_one(job, index):
    _, meta, samples = _load(job)
    sample = samples[index]
    raw = sample.read_image()
    image, note = network_input(meta, raw, sample.source)
    return dict(index=index, sample=sample, raw=raw, image=image, note=note)


def _infer(job, read):
    model, meta, _ = _load(job)
    return probability_maps(model, meta, read["image"], settings=job["settings"], source=read["sample"].source)


def _write_one(job, read, maps, diameter):
    model, meta, _ = _load(job)
    index, sample, image = read["index"], read["sample"], read["image"]
    data, classes = TrainingData.of(meta), predicted_classes(meta)
    name = sample.name + ".png"
    segmentation = decide(maps, meta, job["settings"], diameter=diameter, method=job["objects"])
    truth = None
    if sample.read_label:
        truth = read_sample_label(sample, image.shape[:2], classes, ignore_index=data.ignore_index,
                                  instance_labels=data.instance_labels)[0]
    in_stack = sample.stack is not None and not job["outputs"].get("slices")
    table = write_outputs(name, image, segmentation, truth=truth, outputs=job["outputs"], in_stack=in_stack)
    mask, prob = segmentation.mask, segmentation.probabilities
    summary = f"cell {np.mean(mask > 0):.1%}" if classes == 1 else f"classes {sorted(np.unique(mask).tolist())}"
    if table is not None:
        summary += f", {len(table['image'])} objects"
    if diameter:
        summary += f", objects {diameter:.0f} pixels wide"
    if read["note"]:
        summary += f"; {read['note']}"
    wants_prob = job["outputs"].get("prob") and classes == 1
    return dict(source=sample.source, path=os.path.join(job["outputs"]["masks"], name), summary=summary, objects=table,
                warning=planes_warning(sample, read["raw"], model.n_channels),
                scored=None if truth is None else (name, prob, truth),
                montage=(image, mask > 0, truth) if index in job["montage"] and classes == 1 else None,
                stack=sample.stack if in_stack else None,
                page=dict(mask=mask, prob=prob if wants_prob else None, objects=segmentation.objects)
                if in_stack else None)


def planes_warning(sample, raw, channels):
    """What to tell of a one-channel network given a TIFF's 3 planes tagged RGB (tifffile's default for
    3 x H x W arrays): predicted as one grey image, not as 3 slices. None otherwise."""
    path = sample.stack[0] if sample.stack else sample.source
    if channels != 1 or channels_of(raw) != 3 or not path.lower().endswith((".tif", ".tiff")) or not rgb_planes(path):
        return None
    return (f"warning: {path}: 3 planes tagged RGB are read as one colour image and predicted as one grey image "
            f"(the network takes one channel); to predict them as 3 slices, save them with "
            f"tifffile.imwrite(path, array, photometric='minisblack')")


def predict_dataset(checkpoint, data_path, outputs, *, settings=PredictionSettings(), data_format="auto",
                    label_path=None, split="val", workers=1, compiled=False):
    """Predict every image of a dataset (any layout datasets.py reads) as `settings` say into
    `outputs` (a dict of folders: masks, colors, prob with prob_bits, overlay, instances), over
    `workers` processes (0: backend.default_workers); with labels, also the scores. The outputs do
    not depend on the number of workers.

    Returns (written mask paths, scores or None)."""
    samples = find_samples(data_path, data_format, label_path, split)
    workers = min(workers or backend.default_workers(len(samples)), len(samples))
    labelled = [i for i, sample in enumerate(samples) if sample.read_label]
    job = dict(key=os.urandom(8).hex(), checkpoint=checkpoint, data_path=data_path, data_format=data_format,
               label_path=label_path, split=split, outputs=outputs, settings=settings, compile=compiled,
               montage=set(labelled[:MONTAGE_ROWS]))
    threads = max(1, backend.cores() // workers)
    if workers == 1:
        _set_threads(threads)
    # a damaged checkpoint stops here, before any worker starts
    meta = _load(job, samples)[1] if workers == 1 else build_model(checkpoint, "cpu")[1]
    job["objects"] = object_method_for(meta, settings.objects, checkpoint) if outputs.get("instances") else None
    if workers == 1:
        results = _predict_overlapped(job, range(len(samples)))
    else:
        print(f"predicting with {workers} processes")
        backend.before_processes_share_the_cores()
        pool = WatchedPool(workers, "spawn", name="prediction worker", flag="--workers", initializer=_set_threads,
                           initargs=(threads,))
        results = pool.results(_predict_one, ((job, i) for i in range(len(samples))), ahead=2 * workers)
    classes, ignore_index = predicted_classes(meta), TrainingData.of(meta).ignore_index
    written, montage_rows, scored, tables, stacks = [], [], [], [], {}
    try:
        for result in results:
            if result["warning"]:
                print(result["warning"], file=sys.stderr)
            if result["stack"]:
                volume, _, pages = result["stack"]
                stacks.setdefault(volume, []).append(result["page"])
                print(f"{result['source']} ({result['summary']})")
                if len(stacks[volume]) == pages:
                    written.append(write_stacks(volume, stacks.pop(volume), outputs))
                    print(f"{volume} -> {written[-1]} ({pages} slices)")
            else:
                print(f"{result['source']} -> {result['path']} ({result['summary']})")
                written.append(result["path"])
            scored += [result["scored"]] if result["scored"] else []
            montage_rows += [result["montage"]] if result["montage"] else []
            tables += [result["objects"]] if result["objects"] is not None else []
    finally:
        if workers > 1:
            pool.close()
        _loaded.clear()  # the network is not kept after the run
    if outputs.get("instances") and classes == 1:
        write_objects_csv(os.path.join(outputs["instances"], "objects.csv"), tables)
        print(f"{sum(len(t['image']) for t in tables)} objects: label images and objects.csv in {outputs['instances']}")
    if montage_rows and outputs.get("overlay"):
        write_png(os.path.join(outputs["overlay"], "montage.png"), montage(montage_rows))
    if not scored:
        return written, None
    if classes == 1:
        return written, score_binary(scored, settings.threshold)
    return written, score_multiclass(scored, classes, ignore_index)
