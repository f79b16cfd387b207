"""Shared fixtures: small synthetic EM-like data written by the tests themselves."""
import contextlib
import io
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from files import write_png  # noqa: E402
from fetch_data import synthetic_em_slice  # noqa: E402


def write_dataset(folder, n_train=4, n_test=2, size=64, seed=0):
    """train_image/, train_label/, test_image/ with `size`x`size` synthetic slices."""
    rng = np.random.default_rng(seed)
    for i in range(n_train):
        image, label = synthetic_em_slice(size, rng, cell_size=16)
        write_png(os.path.join(folder, "train_image", f"{i}.png"), image)
        write_png(os.path.join(folder, "train_label", f"{i}.png"), label)
    for i in range(n_test):
        write_png(os.path.join(folder, "test_image", f"{i}.png"), synthetic_em_slice(size, rng, 16)[0])
    return folder


@pytest.fixture
def dataset(tmp_path):
    return str(write_dataset(tmp_path / "data"))


def run_script(script, *args, cwd, env=None, check=True):
    """Run one of the project's scripts with this interpreter; returns the CompletedProcess."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd,
                            env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def train_in_process(*args, check=True):
    """`python TrainUnetDataSet.py ARGS` run inside this process, which spares the interpreter's and
    the framework's start-up (seconds each on PyTorch); returns a CompletedProcess as run_script does."""
    import TrainUnetDataSet
    args = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            TrainUnetDataSet.main(args)
            status = 0
        except SystemExit as stop:
            status = stop.code if isinstance(stop.code, int) or stop.code is None else 1
            if isinstance(stop.code, str):
                print(stop.code, file=sys.stderr)
    result = subprocess.CompletedProcess(args, status or 0, out.getvalue(), err.getvalue())
    if check and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def train_small(data, out, *extra, check=True):
    """A few quick epochs of a tiny U-Net on `data`, checkpoints and log under `out`."""
    return train_in_process("--data-path", f"{data}/train_image", "--label-path", f"{data}/train_label",
                            "--checkpoint-dir", f"{out}/checkpoints", "--log", f"{out}/log.txt", "--base", 4,
                            "--crop", 32, "--epochs", 2, *extra, check=check)
