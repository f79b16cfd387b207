"""Export a trained checkpoint to the tools biologists use: ONNX, and a bioimage.io model package
(which deepImageJ, ilastik, napari and QuPath open). Runs on the PyTorch backend: the same weights.

    bash export.sh checkpoints/best.npz --onnx unet.onnx
    bash export.sh checkpoints/best.npz --bioimageio unet_bioimageio/ --sample test_image/0.png

The exported network takes normalized images (1 x C x H x W float32, any height and width of at
least its smallest side) and gives probabilities (sigmoid for one class, softmax over several).
The bioimage.io package says how to normalize (the checkpoint's --normalize as its preprocessing),
and holds ONNX and TorchScript weights, a test input and output, a cover picture and a README.
Every export is checked: the ONNX file with onnxruntime, the TorchScript file with PyTorch, against
the project's own prediction of the sample, to 1e-4 (EXPORT_TOLERANCE).
"""
import os
import sys
import warnings

from biounet.core.cli import ArgumentParser, file_to_write
from biounet.core.files import DataError
from biounet.export.formats import export
from biounet.model import backend
from biounet.model.checkpoint import CheckpointError


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("checkpoint", help="our .npz checkpoint (or the original example's OneFlow folder)")
    p.add_argument("--onnx", type=file_to_write, help="write the network as an ONNX file here")
    p.add_argument("--bioimageio", help="write a bioimage.io model package into this new folder")
    p.add_argument("--sample", help="an image like those trained on: the test input and the cover "
                                    "(default: a random image)")
    p.add_argument("--name", help="the model's name (default: from the checkpoint's data)")
    p.add_argument("--author", default=os.environ.get("USER") or "unknown", help="the package's author")
    p.add_argument("--license", default="MIT", help="the package's license (SPDX identifier)")
    args = p.parse_args(argv)
    if not args.onnx and not args.bioimageio:
        p.error("nothing to do: give --onnx FILE and/or --bioimageio FOLDER")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        backend.set_threads(backend.cores())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracing's notes on shapes and the exporter's on itself: check_export decides
            export(args)
    except (CheckpointError, DataError, OSError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
