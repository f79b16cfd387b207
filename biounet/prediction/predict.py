"""Prediction of a dataset of images or TIFF stacks: masks, probabilities, objects, pictures and
scores written per image, in worker processes where asked.
"""
import csv
import io
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from biounet.model import backend
from biounet.prediction import volumes
from biounet.model.meta import TrainingData
from biounet.model.checkpoint import CheckpointError, build_model, network_input, predicted_classes
from biounet.data.loader import channels_of, rgb_planes
from biounet.data.datasets import find_samples, read_sample_label
from biounet.evaluation.scores import score_binary, score_multiclass
from biounet.core.files import atomic_write, write_png, write_tiff
from biounet.prediction.inference import predict_at_object_size, probability_values
from biounet.evaluation.instances import foreground, in_diameters, measure, object_method, objects_of, roi_set
from biounet.core.processes import WatchedPool
from biounet.core.visualize import class_colors, montage, outline_objects, overlay

MONTAGE_ROWS = 4


def write_outputs(name, image, prob, maps, truth, outputs, threshold=0.5, in_stack=False, diameter=None):
    """Write the mask (0/255) of the cell probability `prob`, or class indices plus a colour picture,
    and the optional extras; objects come from the network's probability `maps` (instances.objects_of,
    the smallest object and the seeds' distance in units of the objects' `diameter` where it is known).
    A page of a stack (`in_stack`) writes only its overlay: its mask, probability and objects are
    returned for write_stacks. Returns (mask, objects or None, objects' table or None)."""
    multiclass = prob.ndim == 3
    mask = prob.argmax(axis=2).astype(np.uint8) if multiclass else np.where(prob > threshold, 255, 0).astype(np.uint8)
    objects, table = None, None
    if outputs.get("instances") and not multiclass:
        objects = objects_of(maps, threshold, outputs["objects"],
                             *in_diameters(diameter, outputs["min_size"], outputs["min_distance"]))
        table = dict(image=[name] * int(objects.max()), **measure(objects, image))
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
        write_png(os.path.join(outputs["overlay"], name), picture if objects is None else outline_objects(picture, objects))
    return mask, objects, table


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


_worker = {}  # what one prediction process holds: the job, the network, the samples


def _start_worker(job, threads, samples=None):
    """Ready this process to predict samples of `job` (predict_dataset's arguments) by index
    (`samples`: those already found, in the process that found them)."""
    backend.set_threads(threads)
    model, meta = build_model(job["checkpoint"], job["device"])
    if job["compile"]:
        model = backend.compiled(model, job["amp"])
    samples = samples or find_samples(job["data_path"], job["data_format"], job["label_path"], job["split"])
    _worker.update(job=with_object_method(job, meta), model=model, meta=meta, samples=samples)


def with_object_method(job, meta):
    """The job with --objects auto settled for the checkpoint (instances.object_method)."""
    method, data = job["outputs"].get("objects"), TrainingData.of(meta)
    if method == "interior" and not data.instances:
        raise CheckpointError(f"{job['checkpoint']}: --objects interior needs a network trained for objects "
                              f"(--instances); this one predicts one class: use --objects watershed")
    if method == "auto":
        method = object_method(data.format, data.instances, data.object_target)
    return dict(job, outputs=dict(job["outputs"], objects=method))


def _predict_one(index):
    """Predict sample `index` and write its outputs; returns what the report and the scores need."""
    read = _read_one(index)
    return _write_one(read, *_infer(read))


def _predict_overlapped(indices):
    """_predict_one of each index in order, with the next image read and the last one's outputs
    computed and written in threads while the network runs, so the device does not wait for files."""
    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
        reading, writing = reader.submit(_read_one, indices[0]), None
        for n in range(len(indices)):
            read = reading.result()
            if n + 1 < len(indices):
                reading = reader.submit(_read_one, indices[n + 1])
            maps, diameter = _infer(read)
            if writing:
                yield writing.result()
            writing = writer.submit(_write_one, read, maps, diameter)
        yield writing.result()


def _read_one(index):
    sample, meta = _worker["samples"][index], _worker["meta"]
    raw = sample.read_image()
    image, note = network_input(meta, raw, sample.source)
    return dict(index=index, sample=sample, raw=raw, image=image, note=note)


def _infer(read):
    job = _worker["job"]
    with backend.autocast(job["device"], job["amp"]):
        return predict_at_object_size(_worker["model"], _worker["meta"], read["image"], job["device"], job["tile"],
                                      job["overlap"], job["tta"], read["sample"].source, job["batch"],
                                      job["object_size"])


def _write_one(read, maps, diameter):
    job, meta, index, sample, image = _worker["job"], _worker["meta"], read["index"], read["sample"], read["image"]
    data, classes = TrainingData.of(meta), predicted_classes(meta)
    name = sample.name + ".png"
    prob = foreground(maps) if data.instances else maps
    truth = None
    if sample.read_label:
        truth = read_sample_label(sample, image.shape[:2], classes, data.ignore_index, data.instance_labels)[0]
    in_stack = sample.stack is not None and not job["outputs"].get("slices")
    mask, objects, table = write_outputs(name, image, prob, maps, truth, job["outputs"], job["threshold"], in_stack,
                                         diameter)
    summary = f"cell {np.mean(mask > 0):.1%}" if classes == 1 else f"classes {sorted(np.unique(mask).tolist())}"
    if table is not None:
        summary += f", {len(table['image'])} objects"
    if diameter:
        summary += f", objects {diameter:.0f} pixels wide"
    if read["note"]:
        summary += f"; {read['note']}"
    wants_prob = job["outputs"].get("prob") and classes == 1
    return dict(source=sample.source, path=os.path.join(job["outputs"]["masks"], name), summary=summary, objects=table,
                warning=planes_warning(sample, read["raw"], _worker["model"].n_channels),
                scored=None if truth is None else (name, prob, truth),
                montage=(image, mask > 0, truth) if index in job["montage"] and classes == 1 else None,
                stack=sample.stack if in_stack else None,
                page=dict(mask=mask, prob=prob if wants_prob else None, objects=objects) if in_stack else None)


def planes_warning(sample, raw, channels):
    """What to tell of a one-channel network given a TIFF's 3 planes tagged RGB (tifffile's default for
    3 x H x W arrays): predicted as one grey image, not as 3 slices. None otherwise."""
    path = sample.stack[0] if sample.stack else sample.source
    if channels != 1 or channels_of(raw) != 3 or not path.lower().endswith((".tif", ".tiff")) or not rgb_planes(path):
        return None
    return (f"warning: {path}: 3 planes tagged RGB are read as one colour image and predicted as one grey image "
            f"(the network takes one channel); to predict them as 3 slices, save them with "
            f"tifffile.imwrite(path, array, photometric='minisblack')")


def predict_dataset(checkpoint, data_path, outputs, data_format="auto", label_path=None, threshold=0.5,
                    device="cpu", tile=1024, overlap=128, tta=False, split="val", workers=1, amp="off", batch=1,
                    compiled=False, object_size="auto"):
    """Predict every image of a dataset (any layout datasets.py reads) into `outputs` (a dict:
    masks, colors, prob, prob_bits, overlay folders), over `workers` processes (0: backend.default_workers);
    with labels, also the scores. The outputs do not depend on the number of workers.

    Returns (written mask paths, scores or None)."""
    samples = find_samples(data_path, data_format, label_path, split)
    workers = min(workers or backend.default_workers(len(samples)), len(samples))
    labelled = [i for i, sample in enumerate(samples) if sample.read_label]
    job = dict(checkpoint=checkpoint, data_path=data_path, data_format=data_format, label_path=label_path,
               split=split, outputs=outputs, threshold=threshold, device=device, tile=tile, overlap=overlap,
               tta=tta, amp=amp, batch=batch, compile=compiled, object_size=object_size, montage=set(labelled[:MONTAGE_ROWS]))
    threads = max(1, backend.cores() // workers)
    if workers == 1:
        _start_worker(job, threads, samples)
        meta = _worker["meta"]
        results = _predict_overlapped(range(len(samples)))
    else:
        meta = build_model(checkpoint, "cpu")[1]  # a damaged checkpoint stops here, before any worker starts
        job = with_object_method(job, meta)
        print(f"predicting with {workers} processes")
        backend.before_processes_share_the_cores()
        pool = WatchedPool(workers, "spawn", name="prediction worker", flag="--workers", initializer=_start_worker,
                           initargs=(job, threads))
        results = pool.results(_predict_one, ((i,) for i in range(len(samples))), ahead=2 * workers)
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
        _worker.clear()  # the network is not kept after the run
    if outputs.get("instances") and classes == 1:
        write_objects_csv(os.path.join(outputs["instances"], "objects.csv"), tables)
        print(f"{sum(len(t['image']) for t in tables)} objects: label images and objects.csv in {outputs['instances']}")
    if montage_rows and outputs.get("overlay"):
        write_png(os.path.join(outputs["overlay"], "montage.png"), montage(montage_rows))
    if not scored:
        return written, None
    scores = score_binary(scored, threshold) if classes == 1 else score_multiclass(scored, classes, ignore_index)
    return written, scores


def predict_blockwise(args, outputs, device):
    """A volume or slide block by block (volumes.py); returns the output stores' paths."""
    if args.label_path:
        sys.exit(f"error: --label-path: a volume predicted block by block ({args.test_data_path}) is not scored here; "
                 f"predict a TIFF volume without --blockwise to score its stacks")
    if args.overlay_path:
        print(f"note: no overlays for a volume predicted block by block (--overlay-path {args.overlay_path})")
    if args.compile:
        print("note: --compile is for images and stacks; blocks of a volume (edge blocks of other shapes) run eager")
    if args.halo % volumes.ALIGN:
        sys.exit(f"error: --halo must be a multiple of {volumes.ALIGN} (the network's pooling grid), not {args.halo}")
    meta = build_model(args.checkpoint, "cpu")[1]
    if TrainingData.of(meta).object_size:
        sys.exit(f"error: {args.checkpoint}: trained on images rescaled for their objects' size (--object-size); "
                 f"blocks are predicted at the volume's own scale: train with --no-object-size for volumes")
    diameter = args.object_size if isinstance(args.object_size, float) else None
    outputs = dict(outputs, **dict(zip(("min_size", "min_distance"),
                                       in_diameters(diameter, args.min_size, args.min_distance))))
    objects = with_object_method(dict(checkpoint=args.checkpoint, outputs=outputs), meta)["outputs"]["objects"]
    return volumes.predict_volume(args.test_data_path, args.checkpoint, dict(outputs, objects=objects),
                                  args.threshold, device, args.tta, args.amp, args.block, args.halo, args.workers,
                                  args.scheduler, args.overwrite, meta, args.levels)
