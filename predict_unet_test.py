"""Predict a mask for every image of a dataset, one PNG per image named after it, at its own size
(a TIFF volume: one ImageJ TIFF stack named after it, a slice per page).

    python predict_unet_test.py                                   # checkpoints/best.npz, test_image/
    python predict_unet_test.py --checkpoint pretrained/checkpoints --test-data-path my_images/
    python predict_unet_test.py --pretrained                      # the original example's weights
    python predict_unet_test.py --save-prob --overlay-path predict_overlay/ --label-path test_label/
    python predict_unet_test.py --test-data-path stage1_test/     # DSB 2018 layout: <id>.png each
    python predict_unet_test.py --test-data-path test-volume.tif --save-prob --prob-bits 32   # stacks out

One class: masks hold 255 where the network's cell (object) probability exceeds --threshold, else 0
(a network trained for objects, --instances, counts as one class: its object probability is
1 - background).
Several classes: masks hold class indices (argmax), and --color-path gets them in VOC's colours.
The checkpoint says how to rebuild the network and what input it wants (channels, size, how its
intensities were normalized), so no model flags are needed.
"""
import argparse
import csv
import io
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import backend
import volumes
from checkpoint import CheckpointError, build_model, network_input, predicted_classes
from cli import ArgumentParser, file_to_write, folder_to_write, object_size_flags, path_to_read, probability, ranged
from dataloader import channels_of, rgb_planes
from datasets import FORMATS, find_samples, read_sample_label
from evaluate import format_table, score_binary, score_multiclass, write_json
from files import DataError, atomic_write, write_png, write_tiff
from inference import predict_at_object_size, probability_values
from instances import METHODS, foreground, in_diameters, measure, object_method, objects_of, roi_set
from processes import WatchedPool, WorkersDied
from unet import MIN_SIDE
from visualize import class_colors, montage, outline_objects, overlay

MONTAGE_ROWS = 4


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", default="checkpoints/best.npz",
                   help="our .npz checkpoint, or the original example's OneFlow checkpoint folder")
    p.add_argument("--pretrained", action="store_true",
                   help="download (once) and use the original example's published OneFlow checkpoint")
    p.add_argument("--test-data-path", "--Test_Data_path", default="test_image/",
                   help="image folder, DSB 2018 folder, VOC root, nnU-Net or Cellpose dataset, or TIFF volume "
                        "(datasets.py)")
    p.add_argument("--data-format", choices=("auto",) + FORMATS, default="auto", help="layout of --test-data-path")
    p.add_argument("--split", default="val", help="VOC: the ImageSets/Segmentation list to predict")
    p.add_argument("--save-res-path", "--save_res_path", type=folder_to_write, default="predict_image/",
                   help="output folder")
    p.add_argument("--threshold", type=probability, default=0.5, help="cell probability above which a pixel is cell")
    p.add_argument("--save-prob", action="store_true",
                   help="also write cell-probability maps (what the ISBI scores and evaluate.py want)")
    p.add_argument("--prob-path", type=folder_to_write, default="predict_prob/", help="folder for --save-prob")
    p.add_argument("--prob-bits", type=int, choices=[8, 16, 32], default=16,
                   help="probability maps as 8- or 16-bit integers (PNG, or TIFF for stacks), or 32: float32 TIFFs")
    p.add_argument("--slices", action="store_true",
                   help="a TIFF volume's predictions as one PNG per page, instead of TIFF stacks named after it")
    p.add_argument("--overlay-path", type=folder_to_write,
                   help="also write each image with its predicted membranes tinted here")
    p.add_argument("--label-path", type=path_to_read,
                   help="label folder or TIFF of the test images (DSB and VOC bring their own): then scores are "
                        "printed, errors marked in overlays, plus montage.png")
    p.add_argument("--scores-json", type=file_to_write,
                   help="with labels: write every score, per image and mean, to this JSON file")
    p.add_argument("--color-path", type=folder_to_write, default="predict_color/",
                   help="with several classes: colour pictures of the class-index masks (VOC palette)")
    p.add_argument("--tile", type=ranged(int, MIN_SIDE, also=(0,)), default=1024,
                   help="predict larger images in overlapping tiles of this size, blended (0: whole image)")
    p.add_argument("--overlap", type=ranged(int, 0), default=128, help="overlap of neighbouring tiles, in pixels")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                   help="average the 8 flips/90-degree rotations of each image (8x the time; --no-tta: once)")
    p.add_argument("--batch", type=ranged(int, 1, 64),
                   help="views of an image (--tta) in one forward pass; the same outputs (default: 8 on CUDA, "
                        "1 on a CPU, where 8 measured 1.4x slower; BENCHMARKS.md)")
    p.add_argument("--compile", action="store_true",
                   help="compile the network's forward pass: torch.compile (PyTorch), nn.Graph (OneFlow); the same "
                        "outputs within 1e-4, faster once compiled, but compiling costs a start-up (BENCHMARKS.md)")
    p.add_argument("--workers", type=ranged(int, 0, 256), default=0,
                   help="processes predicting images (or a volume's blocks, on a local Dask cluster) side by side "
                        "(0: one per core with OneFlow on a CPU, each with at least 4 images; else 1)")
    volume = p.add_argument_group("volumes and slides larger than memory (volumes.py): zarr / OME-Zarr inputs, "
                                  "or a TIFF with --blockwise, predicted block by block into OME-Zarr stores")
    volume.add_argument("--blockwise", action="store_true",
                        help="a TIFF volume or slide block by block (read as tifffile's zarr store, never whole) into "
                             "<name>.ome.zarr stores, instead of TIFF stacks held in memory")
    volume.add_argument("--block", type=ranged(int, 32, 65536), default=1024,
                        help="block side in pixels (a z slice is cut into blocks; memory grows with its square)")
    volume.add_argument("--halo", type=ranged(int, 0, 4096), default=volumes.HALO,
                        help="pixels read around each block (more than the network's reach, so that blocks equal "
                             "the whole slice predicted at once)")
    volume.add_argument("--levels", type=ranged(int, 0, 16),
                        help="downsampled levels written beside each store's full resolution, for viewers (each "
                             "halves y and x; default: as many as bring a slice within one block)")
    volume.add_argument("--scheduler", help="address of a running Dask scheduler (tcp://HOST:8786) to predict on")
    volume.add_argument("--overwrite", action="store_true",
                        help="replace output stores written with other settings (else they are never written into)")
    p.add_argument("--instance-path", type=folder_to_write,
                   help="also write numbered objects here (one class): 16-bit label PNGs (same names), ImageJ ROI "
                        "sets (NAME_RoiSet.zip, for Fiji's ROI Manager) and objects.csv (a row per object)")
    p.add_argument("--objects", choices=("auto",) + METHODS, default="auto",
                   help="how the probabilities become objects: interior: seeded at the interiors a network trained "
                        "for objects (--instances) predicts; watershed: the mask split at its distance maxima; "
                        "cells: the regions between membranes (4-connected); auto: cells for ISBI-like data, "
                        "interior for a network trained for touching objects or distances (--object-target), else "
                        "watershed")
    object_size_flags(p, "estimated for each image from two quick passes where the network was trained at an "
                         "object size (the checkpoint says), which then sees the image rescaled to its training "
                         "objects' size; else each image at its own scale")
    p.add_argument("--min-size", type=ranged(int, 0),
                   help="objects smaller than this many pixels are dropped (default: 5%% of the median object's area "
                        "where the object size is known, else 16)")
    p.add_argument("--min-distance", type=ranged(int, 1),
                   help="watershed: least distance in pixels between the centres of two touching objects (default: "
                        "half the median object's diameter where the object size is known, else 10)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda ...")
    p.add_argument("--amp", choices=backend.PRECISIONS, default="off",
                   help="mixed precision of the forward pass: bf16 or fp16 on CUDA (bf16 also on a CPU with PyTorch)")
    return p.parse_args(argv)


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
    method, data = job["outputs"].get("objects"), meta.get("data", {})
    if method == "interior" and not data.get("instances"):
        raise CheckpointError(f"{job['checkpoint']}: --objects interior needs a network trained for objects "
                              f"(--instances); this one predicts one class: use --objects watershed")
    if method == "auto":
        method = object_method(data.get("format"), data.get("instances"), data.get("object_target"))
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
    data, classes = meta.get("data", {}), predicted_classes(meta)
    name = sample.name + ".png"
    prob = foreground(maps) if data.get("instances") else maps
    truth = None
    if sample.read_label:
        truth = read_sample_label(sample, image.shape[:2], classes, data.get("ignore_index", 255),
                                  data.get("instance_labels", False))[0]
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
    classes, ignore_index = predicted_classes(meta), meta.get("data", {}).get("ignore_index", 255)
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
    if meta.get("data", {}).get("object_size"):
        sys.exit(f"error: {args.checkpoint}: trained on images rescaled for their objects' size (--object-size); "
                 f"blocks are predicted at the volume's own scale: train with --no-object-size for volumes")
    diameter = args.object_size if isinstance(args.object_size, float) else None
    outputs = dict(outputs, **dict(zip(("min_size", "min_distance"),
                                       in_diameters(diameter, args.min_size, args.min_distance))))
    objects = with_object_method(dict(checkpoint=args.checkpoint, outputs=outputs), meta)["outputs"]["objects"]
    return volumes.predict_volume(args.test_data_path, args.checkpoint, dict(outputs, objects=objects),
                                  args.threshold, device, args.tta, args.amp, args.block, args.halo, args.workers,
                                  args.scheduler, args.overwrite, meta, args.levels)


def main(argv=None):
    args = parse_args(argv)
    if args.tile and not 0 <= args.overlap < args.tile:
        sys.exit(f"error: --overlap must be at least 0 and smaller than --tile ({args.tile})")
    outputs = dict(masks=args.save_res_path, colors=args.color_path, prob=args.prob_path if args.save_prob else None,
                   prob_bits=args.prob_bits, overlay=args.overlay_path, instances=args.instance_path, slices=args.slices,
                   objects=args.objects, min_size=args.min_size, min_distance=args.min_distance)
    try:
        if args.pretrained:
            from fetch_data import fetch_pretrained
            args.checkpoint = fetch_pretrained()
        device = backend.resolve_device(args.device)
        if problem := backend.precision_problem(args.amp, device):
            sys.exit(f"error: {problem}")
        print(f"predicting with {args.checkpoint} on {backend.NAME}/{device}")
        if note := backend.cpu_speed_note(device, "bash test.sh", "predicts about 4.5x faster"):
            print(note)
        if blockwise := volumes.is_zarr(args.test_data_path) or args.blockwise:
            written, scores = predict_blockwise(args, outputs, device), None
        else:
            written, scores = predict_dataset(args.checkpoint, args.test_data_path, outputs, args.data_format,
                                              args.label_path, args.threshold, device, args.tile, args.overlap,
                                              args.tta, args.split, args.workers, args.amp,
                                              args.batch or (8 if device.startswith("cuda") else 1), args.compile,
                                              args.object_size)
    except (DataError, CheckpointError, OSError, WorkersDied) as err:
        sys.exit(f"error: {err}")
    print(f"{len(written)} OME-Zarr stores written" if blockwise else f"{len(written)} masks written to {args.save_res_path}")
    if scores:
        print(format_table(scores))
        if args.scores_json:
            write_json(args.scores_json, scores)


if __name__ == "__main__":
    main()
