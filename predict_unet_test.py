"""Predict a cell mask for every image in a folder, one PNG per input with the input's name.

    python predict_unet_test.py                                   # checkpoints/best.npz, test_image/
    python predict_unet_test.py --checkpoint pretrained/checkpoints --test-data-path my_images/
    python predict_unet_test.py --pretrained                      # the original example's weights

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
from dataloader import DataError, list_images, read_image, write_png


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
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda ...")
    return p.parse_args(argv)


def predict_probability(model, image, device, input_scale=1.0):
    """Cell probability (H x W float32) for a [0, 1] grayscale image."""
    with flow.no_grad():
        logits = model(backend.to_tensor(image[None, None] * input_scale, device))
        return backend.to_numpy(flow.sigmoid(logits))[0, 0]


def predict_folder(checkpoint, image_dir, out_dir, threshold=0.5, device="cpu"):
    """Write `out_dir/<name>.png` masks (0/255) for every image; returns the written paths."""
    model, meta = build_model(checkpoint, device)
    paths = list_images(image_dir)
    written = []
    for path in paths:
        prob = predict_probability(model, read_image(path), device, meta.get("input_scale", 1.0))
        mask = np.where(prob > threshold, 255, 0).astype(np.uint8)
        out = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ".png")
        write_png(out, mask)
        written.append(out)
        print(f"{path} -> {out} (cell {np.mean(mask > 0):.1%})")
    return written


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.pretrained:
            from fetch_data import fetch_pretrained
            args.checkpoint = fetch_pretrained()
        device = backend.resolve_device(args.device)
        print(f"predicting with {args.checkpoint} on {backend.NAME}/{device}")
        written = predict_folder(args.checkpoint, args.test_data_path, args.save_res_path, args.threshold, device)
    except (DataError, CheckpointError, OSError) as err:
        sys.exit(f"error: {err}")
    print(f"{len(written)} masks written to {args.save_res_path}")


if __name__ == "__main__":
    main()
