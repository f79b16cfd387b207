#!/usr/bin/env bash
# Predict a mask for every image in test_image/ into predict_image/ (same file names), with the
# cell-probability maps in predict_prob/ and pictures to check in predict_overlay/ (several
# classes: class-index masks, and their colour pictures in predict_color/).
#   CHECKPOINT       default checkpoints/best.npz (or the original's OneFlow checkpoint folder);
#                    several, separated by spaces: an ensemble, their probabilities averaged
#   PRETRAINED=1     use the original example's published checkpoint (downloaded once)
#   TEST_DATA_PATH   default test_image/; also a DSB 2018 folder, a VOC root, an nnU-Net or
#                    Cellpose dataset, or a TIFF volume (then TIFF stacks out)
#   SAVE_RES_PATH    default predict_image/
#   INSTANCE_PATH    default predict_instances/: numbered objects (16-bit label PNGs: the cells
#                    between membranes, or touching nuclei split by a watershed) and objects.csv
#   TEST_LABEL_PATH  labels of the test images (DSB and VOC data bring their own): errors marked
#                    in the pictures, and the scores printed and written to SCORES_JSON
#                    (predict_scores.json)
#   UNET_BACKEND     oneflow (default) or torch
# Extra arguments go to predict_unet_test.py (biounet-predict) (see `bash test.sh --help`).
set -euo pipefail
cd "$(dirname "$0")"
source ./setup_env.sh
ensure_env

TEST_DATA_PATH=${TEST_DATA_PATH:-test_image/}
SAVE_RES_PATH=${SAVE_RES_PATH:-predict_image/}
PROB_PATH=${PROB_PATH:-predict_prob/}
OVERLAY_PATH=${OVERLAY_PATH:-predict_overlay/}
TEST_LABEL_PATH=${TEST_LABEL_PATH:-}
if [ "${TEST_DATA_PATH%/}" = test_image ] && ! wants_help "$@"; then
    # Fills test_image/ only when it is empty; prints where the data is (see train.sh).
    TEST_DATA_PATH=$("$PYTHON" -m biounet.commands.fetch --need test_image)/test_image/
fi
if [ "${PRETRAINED:-0}" = 1 ]; then
    set -- --pretrained "$@"
fi
if [ -n "$TEST_LABEL_PATH" ]; then
    set -- --label-path "$TEST_LABEL_PATH" "$@"
fi

read -r -a checkpoints <<< "${CHECKPOINT:-checkpoints/best.npz}"
"$PYTHON" predict_unet_test.py \
    --checkpoint "${checkpoints[@]}" \
    --test-data-path "$TEST_DATA_PATH" \
    --save-res-path "$SAVE_RES_PATH" \
    --save-prob --prob-path "$PROB_PATH" \
    --overlay-path "$OVERLAY_PATH" \
    --instance-path "${INSTANCE_PATH:-predict_instances/}" \
    --scores-json "${SCORES_JSON:-predict_scores.json}" \
    "$@"
