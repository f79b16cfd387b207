"""Predict a cell mask for every image in a folder, one PNG per input with the input's name.

    python predict_unet_test.py                                   # checkpoints/best.npz, test_image/
    python predict_unet_test.py --checkpoint pretrained/checkpoints --test-data-path my_images/
    python predict_unet_test.py --pretrained                      # the original example's weights
    python predict_unet_test.py --save-prob --overlay-path predict_overlay/ --label-path test_label/

Masks hold 255 where the network's cell probability exceeds --threshold, 0 on membranes.
The checkpoint says how to rebuild the network, so no model flags are needed.
"""
import argparse
import os
import sys

import numpy as np

import backend
from backend import flow
from checkpoint import CheckpointError, build_model
from dataloader import DataError, list_images, pair_by_name, read_image, read_label, write_png
from unet import mirror_for_valid
from visualize import montage, overlay

MONTAGE_ROWS = 4


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the docstring's layout and shows every flag's default."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/best.npz",
                   help="our .npz checkpoint, or the original example's OneFlow checkpoint folder")
    p.add_argument("--pretrained", action="store_true",
                   help="download (once) and use the original example's published OneFlow checkpoint")
    p.add_argument("--test-data-path", "--Test_Data_path", default="test_image/", help="folder of images")
    p.add_argument("--save-res-path", "--save_res_path", default="predict_image/", help="output folder")
    p.add_argument("--threshold", type=float, default=0.5, help="cell probability above which a pixel is cell")
    p.add_argument("--save-prob", action="store_true",
                   help="also write cell-probability maps (what the ISBI scores and evaluate.py want)")
    p.add_argument("--prob-path", default="predict_prob/", help="folder for --save-prob")
    p.add_argument("--prob-bits", type=int, choices=[8, 16], default=16, help="PNG depth of probability maps")
    p.add_argument("--overlay-path", help="also write each image with its predicted membranes tinted here")
    p.add_argument("--label-path", help="labels of the test images: errors marked in overlays, plus montage.png")
    p.add_argument("--tile", type=int, default=1024,
                   help="predict larger images in overlapping tiles of this size, blended (0: whole image)")
    p.add_argument("--overlap", type=int, default=128, help="overlap of neighbouring tiles, in pixels")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                   help="average the 8 flips/90-degree rotations of each image (8x the time; --no-tta: once)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda ...")
    return p.parse_args(argv)


def _forward(model, image, device, input_scale):
    height, width = image.shape
    if model.padding == "valid":
        image = mirror_for_valid(image)
    with flow.no_grad():
        logits = model(backend.to_tensor(image[None, None] * input_scale, device))
        return backend.to_numpy(flow.sigmoid(logits))[0, 0, :height, :width]


def _tile_starts(length, tile, stride):
    return list(range(0, length - tile, stride)) + [length - tile]


def _blend_window(height, width, overlap):
    """Tile weights: 1 inside, falling linearly towards the edges over `overlap` pixels."""
    def ramp(n):
        k = min(overlap, n // 2)
        r = np.ones(n, np.float32)
        if k:
            r[:k] = (np.arange(k) + 1) / (k + 1)
            r[n - k:] = r[:k][::-1]
        return r
    return np.outer(ramp(height), ramp(width))


def predict_tiled(model, image, device, input_scale=1.0, tile=1024, overlap=128):
    """Cell probability of an image of any size, `tile` x `tile` pieces at a time (0: whole image).

    Overlapping tiles are blended with weights that fade out at their edges, so seams do not show
    and memory stays bounded by the tile size."""
    height, width = image.shape
    if tile <= 0 or (height <= tile and width <= tile):
        return _forward(model, image, device, input_scale)
    th, tw = min(tile, height), min(tile, width)
    window = _blend_window(th, tw, overlap)
    total = np.zeros(image.shape, np.float32)
    weight = np.zeros(image.shape, np.float32)
    for y in _tile_starts(height, th, tile - overlap):
        for x in _tile_starts(width, tw, tile - overlap):
            total[y:y + th, x:x + tw] += window * _forward(model, image[y:y + th, x:x + tw], device, input_scale)
            weight[y:y + th, x:x + tw] += window
    return total / weight


def predict_probability(model, image, device, input_scale=1.0, tile=1024, overlap=128, tta=False):
    """Cell probability (H x W float32) of a [0, 1] grayscale image; with `tta` the mean over its
    8 flips and 90-degree rotations, each mapped back."""
    if not tta:
        return predict_tiled(model, image, device, input_scale, tile, overlap)
    total = np.zeros(image.shape, np.float32)
    for k in range(4):
        for flip in (False, True):
            view = np.rot90(image, k)[:, ::-1] if flip else np.rot90(image, k)
            prob = predict_tiled(model, np.ascontiguousarray(view), device, input_scale, tile, overlap)
            total += np.rot90(prob[:, ::-1] if flip else prob, -k)
    return total / 8


def predict_folder(checkpoint, image_dir, out_dir, threshold=0.5, device="cpu", prob_dir=None, prob_bits=16,
                   overlay_dir=None, label_dir=None, tile=1024, overlap=128, tta=False):
    """Write `out_dir/<name>.png` masks (0/255) for every image, and the optional pictures and maps.

    Returns the written mask paths."""
    model, meta = build_model(checkpoint, device)
    labels = dict(pair_by_name(image_dir, label_dir)) if label_dir else {}
    written, montage_rows = [], []
    for path in list_images(image_dir):
        name = os.path.splitext(os.path.basename(path))[0] + ".png"
        image = read_image(path)
        prob = predict_probability(model, image, device, meta.get("input_scale", 1.0), tile, overlap, tta)
        pred = prob > threshold
        write_png(os.path.join(out_dir, name), np.where(pred, 255, 0).astype(np.uint8))
        if prob_dir:
            top = 2 ** prob_bits - 1
            write_png(os.path.join(prob_dir, name), np.round(prob * top).astype(np.uint16 if prob_bits == 16 else np.uint8))
        truth = read_label(labels[path]) if labels else None
        if overlay_dir:
            write_png(os.path.join(overlay_dir, name), overlay(image, pred, truth))
        if truth is not None and len(montage_rows) < MONTAGE_ROWS:
            montage_rows.append((image, pred, truth))
        written.append(os.path.join(out_dir, name))
        print(f"{path} -> {written[-1]} (cell {np.mean(pred):.1%})")
    if montage_rows and overlay_dir:
        write_png(os.path.join(overlay_dir, "montage.png"), montage(montage_rows))
    return written


def main(argv=None):
    args = parse_args(argv)
    if args.tile and not 0 <= args.overlap < args.tile:
        sys.exit(f"error: --overlap must be at least 0 and smaller than --tile ({args.tile})")
    try:
        if args.pretrained:
            from fetch_data import fetch_pretrained
            args.checkpoint = fetch_pretrained()
        device = backend.resolve_device(args.device)
        print(f"predicting with {args.checkpoint} on {backend.NAME}/{device}")
        written = predict_folder(args.checkpoint, args.test_data_path, args.save_res_path, args.threshold, device,
                                 args.prob_path if args.save_prob else None, args.prob_bits,
                                 args.overlay_path, args.label_path, args.tile, args.overlap, args.tta)
    except (DataError, CheckpointError, OSError) as err:
        sys.exit(f"error: {err}")
    print(f"{len(written)} masks written to {args.save_res_path}")


if __name__ == "__main__":
    main()
