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
1 - background). Membranes (ISBI-like data): less the one-pixel lines where cells grown from seeds
(--seed-threshold) meet, so that neighbouring cells stay apart in the mask.
Several classes: masks hold class indices (argmax), and --color-path gets them in VOC's colours.
The checkpoint says how to rebuild the network and what input it wants (channels, size, how its
intensities were normalized), so no model flags are needed.
"""
import argparse
import sys

from biounet.core.cli import (ArgumentParser, file_to_write, folder_to_write, object_size_flags, path_to_read,
                              probability, ranged)
from biounet.core.files import DataError, is_zarr
from biounet.core.processes import WorkersDied
from biounet.data.datasets import FORMATS
from biounet.data.fetch import fetch_pretrained
from biounet.evaluation.instances import METHODS
from biounet.evaluation.scores import format_table, write_json
from biounet.model import backend
from biounet.model.checkpoint import CheckpointError
from biounet.model.unet import MIN_SIDE
from biounet.prediction import volumes
from biounet.prediction.predict import predict_dataset
from biounet.prediction.segment import PredictionSettings


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    for add_flags in (input_flags, output_flags, running_flags, volume_flags, object_flags):
        add_flags(p)
    return p.parse_args(argv)



def input_flags(p):
    """What to predict, with which network."""
    p.add_argument("--checkpoint", nargs="+", default=["checkpoints/best.npz"],
                   help="our .npz checkpoint, or the original example's OneFlow checkpoint folder; several: an "
                        "ensemble, their probabilities averaged (e.g. the runs of two seeds)")
    p.add_argument("--pretrained", action="store_true",
                   help="download (once) and use the original example's published OneFlow checkpoint")
    p.add_argument("--test-data-path", "--Test_Data_path", default="test_image/",
                   help="image folder, DSB 2018 folder, VOC root, nnU-Net or Cellpose dataset, or TIFF volume "
                        "(datasets.py)")
    p.add_argument("--data-format", choices=("auto",) + FORMATS, default="auto", help="layout of --test-data-path")
    p.add_argument("--split", default="val", help="VOC: the ImageSets/Segmentation list to predict")
    p.add_argument("--label-path", type=path_to_read,
                   help="label folder or TIFF of the test images (DSB and VOC bring their own): then scores are "
                        "printed, errors marked in overlays, plus montage.png")



def output_flags(p):
    """What is written where."""
    p.add_argument("--save-res-path", "--save_res_path", type=folder_to_write, default="predict_image/",
                   help="output folder")
    p.add_argument("--threshold", type=probability, default=0.5, help="cell probability above which a pixel is cell")
    p.add_argument("--seed-threshold", type=probability,
                   help="membranes: cells are seeded where the cell probability exceeds this and grown until they "
                        "meet, and the mask keeps the lines where they meet as membrane (default: the checkpoint's, "
                        "calibrated after training for the challenge's V_rand, else --threshold)")
    p.add_argument("--save-prob", action="store_true",
                   help="also write cell-probability maps (what the ISBI scores and biounet-evaluate want)")
    p.add_argument("--prob-path", type=folder_to_write, default="predict_prob/", help="folder for --save-prob")
    p.add_argument("--prob-bits", type=int, choices=[8, 16, 32], default=16,
                   help="probability maps as 8- or 16-bit integers (PNG, or TIFF for stacks), or 32: float32 TIFFs")
    p.add_argument("--slices", action="store_true",
                   help="a TIFF volume's predictions as one PNG per page, instead of TIFF stacks named after it")
    p.add_argument("--overlay-path", type=folder_to_write,
                   help="also write each image with its predicted membranes tinted here")
    p.add_argument("--scores-json", type=file_to_write,
                   help="with labels: write every score, per image and mean, to this JSON file")
    p.add_argument("--color-path", type=folder_to_write, default="predict_color/",
                   help="with several classes: colour pictures of the class-index masks (VOC palette)")



def running_flags(p):
    """How the network runs: tiles, views, processes, device."""
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
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda ...")
    p.add_argument("--amp", choices=backend.PRECISIONS, default="off",
                   help="mixed precision of the forward pass: bf16 or fp16 on CUDA (bf16 also on a CPU with PyTorch)")



def volume_flags(p):
    """Volumes and slides larger than memory, block by block."""
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



def object_flags(p):
    """Numbered objects (one class)."""
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


def prediction_settings(args, device):
    """The PredictionSettings the flags ask for."""
    return PredictionSettings(threshold=args.threshold, seed_threshold=args.seed_threshold, device=device, tile=args.tile, overlap=args.overlap,
                              tta=args.tta, amp=args.amp, batch=args.batch or (8 if device.startswith("cuda") else 1),
                              object_size=args.object_size, objects=args.objects, min_size=args.min_size,
                              min_distance=args.min_distance)


def predict_blockwise(args, outputs, settings):
    """A volume or slide block by block (volumes.py); returns the output stores' paths."""
    if args.label_path:
        sys.exit(f"error: --label-path: a volume predicted block by block ({args.test_data_path}) is not scored here; "
                 f"predict a TIFF volume without --blockwise to score its stacks")
    if args.overlay_path:
        print(f"note: no overlays for a volume predicted block by block (--overlay-path {args.overlay_path})")
    if args.compile:
        print("note: --compile is for images and stacks; blocks of a volume (edge blocks of other shapes) run eager")
    return volumes.predict_volume(args.test_data_path, args.checkpoint, outputs, settings=settings, block=args.block,
                                  halo=args.halo, workers=args.workers, scheduler=args.scheduler,
                                  overwrite=args.overwrite, levels=args.levels)


def main(argv=None):
    args = parse_args(argv)
    if args.tile and not 0 <= args.overlap < args.tile:
        sys.exit(f"error: --overlap must be at least 0 and smaller than --tile ({args.tile})")
    if args.halo % volumes.ALIGN:
        sys.exit(f"error: --halo must be a multiple of {volumes.ALIGN} (the network's pooling grid), not {args.halo}")
    outputs = dict(masks=args.save_res_path, colors=args.color_path, prob=args.prob_path if args.save_prob else None,
                   prob_bits=args.prob_bits, overlay=args.overlay_path, instances=args.instance_path, slices=args.slices)
    args.checkpoint = tuple(args.checkpoint) if len(args.checkpoint) > 1 else args.checkpoint[0]
    try:
        if args.pretrained:
            args.checkpoint = fetch_pretrained()
        device = backend.resolve_device(args.device)
        if problem := backend.precision_problem(args.amp, device):
            sys.exit(f"error: {problem}")
        print(f"predicting with {' + '.join(args.checkpoint) if isinstance(args.checkpoint, tuple) else args.checkpoint} "
              f"on {backend.NAME}/{device}")
        if note := backend.cpu_speed_note(device, "bash test.sh", "predicts about 4.5x faster"):
            print(note)
        settings = prediction_settings(args, device)
        if blockwise := is_zarr(args.test_data_path) or args.blockwise:
            written, scores = predict_blockwise(args, outputs, settings), None
        else:
            written, scores = predict_dataset(args.checkpoint, args.test_data_path, outputs, settings=settings,
                                              data_format=args.data_format, label_path=args.label_path,
                                              split=args.split, workers=args.workers, compiled=args.compile)
    except (DataError, CheckpointError, OSError, WorkersDied) as err:
        sys.exit(f"error: {err}")
    print(f"{len(written)} OME-Zarr stores written" if blockwise else f"{len(written)} masks written to {args.save_res_path}")
    if scores:
        print(format_table(scores))
        if args.scores_json:
            write_json(args.scores_json, scores)


if __name__ == "__main__":
    main()
