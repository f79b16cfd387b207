"""Mixed precision (--amp): bf16 trains and predicts where the framework has it (PyTorch on a CPU here;
CUDA on both frameworks), and where it has not the flag stops with one line before anything is written."""
import json
import os

import cv2
import numpy as np

from biounet.model import backend
from conftest import run_script, tiny_checkpoint, train_small

BF16_ON_CPU = backend.NAME == "torch"


def predict_probabilities(dataset, checkpoint, out, *extra):
    result = run_script("predict_unet_test.py", "--checkpoint", checkpoint, "--test-data-path", f"{dataset}/test_image",
                        "--save-res-path", out / "masks", "--save-prob", "--prob-path", out / "prob", "--no-tta",
                        *extra, cwd=out, check=False)
    if result.returncode:
        return result, None
    return result, [cv2.imread(str(out / "prob" / name), cv2.IMREAD_UNCHANGED) / 65535
                    for name in sorted(os.listdir(out / "prob"))]


def test_bf16_prediction_matches_float32_to_within_bf16_rounding(dataset, tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "tiny.npz")
    _, full = predict_probabilities(dataset, checkpoint, tmp_path)
    (tmp_path / "amp").mkdir()
    result, half = predict_probabilities(dataset, checkpoint, tmp_path / "amp", "--amp", "bf16")
    if not BF16_ON_CPU:
        assert result.returncode == 1
        assert result.stderr.strip() == "error: --amp: OneFlow 0.9 has no mixed precision on a CPU (it stays float32); leave --amp off"
        assert not os.path.exists(tmp_path / "amp" / "masks")
        return
    assert result.returncode == 0, result.stderr
    for a, b in zip(full, half):
        assert a.shape == b.shape
        assert 0 < np.max(np.abs(a - b)) < 0.02  # computed in bf16 (not silently float32), close to it


def test_bf16_training_learns_like_float32(dataset, tmp_path):
    result = train_small(dataset, tmp_path, "--amp", "bf16", "--epochs", "3", "--lr", "3e-3", check=False)
    if not BF16_ON_CPU:
        assert result.returncode == 1
        assert result.stderr.strip().splitlines()[-1].startswith("error: --amp: OneFlow 0.9 has no mixed precision")
        assert not os.path.exists(tmp_path / "checkpoints" / "last.npz")
        return
    assert result.returncode == 0, result.stderr
    epochs = [json.loads(line) for line in open(tmp_path / "log.jsonl") if '"epoch"' in line]
    losses = [e["train_loss"] for e in epochs]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_fp16_without_a_gpu_stops_with_one_line_naming_the_flag(dataset, tmp_path):
    result = train_small(dataset, tmp_path, "--amp", "fp16", check=False)
    assert result.returncode == 1
    assert "--amp" in result.stderr.strip().splitlines()[-1] and "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "checkpoints" / "last.npz")
