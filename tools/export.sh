#!/usr/bin/env bash
# Export a trained checkpoint for Fiji, napari, ilastik, QuPath ... (biounet-export), with the PyTorch
# environment whatever UNET_BACKEND says (the same weights; OneFlow has no ONNX exporter here):
#   bash tools/export.sh checkpoints/best.npz --onnx unet.onnx
#   bash tools/export.sh checkpoints/best.npz --bioimageio unet_bioimageio/ --sample test_image/0.png
set -euo pipefail
cd "$(dirname "$0")/.."
source ./setup_env.sh
export UNET_BACKEND=torch
ensure_env
"$PYTHON" -m biounet.commands.export "$@"
