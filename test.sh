#!/usr/bin/env bash
# Predict a mask for every image in test_image/ into predict_image/ (same file names).
#   CHECKPOINT       default checkpoints/best.npz (or the original's OneFlow checkpoint folder)
#   PRETRAINED=1     use the original example's published checkpoint (downloaded once)
#   TEST_DATA_PATH   default test_image/
#   SAVE_RES_PATH    default predict_image/
#   UNET_BACKEND     oneflow (default) or torch
# Extra arguments go to predict_unet_test.py (see `bash test.sh --help`).
set -euo pipefail
cd "$(dirname "$0")"
source ./setup_env.sh
ensure_env

TEST_DATA_PATH=${TEST_DATA_PATH:-test_image/}
SAVE_RES_PATH=${SAVE_RES_PATH:-predict_image/}
if [ "${TEST_DATA_PATH%/}" = test_image ] && ! wants_help "$@"; then
    "$PYTHON" fetch_data.py
fi
if [ "${PRETRAINED:-0}" = 1 ]; then
    set -- --pretrained "$@"
fi

exec "$PYTHON" predict_unet_test.py \
    --checkpoint "${CHECKPOINT:-checkpoints/best.npz}" \
    --test-data-path "$TEST_DATA_PATH" \
    --save-res-path "$SAVE_RES_PATH" \
    "$@"
