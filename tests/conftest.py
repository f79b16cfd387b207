"""Shared fixtures: small synthetic EM-like data written by the tests themselves."""
import contextlib
import importlib
import importlib.util
import io
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from biounet.core.files import write_png  # noqa: E402
from biounet.data.fetch import synthetic_em_slice  # noqa: E402
from biounet.model import backend  # noqa: E402
from biounet.model.checkpoint import save_checkpoint  # noqa: E402
from biounet.model.unet import UNet  # noqa: E402


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
    """`python SCRIPT ARGS` (a file of the project, e.g. TrainUnetDataSet.py or benchmarks/bench.py) or
    a console script (`biounet-evaluate ARGS`) in `cwd`; returns a CompletedProcess. It runs inside
    this process, through the program's main(argv), which spares the interpreter's and the framework's
    start-up (seconds each on PyTorch); with `env` (variables to add) it runs as a real process."""
    if env is not None:
        command = [os.path.join(ROOT, script)] if script.endswith(".py") else ["-m", command_module(script)]
        result = subprocess.run([sys.executable, *command, *map(str, args)], cwd=cwd,
                                env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    else:
        result = _run_in_process(script, [str(a) for a in args], cwd)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def command_module(name):
    """The module of a console script: biounet-evaluate -> biounet.commands.evaluate."""
    return "biounet.commands." + name[len("biounet-"):]


def _main_of(script):
    if not script.endswith(".py"):
        return importlib.import_module(command_module(script)).main
    spec = importlib.util.spec_from_file_location(os.path.basename(script)[:-3], os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _run_in_process(script, args, cwd):
    main = _main_of(script)
    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(args)
                status = 0
            except SystemExit as stop:
                status = stop.code if isinstance(stop.code, int) or stop.code is None else 1
                if isinstance(stop.code, str):
                    print(stop.code, file=sys.stderr)
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess([script, *args], status or 0, out.getvalue(), err.getvalue())


def train_small(data, out, *extra, check=True):
    """A few quick epochs of a tiny U-Net on `data`, checkpoints and logs under `out`."""
    os.makedirs(out, exist_ok=True)
    return run_script("TrainUnetDataSet.py", "--data-path", f"{data}/train_image", "--label-path",
                      f"{data}/train_label", "--checkpoint-dir", f"{out}/checkpoints", "--log-file", f"{out}/log.txt",
                      "--progress", "", "--base", 4, "--crop", 32, "--epochs", 2, *extra, cwd=out, check=check)


def tiny_checkpoint(path, seed=0, data=None, **model):
    """A checkpoint of an untrained U-Net (base 4 unless `model` says otherwise), written directly:
    what a prediction test needs, without training one."""
    backend.seed_everything(seed)
    save_checkpoint(str(path), UNet(**{"base": 4, "norm": "instance", **model}), data=data or {})
    return str(path)
