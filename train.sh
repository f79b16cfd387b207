#!/usr/bin/env bash
# Train the U-Net on ISBI 2012 (sets up .venv and fetches the data on the first run).
#   EPOCHS, BATCH_SIZE      override the preset chosen for this machine
#   DATA_PATH, LABEL_PATH   image and label folders (default train_image, train_label)
#   ISBI_DATA_DIR           local folder with train_image/ train_label/ test_image/ to copy from
#   UNET_BACKEND            oneflow (default) or torch
# Extra arguments go to TrainUnetDataSet.py (see `bash train.sh --help`).
set -euo pipefail
cd "$(dirname "$0")"
source ./setup_env.sh
ensure_env

DATA_PATH=${DATA_PATH:-train_image}
LABEL_PATH=${LABEL_PATH:-train_label}
if [ "$DATA_PATH" = train_image ] && [ "$LABEL_PATH" = train_label ] && ! wants_help "$@"; then
    "$PYTHON" fetch_data.py
fi

exec "$PYTHON" TrainUnetDataSet.py \
    --data-path "$DATA_PATH" \
    --label-path "$LABEL_PATH" \
    ${EPOCHS:+--epochs "$EPOCHS"} \
    ${BATCH_SIZE:+--batch-size "$BATCH_SIZE"} \
    "$@"
