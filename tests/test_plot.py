import json
import os
import subprocess
import sys

import pytest

from biounet.core.curves import read_log
from conftest import ROOT, run_script


def write_json_log(path, *records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def epoch(n, **scores):
    return dict(epoch=n, epochs=3, **scores, lr=0.001, time=1.5, best=False)


def test_plot_draws_every_curve_of_the_json_log_beside_the_training_log_into_a_png(tmp_path):
    (tmp_path / "log.txt").write_text("epoch 1/3 train_loss 9.0\n")  # the human-readable log is not parsed
    write_json_log(tmp_path / "log.jsonl", dict(event="run", config={}),
                   *[epoch(n, train_loss=1 / n, val_loss=1.1 / n, val_dice=0.5 + n / 10) for n in (1, 2, 3)])
    curves = read_log(str(tmp_path / "log.txt"))
    assert curves == {"train_loss": [1.0, 0.5, 1 / 3], "val_loss": [1.1, 0.55, 1.1 / 3],
                      "val_dice": [0.6, 0.7, 0.8], "lr": [0.001] * 3}
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
    write_json_log(tmp_path / "log.jsonl", dict(event="run"), *[epoch(n, train_loss=1 - n / 10) for n in (1, 2, 3)],
                   dict(event="run"), epoch(1, train_loss=0.5), epoch(2, train_loss=0.45),
                   dict(event="resumed"), epoch(2, train_loss=0.4), epoch(3, train_loss=0.3))
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"epoch": 4, "train_lo')  # cut short by a killed run
    assert read_log(str(tmp_path / "log.jsonl"))["train_loss"] == [0.5, 0.4, 0.3]


def test_epochs_validated_every_few_epochs_leave_gaps_in_their_curves(tmp_path):
    write_json_log(tmp_path / "log.jsonl", {"event": "run"}, {"epoch": 1, "train_loss": 0.5},
                   {"epoch": 2, "train_loss": 0.4, "val_dice": 0.7}, {"epoch": 3, "train_loss": 0.3},
                   {"epoch": 4, "train_loss": 0.2, "val_dice": 0.8})
    assert read_log(str(tmp_path / "log.jsonl")) == {"train_loss": [0.5, 0.4, 0.3, 0.2],
                                                    "val_dice": [None, 0.7, None, 0.8]}
    run_script("plot.py", tmp_path / "log.jsonl", "--out", tmp_path / "curves.png", cwd=tmp_path)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
