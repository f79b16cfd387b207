"""Data-parallel training through the framework's own launcher: the same weights as one process."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from biounet.model import backend
from biounet.model.checkpoint import load_checkpoint
from conftest import ROOT, train_small, write_dataset

# SGD: Adam turns the float rounding of a summed gradient into whole steps where gradients are ~0.
FLAGS = ["--epochs", 2, "--batch-size", 2, "--val-fraction", 0.34, "--schedule", "constant",
         "--optimizer", "sgd", "--lr", 0.01, "--momentum", 0.9]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(nproc, nnodes=1, node_rank=0, port=None):
    """The launch command's arguments: this backend's launcher (OneFlow's, or torchrun) with these processes."""
    return ["-m", "biounet.commands.launch", "--nproc-per-node", nproc, "--nnodes", nnodes, "--node-rank", node_rank,
            "--master-port", port or free_port()]


def launched(data, out, launch, *extra):
    """The training of train_small, started through `launch` as a process (it does not wait)."""
    command = [sys.executable, *launch, os.path.join(ROOT, "TrainUnetDataSet.py"), "--data-path",
               f"{data}/train_image", "--label-path", f"{data}/train_label", "--checkpoint-dir", f"{out}/checkpoints",
               "--log-file", f"{out}/log.txt", "--progress=", "--base", 4, "--crop", 32, *FLAGS, *extra]
    return subprocess.Popen([str(c) for c in command], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finished(process, status=0):
    out, err = process.communicate(timeout=300)
    assert process.returncode == status, out + err
    return out, err


def assert_same_weights(a, b):
    first, second = (load_checkpoint(f"{run}/checkpoints/last.npz")[1] for run in (a, b))
    for name in first:
        np.testing.assert_allclose(second[name], first[name], atol=1e-5, err_msg=name)


def calibrated_thresholds(run):
    return [load_checkpoint(f"{run}/checkpoints/{name}")[0]["calibrated_threshold"] for name in ("best.npz", "last.npz")]


@pytest.fixture
def data(tmp_path):
    return write_dataset(tmp_path / "data", n_train=6, n_test=0)  # 4 to train on, 2 to validate


def test_two_processes_train_the_weights_of_one_process_with_the_same_global_batch(data, tmp_path):
    train_small(data, tmp_path / "alone", *FLAGS)
    out, _ = finished(launched(data, tmp_path / "two", launcher(2)))
    assert "data parallel: 2 processes, each 1 of the 2 images of a step, learning rate 0.01" in out
    assert_same_weights(tmp_path / "alone", tmp_path / "two")
    log = (tmp_path / "two" / "log.txt").read_text()
    assert len([line for line in log.splitlines() if line.startswith("epoch ")]) == 2  # rank 0 alone logs
    alone, two = ([json.loads(line) for line in open(run / "log.jsonl")][-1] for run in (tmp_path / "alone", tmp_path / "two"))
    for score in ("train_loss", "val_loss", "val_pixel_error", "val_dice", "val_v_rand"):  # validation shared out
        assert two[score] == pytest.approx(alone[score], abs=1e-4), score
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["best.npz", "last.npz"]
    assert calibrated_thresholds(tmp_path / "two") == calibrated_thresholds(tmp_path / "alone")  # the sweep shared out


def test_a_launched_run_calibrating_slices_of_isbi_size_ends_with_every_process_and_calibrated_checkpoints(tmp_path):
    # Rank 0 calibrating alone for seconds while rank 1 had left made OneFlow abort rank 0 ("Machine 1 lost").
    data = write_dataset(tmp_path / "data", n_train=2, n_test=0, size=512)
    out, _ = finished(launched(data, tmp_path / "two", launcher(2), "--base", 16, "--crop", 64, "--optimizer", "adam",
                               "--lr", 1e-3))
    assert out.count("calibrated ") == 2 and "checkpoints: " in out
    assert all(0 < t < 1 for t in calibrated_thresholds(tmp_path / "two"))


@pytest.mark.skipif(backend.NAME == "oneflow", reason="OneFlow 0.9 runs one node per machine: refused (test below)")
def test_two_machines_on_one_host_train_together(data, tmp_path):
    port = free_port()
    nodes = [launched(data, tmp_path / "nodes", launcher(1, nnodes=2, node_rank=rank, port=port)) for rank in (0, 1)]
    outputs = [finished(node)[0] for node in nodes]
    assert "data parallel: 2 processes" in outputs[0] and "epoch 2/2" in outputs[0]
    assert outputs[1] == ""  # the second machine's process speaks through rank 0
    train_small(data, tmp_path / "alone", *FLAGS)
    assert_same_weights(tmp_path / "alone", tmp_path / "nodes")


@pytest.mark.skipif(backend.NAME != "oneflow", reason="PyTorch runs two nodes on one machine (test above)")
def test_on_oneflow_a_second_node_on_the_first_ones_machine_is_refused_at_once_with_one_line(data, tmp_path):
    node = launched(data, tmp_path / "nodes", launcher(1, nnodes=2, node_rank=1))
    _, err = finished(node, status=2)
    assert err.strip().splitlines()[-1] == ("error: --master-addr 127.0.0.1 is this machine: OneFlow 0.9 runs one "
                                            "node per machine; on one machine use --nproc-per-node (NPROC_PER_NODE) "
                                            "for its processes (see --help)")


def test_an_error_in_a_launched_run_stops_every_process_with_one_line_and_no_launcher_traceback(data, tmp_path):
    out, err = finished(launched(data, tmp_path / "two", launcher(2), "--batch-size", 3), status=1)
    assert err.count("error: --batch-size 3: the batch of a step is shared equally by the 2 processes") == 1
    assert "Traceback" not in err and not os.path.exists(tmp_path / "two" / "checkpoints" / "last.npz")


def test_a_process_killed_midway_stops_the_whole_run_and_leaves_whole_checkpoints(data, tmp_path):
    run = launched(data, tmp_path / "two", launcher(2), "--epochs", 500)
    log = tmp_path / "two" / "log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and '"epoch": 1,' in log.read_text()):
        assert time.time() < deadline and run.poll() is None, run.stderr.read() if run.poll() is not None else ""
        time.sleep(0.2)
    processes = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(run.pid)], capture_output=True,
                                                      text=True).stdout.split()]
    assert len(processes) == 2
    os.kill(processes[-1], signal.SIGKILL)
    run.communicate(timeout=120)
    assert run.returncode != 0
    assert not [pid for pid in processes if os.path.exists(f"/proc/{pid}") and
                open(f"/proc/{pid}/stat").read().split()[2] != "Z"]  # none left waiting for its peer
    assert load_checkpoint(str(tmp_path / "two" / "checkpoints" / "last.npz"))[0]["epoch"] >= 1


def test_more_processes_than_gpus_stop_before_training_with_a_line_saying_how_many(monkeypatch):
    monkeypatch.setattr(backend.flow.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SystemExit, match=r"^error: 2 data-parallel processes on this machine need a GPU each, "
                                         r"and it has 1: set NPROC_PER_NODE=1 \(or --device cpu\)$"):
        backend.local_device("cuda")
    monkeypatch.setattr(backend.flow.cuda, "device_count", lambda: 2)
    assert backend.local_device("cuda") == "cuda:0"
