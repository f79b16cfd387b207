import os
import subprocess
import sys

import pytest

from conftest import ROOT, run_script, train_small
from plot import read_log


def test_plot_draws_the_curves_of_a_training_log_into_a_png(dataset, tmp_path):
    train_small(dataset, tmp_path, "--epochs", 3)
    curves = read_log(str(tmp_path / "log.txt"))
    assert set(curves) == {"train_loss", "val_loss", "val_pixel_error", "val_dice", "val_v_rand"}
    assert all(len(values) == 3 for values in curves.values())
    run_script("plot.py", tmp_path / "log.txt", "--out", tmp_path / "curves.png", cwd=tmp_path)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_reads_the_original_examples_one_loss_per_line_log(tmp_path):
    (tmp_path / "Unet_train.txt").write_text("0.6931\n0.5012\n0.4127\n")
    assert read_log(str(tmp_path / "Unet_train.txt")) == {"train_loss": [0.6931, 0.5012, 0.4127]}
    run_script("plot.py", cwd=tmp_path)
    assert (tmp_path / "training_curves.png").exists()


def test_plot_of_a_log_without_losses_says_so(tmp_path):
    (tmp_path / "log.txt").write_text("preset cpu\n")
    result = run_script("plot.py", "log.txt", cwd=tmp_path, check=False)
    assert result.returncode != 0 and "log.txt: no training losses found" in result.stderr


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, ".venv", "bin", "python")),
                    reason="needs the project's .venv, made by train.sh or run_tests.sh")
def test_plot_runs_with_a_python_that_lacks_matplotlib_by_rerunning_in_the_venv(tmp_path):
    (tmp_path / "Unet_train.txt").write_text("0.5\n0.4\n")
    bare = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")])
    assert bare.returncode == 0
    result = subprocess.run([str(tmp_path / "bare" / "bin" / "python"), os.path.join(ROOT, "plot.py")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "training_curves.png").exists()


def test_plot_draws_the_last_run_of_an_appended_log_with_what_resumed_it(tmp_path):
    (tmp_path / "log.txt").write_text(
        "== 2026-01-01 10:00:00 run: TrainUnetDataSet.py\n"
        "epoch 1/3 train_loss 0.9 time 1.0s\nepoch 2/3 train_loss 0.8 time 1.0s\nepoch 3/3 train_loss 0.7 time 1.0s\n"
        "== 2026-01-02 10:00:00 run: TrainUnetDataSet.py --lr 0.01\n"
        "epoch 1/3 train_loss 0.5 time 1.0s\nstopped by SIGTERM in epoch 2, after step 1 of 6\n"
        "== 2026-01-02 11:00:00 resumed: TrainUnetDataSet.py --lr 0.01 --resume\n"
        "epoch 2/3 train_loss 0.4 time 1.0s\nepoch 3/3 train_loss 0.3 time 1.0s\nerror: something after the last epoch\n")
    assert read_log(str(tmp_path / "log.txt")) == {"train_loss": [0.5, 0.4, 0.3]}
