#!/usr/bin/env bash
# Train the U-Net on ISBI 2012 (sets up .venv and fetches the data on the first run), or on
# your own data in any layout datasets.py reads.
#   EPOCHS, BATCH_SIZE      override the preset chosen for this machine
#   DATA_PATH               image folder (default train_image), a DSB 2018 stage1_train folder,
#                           a VOC root, an nnU-Net or Cellpose dataset, a TIFF volume (train-volume.tif),
#                           or a zarr / OME-Zarr store (read window by window, never whole)
#   LABEL_PATH              label folder (default train_label), TIFF or zarr store (default for an
#                           OME-Zarr image: its NGFF labels/ group)
#   CLASSES, IMG_SIZE       classes (1: binary; N: softmax over 0..N-1), resize to IMG_SIZE squares
#   ISBI_DATA_DIR           local folder with train_image/ train_label/ test_image/ to copy from
#   UNET_BACKEND            oneflow (default) or torch
#   NPROC_PER_NODE          data-parallel processes on this machine (default: one per core with
#                           OneFlow on a CPU, else 1), through OneFlow's launcher or torchrun
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   the same over several machines (run train.sh on
#                           each, NODE_RANK 0..NNODES-1, MASTER_ADDR the address of node 0)
# Extra arguments go to TrainUnetDataSet.py (biounet-train) (see `bash train.sh --help`).
set -euo pipefail
cd "$(dirname "$0")"
source ./setup_env.sh
ensure_env

DATA_PATH=${DATA_PATH:-train_image}
LABEL_PATH=${LABEL_PATH:-}
if [ "${DATA_PATH%/}" = train_image ] && [ -z "$LABEL_PATH" ] && ! wants_help "$@"; then
    # Fills empty folders only; prints where the data is (synthetic_isbi when all were empty, offline).
    DATA_ROOT=$("$PYTHON" -m biounet.commands.fetch --need train_image train_label)
    DATA_PATH=$DATA_ROOT/train_image LABEL_PATH=$DATA_ROOT/train_label
fi

NNODES=${NNODES:-1}
if [ -z "${NPROC_PER_NODE:-}" ] && ! wants_help "$@"; then
    NPROC_PER_NODE=$("$PYTHON" -c 'from biounet.model import backend; print(backend.default_processes())' 2>/dev/null)
fi
LAUNCH=()
if [ "${NPROC_PER_NODE:-1}" -gt 1 ] || [ "$NNODES" -gt 1 ]; then
    echo "train.sh: $NPROC_PER_NODE data-parallel process(es) on this machine, $NNODES machine(s) (NPROC_PER_NODE=1 for one)"
    LAUNCH=(-m biounet.commands.launch --nproc-per-node "$NPROC_PER_NODE" --nnodes "$NNODES" --node-rank "${NODE_RANK:-0}"
            --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}")
fi

exec "$PYTHON" "${LAUNCH[@]}" TrainUnetDataSet.py \
    --data-path "$DATA_PATH" \
    ${LABEL_PATH:+--label-path "$LABEL_PATH"} \
    ${CLASSES:+--classes "$CLASSES"} \
    ${IMG_SIZE:+--img-size "$IMG_SIZE"} \
    ${EPOCHS:+--epochs "$EPOCHS"} \
    ${BATCH_SIZE:+--batch-size "$BATCH_SIZE"} \
    "$@"
