"""train.sh and test.sh honour the variables the README documents."""
import json
import os
import shutil
import subprocess

import cv2
import numpy as np
import pytest

from biounet.model import backend
from conftest import ROOT, tiny_checkpoint, write_dataset

SLOW_CPU_NOTE = "note: OneFlow 0.9 convolves at 6-25 GFLOP/s on one CPU core, PyTorch at 77-190 on two here (BENCHMARKS.md): "


def bash(script, *args, env):
    result = subprocess.run(["bash", os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                            text=True, timeout=600, env={**os.environ, **env})
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_train_sh_then_test_sh_train_and_predict_with_the_documented_variables(dataset, tmp_path):
    out = bash("train.sh", "--base", 4, "--crop", 32, "--checkpoint-dir", tmp_path / "ck", "--log", tmp_path / "log",
               env={"EPOCHS": "2", "BATCH_SIZE": "4", "DATA_PATH": f"{dataset}/train_image",
                    "LABEL_PATH": f"{dataset}/train_label"})
    assert "epochs=2" in out and "batch_size=4" in out and "epoch 2/2 train_loss" in out
    assert sorted(os.listdir(tmp_path / "ck")) == ["best.npz", "last.npz"]
    assert out.count(SLOW_CPU_NOTE + "`UNET_BACKEND=torch bash train.sh` trains 5-7x faster on this machine") == (
        backend.NAME == "oneflow")  # once, and only where OneFlow computes on a CPU

    outputs = {"SAVE_RES_PATH": str(tmp_path / "pred"), "PROB_PATH": str(tmp_path / "prob"),
               "OVERLAY_PATH": str(tmp_path / "overlay")}
    out = bash("test.sh", env={"CHECKPOINT": str(tmp_path / "ck" / "best.npz"), "TEST_DATA_PATH": f"{dataset}/test_image",
                               **outputs})
    assert out.count(SLOW_CPU_NOTE + "`UNET_BACKEND=torch bash test.sh` predicts about 4.5x faster on this "
                                     "machine") == (backend.NAME == "oneflow")
    for folder in ["pred", "prob", "overlay"]:
        assert sorted(os.listdir(tmp_path / folder)) == sorted(os.listdir(f"{dataset}/test_image"))
    mask = cv2.imread(str(tmp_path / "pred" / "0.png"), cv2.IMREAD_UNCHANGED)
    assert set(np.unique(mask)) <= {0, 255}


def test_test_sh_scores_the_predictions_when_test_labels_are_given(dataset, tmp_path):
    out = bash("test.sh", env={"CHECKPOINT": tiny_checkpoint(tmp_path / "net.npz"),
                               "TEST_DATA_PATH": f"{dataset}/train_image", "TEST_LABEL_PATH": f"{dataset}/train_label",
                               "SAVE_RES_PATH": str(tmp_path / "pred"), "PROB_PATH": str(tmp_path / "prob"),
                               "OVERLAY_PATH": str(tmp_path / "overlay"), "SCORES_JSON": str(tmp_path / "s.json")})
    assert "v_rand" in out and out.strip().splitlines()[-1].startswith("mean")
    assert "montage.png" in os.listdir(tmp_path / "overlay")
    errors = [np.mean(cv2.imread(str(tmp_path / "pred" / name), 0) != cv2.imread(f"{dataset}/train_label/{name}", 0))
              for name in sorted(os.listdir(f"{dataset}/train_label"))]
    assert json.load(open(tmp_path / "s.json"))["mean"]["pixel_error"] == pytest.approx(np.mean(errors))


def project_copy(folder):
    """The project's scripts in `folder`, sharing this checkout's environments."""
    os.makedirs(folder)
    for name in os.listdir(ROOT):
        if name.endswith((".py", ".sh", ".txt", ".toml")) and os.path.isfile(os.path.join(ROOT, name)):
            shutil.copy(os.path.join(ROOT, name), folder)
    shutil.copytree(os.path.join(ROOT, "biounet"), os.path.join(folder, "biounet"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    for venv in (".venv", ".venv-torch"):
        if os.path.isdir(os.path.join(ROOT, venv)):
            os.symlink(os.path.join(ROOT, venv), os.path.join(folder, venv))
    return folder


def test_offline_train_sh_trains_on_the_users_images_and_test_sh_names_the_empty_folder(tmp_path):
    project = project_copy(tmp_path / "project")
    write_dataset(project, n_train=4, n_test=0)
    os.makedirs(project / "test_image")
    before = {name: sorted(os.listdir(project / name)) for name in ("train_image", "train_label", "test_image")}
    env = {**os.environ, "ISBI_BASE_URL": "http://127.0.0.1:9/", "EPOCHS": "1",
           "NPROC_PER_NODE": "1"}  # the data's way here; the launched processes are test_parallel's
    trained = subprocess.run(["bash", "train.sh", "--base", "4", "--crop", "32"], cwd=project, env=env,
                             capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert "data: 3 training pairs from ./train_image" in trained.stdout and "SYNTHETIC" not in trained.stderr
    tested = subprocess.run(["bash", "test.sh"], cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert tested.returncode == 1
    assert tested.stderr.strip().splitlines()[-1].startswith(
        "error: test_image/ holds no images and could not download http://127.0.0.1:9/test_image.tar.gz")
    assert {name: sorted(os.listdir(project / name)) for name in before} == before
    assert not os.path.exists(project / "synthetic_isbi")
