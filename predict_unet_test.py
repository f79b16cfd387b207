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
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda ...")
    return p.parse_args(argv)


def predict_probability(model, image, device, input_scale=1.0):
    """Cell probability (H x W float32) for a [0, 1] grayscale image."""
    with flow.no_grad():
        logits = model(backend.to_tensor(image[None, None] * input_scale, device))
        return backend.to_numpy(flow.sigmoid(logits))[0, 0]


def predict_folder(checkpoint, image_dir, out_dir, threshold=0.5, device="cpu", prob_dir=None, prob_bits=16,
                   overlay_dir=None, label_dir=None):
    """Write `out_dir/<name>.png` masks (0/255) for every image, and the optional pictures and maps.

    Returns the written mask paths."""
    model, meta = build_model(checkpoint, device)
    labels = dict(pair_by_name(image_dir, label_dir)) if label_dir else {}
    written, montage_rows = [], []
    for path in list_images(image_dir):
        name = os.path.splitext(os.path.basename(path))[0] + ".png"
        image = read_image(path)
        prob = predict_probability(model, image, device, meta.get("input_scale", 1.0))
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
    try:
        if args.pretrained:
            from fetch_data import fetch_pretrained
            args.checkpoint = fetch_pretrained()
        device = backend.resolve_device(args.device)
        print(f"predicting with {args.checkpoint} on {backend.NAME}/{device}")
        written = predict_folder(args.checkpoint, args.test_data_path, args.save_res_path, args.threshold, device,
                                 args.prob_path if args.save_prob else None, args.prob_bits,
                                 args.overlay_path, args.label_path)
    except (DataError, CheckpointError, OSError) as err:
        sys.exit(f"error: {err}")
    print(f"{len(written)} masks written to {args.save_res_path}")


if __name__ == "__main__":
    main()
