"""The fault catalogue of RELIABILITY.md: bad flags, diverging runs, crashes, full disks, crafted
checkpoints, runs that meet earlier runs. Whatever goes wrong ends in one line naming the file or
flag, and nothing already written is lost."""
import errno
import fcntl
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from biounet.commands import predict as predict_command
from biounet.core.files import atomic_write
from biounet.data import loader as dataloader
from biounet.model import backend
from biounet.model.checkpoint import CheckpointError, build_model, load_checkpoint, save_checkpoint
from biounet.model.unet import UNet
from biounet.prediction.inference import predict_sample
from biounet.prediction.predict import predict_dataset
from biounet.training import flags as training_flags
from conftest import ROOT, train_small, write_dataset


def last_line(result):
    return result.stderr.strip().splitlines()[-1]


# ---- flags -----------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "argument --epochs: 0 is out of range (must be >= 1)"),
    (["--batch-size", "-2"], "argument --batch-size/--batch_size: -2 is out of range (must be >= 1)"),
    (["--batch-size", "0"], "argument --batch-size/--batch_size: 0 is out of range (must be >= 1)"),
    (["--crop", "7"], "argument --crop: 7 is out of range (must be 0 or >= 32)"),
    (["--crop", "-5"], "argument --crop: -5 is out of range (must be 0 or >= 32)"),
    (["--lr", "nan"], "argument --lr: nan is out of range (must be >= 0)"),
    (["--lr", "fast"], "argument --lr: 'fast' is not a number"),
    (["--val-fraction", "1"], "argument --val-fraction: 1 is out of range (must be >= 0 and < 1)"),
    (["--classes", "0"], "argument --classes: 0 is out of range (must be >= 1 and <= 255)"),
    (["--aug-flip", "1.5"], "argument --aug-flip: 1.5 is out of range (must be >= 0 and <= 1)"),
    (["--dropout", "1"], "argument --dropout: 1 is out of range (must be >= 0 and < 1)"),
    (["--img-size", "8"], "argument --img-size: 8 is out of range (must be 0 or >= 32)"),
    (["--patience", "-1"], "argument --patience: -1 is out of range (must be >= 0)"),
    (["--sigma", "0"], "argument --sigma: 0 is out of range (must be >= 0.1)"),
])
def test_a_training_flag_out_of_range_stops_at_parse_time_with_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        training_flags.parse_args(flags)
    assert stopped.value.code == 2
    assert capsys.readouterr().err == f"error: {message} (see --help)\n"


@pytest.mark.parametrize("flags, message", [
    (["--threshold", "2"], "argument --threshold: 2 is out of range (must be >= 0 and <= 1)"),
    (["--tile", "10"], "argument --tile: 10 is out of range (must be 0 or >= 32)"),
    (["--overlap", "-1"], "argument --overlap: -1 is out of range (must be >= 0)"),
])
def test_a_prediction_flag_out_of_range_stops_at_parse_time_with_one_line(flags, message, capsys):
    with pytest.raises(SystemExit):
        predict_command.parse_args(flags)
    assert capsys.readouterr().err == f"error: {message} (see --help)\n"


@pytest.mark.parametrize("script, flags, message", [
    ("predict", ["--save-res-path", "notes.txt"], "argument --save-res-path/--save_res_path: notes.txt is a file, not "
                                                  "a folder to write into"),
    ("predict", ["--instance-path", "notes.txt/objects"], "argument --instance-path: notes.txt/objects cannot be made: "
                                                          "{here}/notes.txt is a file, not a folder"),
    ("predict", ["--scores-json", "out"], "argument --scores-json: out is a folder, not a file to write"),
    ("predict", ["--label-path", "nowhere"], "argument --label-path: nowhere: no such file or folder"),
    ("train", ["--checkpoint-dir", "notes.txt"], "argument --checkpoint-dir: notes.txt is a file, not a folder to "
                                                 "write into"),
    ("train", ["--log", "notes.txt/log.txt"], "argument --log-file/--log: notes.txt/log.txt cannot be written: "
                                              "{here}/notes.txt is a file, not a folder"),
    ("train", ["--progress", "out"], "argument --progress: out is a folder, not a file to write"),
])
def test_paths_a_user_gives_are_checked_for_what_they_must_be_when_parsed(script, flags, message, tmp_path, capsys,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit) as stopped:
        (predict_command if script == "predict" else training_flags).parse_args(flags)
    assert stopped.value.code == 2
    assert capsys.readouterr().err == f"error: {message.format(here=tmp_path)} (see --help)\n"
    assert (tmp_path / "notes.txt").read_text() == "mine" and os.listdir(tmp_path / "out") == []


def test_a_file_given_where_a_folder_of_labels_is_read_is_named_as_a_file(dataset, tmp_path):
    result = train_small(dataset, tmp_path, "--label-path", f"{dataset}/train_label/0.png", check=False)
    assert last_line(result) == f"error: {dataset}/train_label/0.png: a file, not a folder of images"


# ---- training runs meeting earlier runs --------------------------------------------------------

def test_runs_into_one_folder_keep_the_previous_checkpoints_append_to_the_log_and_clear_stale_temporaries(
        dataset, tmp_path):
    train_small(dataset, tmp_path, "--epochs", 1)
    checkpoints = tmp_path / "checkpoints"
    first = {name: (checkpoints / name).read_bytes() for name in ("best.npz", "last.npz")}
    (checkpoints / ".tmp-abc123-last.npz").write_bytes(b"half written by a killed run")
    log_before = (tmp_path / "log.txt").read_text()

    result = train_small(dataset, tmp_path, "--epochs", 1, "--seed", 1)
    kept = [name for name in os.listdir(checkpoints) if name.startswith("previous-")]
    assert len(kept) == 1 and f"kept the previous run's best.npz and last.npz in {checkpoints}/{kept[0]}/" in result.stdout
    assert {name: (checkpoints / kept[0] / name).read_bytes() for name in first} == first
    assert sorted(os.listdir(checkpoints)) == ["best.npz", "last.npz", kept[0]]  # the temporary is gone

    os.remove(f"{dataset}/train_label/1.png")
    failed = train_small(dataset, tmp_path, "--epochs", 1, check=False)
    assert failed.returncode == 1 and last_line(failed).startswith("error: ")
    log = (tmp_path / "log.txt").read_text()
    assert log.startswith(log_before)
    assert [line.split()[3] for line in log.splitlines() if line.startswith("== ")] == ["run:"] * 3
    assert log.rstrip().endswith(last_line(failed))
    assert len([n for n in os.listdir(checkpoints) if n.startswith("previous-")]) == 1  # a failed run moves nothing


def test_a_second_run_into_a_folder_in_use_stops_and_touches_nothing(dataset, tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    held = os.open(folder, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # as a running training run holds it
    try:
        result = train_small(dataset, tmp_path, check=False)
    finally:
        os.close(held)
    assert result.returncode == 1
    assert last_line(result) == f"error: {folder}: another training run is writing there; wait for it to end, " \
                                f"or give this one another --checkpoint-dir"
    assert os.listdir(folder) == []


# ---- a diverging run ---------------------------------------------------------------------------

def test_a_diverging_run_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(dataset, tmp_path):
    train_small(dataset, tmp_path, "--epochs", 1, "--optimizer", "sgd", "--lr", 0.01)
    good = {name: (tmp_path / "checkpoints" / name).read_bytes() for name in ("best.npz", "last.npz")}
    result = train_small(dataset, tmp_path, "--epochs", 3, "--resume", "--optimizer", "sgd", "--lr", 1e30,
                         check=False)
    assert result.returncode == 1, result.stdout
    assert "training diverged; try a lower --lr than 1e+30" in last_line(result)
    assert {name: (tmp_path / "checkpoints" / name).read_bytes() for name in good} == good
    done = train_small(dataset, tmp_path, "--epochs", 1, "--resume", "--optimizer", "sgd", check=False)
    assert last_line(done) == f"error: {tmp_path}/checkpoints/last.npz has trained 1 epochs already: " \
                              f"ask for more with --epochs"
    other = train_small(dataset, tmp_path, "--epochs", 2, "--resume", "--optimizer", "adam", check=False)
    assert last_line(other) == f"error: {tmp_path}/checkpoints/last.npz: written with --optimizer sgd; " \
                               f"resume with the same"
    normalized = train_small(dataset, tmp_path, "--epochs", 2, "--resume", "--optimizer", "sgd", "--normalize",
                             "zscore", check=False)
    assert last_line(normalized) == f"error: {tmp_path}/checkpoints/last.npz: trained on images normalized by " \
                                    f"range (1.0, 99.8), these by zscore (1.0, 99.8): resume with the same --normalize"

    fresh = train_small(dataset, tmp_path, "--epochs", 3, "--optimizer", "sgd", "--lr", 1e30, check=False)
    assert "training diverged" in last_line(fresh)  # a new run that never wrote moved nothing aside
    assert {name: (tmp_path / "checkpoints" / name).read_bytes() for name in good} == good
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["best.npz", "last.npz"]

    os.makedirs(tmp_path / "adam")  # Adam's steps are bounded by lr: the loss grows instead of overflowing
    result = train_small(dataset, tmp_path / "adam", "--epochs", 2, "--lr", 1e10, check=False)
    assert "training diverged; try a lower --lr than 1e+10" in last_line(result)
    assert os.listdir(tmp_path / "adam" / "checkpoints") == []


def test_weights_that_are_not_finite_are_never_written_and_never_used(tmp_path):
    model = UNet(base=4)
    path = str(tmp_path / "model.npz")
    save_checkpoint(path, model)
    meta, weights, _ = load_checkpoint(path)
    with backend.flow.no_grad():
        model.outc.conv.bias.fill_(float("nan"))
    with pytest.raises(CheckpointError, match=r"not written: model/outc\.conv\.bias holds NaN"):
        save_checkpoint(path, model)
    weights["outc.conv.weight"][0, 0, 0, 0] = np.inf
    crafted = str(tmp_path / "diverged.npz")
    np.savez(crafted, __meta__=np.array(json.dumps(meta)), **{f"model/{k}": v for k, v in weights.items()})
    with pytest.raises(CheckpointError, match=r"diverged\.npz: weight outc\.conv\.weight holds NaN or infinity"):
        build_model(crafted, "cpu")


# ---- interrupted runs ----------------------------------------------------------------------------

def interrupted_and_resumed(tmp_path, flags, interrupt):
    """A run started as a process, `interrupt(process, run folder)`, then resumed in this process to
    its end; returns (what the process printed, the resumed run, an uninterrupted run's weights)."""
    data = write_dataset(tmp_path / "data", n_train=6, n_test=0)
    os.makedirs(tmp_path / "straight")
    train_small(data, tmp_path / "straight", *flags)
    run = tmp_path / "interrupted"
    os.makedirs(run)
    command = [sys.executable, os.path.join(ROOT, "TrainUnetDataSet.py"), "--data-path", f"{data}/train_image",
               "--label-path", f"{data}/train_label", "--checkpoint-dir", f"{run}/checkpoints", "--log",
               f"{run}/log.txt", "--progress", "", "--base", 4, "--crop", 32, *flags]
    process = subprocess.Popen([str(c) for c in command], cwd=run, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    interrupt(process, run)
    out, err = process.communicate(timeout=300)
    printed = subprocess.CompletedProcess(command, process.returncode, out, err)
    resumed = train_small(data, run, *flags, "--resume")
    return printed, resumed, load_checkpoint(str(tmp_path / "straight" / "checkpoints" / "last.npz"))[1]


def wait_for_log(process, run, text, deadline=120):
    start = time.time()
    while text not in ((run / "log.txt").read_text() if (run / "log.txt").exists() else ""):
        assert time.time() - start < deadline and process.poll() is None
        time.sleep(0.02)


def assert_same_weights(run, straight):
    after = load_checkpoint(f"{run}/checkpoints/last.npz")[1]
    for name in straight:
        np.testing.assert_allclose(after[name], straight[name], atol=1e-6, err_msg=name)


def test_sigterm_writes_last_npz_and_resume_continues_exactly(tmp_path):
    def sigterm(process, run):
        wait_for_log(process, run, "== ")  # the log's header: signals are handled from here on
        process.send_signal(signal.SIGTERM)

    flags = ["--val-fraction", 0, "--schedule", "constant", "--epochs", 2]
    stopped, resumed, straight = interrupted_and_resumed(tmp_path, flags, sigterm)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stdout + stopped.stderr
    assert "stopped by SIGTERM in epoch 1, after step 1 of 6" in stopped.stdout
    assert "continue with --resume" in stopped.stdout
    assert "resumed from" in resumed.stdout and "after epoch 0, step 1" in resumed.stdout
    assert_same_weights(tmp_path / "interrupted", straight)


def children(pid):
    return [int(child) for child in open(f"/proc/{pid}/task/{pid}/children").read().split()]


def alive(pid):
    """Whether process `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_kill_9_midway_then_resume_gives_the_weights_of_an_uninterrupted_run_and_leaves_no_worker_behind(tmp_path):
    workers = []

    def kill_9(process, run):
        wait_for_log(process, run, "epoch 1/3")
        workers.extend(children(process.pid))
        process.kill()

    flags = ["--val-fraction", 0, "--schedule", "constant", "--epochs", 3, "--loader-workers", 1]
    killed, _, straight = interrupted_and_resumed(tmp_path, flags, kill_9)
    assert killed.returncode == -signal.SIGKILL
    assert len(workers) == 1
    deadline = time.time() + 10  # the kernel kills a worker whose training process died (PR_SET_PDEATHSIG)
    while any(map(alive, workers)) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(map(alive, workers))
    assert_same_weights(tmp_path / "interrupted", straight)
    assert not [name for name in os.listdir(tmp_path / "interrupted" / "checkpoints") if name.startswith(".tmp-")]


def test_paths_with_spaces_and_unicode_train_and_predict(tmp_path):
    data = write_dataset(tmp_path / "my data ünïcødé", n_train=3, n_test=1)
    out = tmp_path / "out put ✓"
    os.makedirs(out)
    train_small(data, out, "--epochs", 1)
    written, _ = predict_dataset(str(out / "checkpoints" / "best.npz"), f"{data}/test_image",
                                 dict(masks=str(out / "masks é")))
    assert [os.path.basename(path) for path in written] == ["0.png"] and os.path.exists(written[0])


def test_a_pickled_object_inside_an_npz_checkpoint_is_refused_without_running_it(tmp_path):
    path = str(tmp_path / "evil.npz")
    marker = tmp_path / "pwned"

    class RunsACommand:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    np.savez(path, __meta__=np.array(json.dumps({"format": "unet-npz/1"})), payload=np.array([RunsACommand()]))
    with pytest.raises(CheckpointError, match=r"evil\.npz: damaged or not a U-Net checkpoint .*allow_pickle=False"):
        build_model(path, "cpu")
    assert not marker.exists()


# ---- images the network is too big for --------------------------------------------------------------

@pytest.mark.parametrize("config", [dict(norm="batch"), dict(norm="instance"), dict(norm="batch", padding="valid")])
@pytest.mark.parametrize("size", [(1, 1), (20, 20), (5, 40)])
def test_images_smaller_than_the_network_takes_are_predicted_at_their_own_size(config, size):
    backend.seed_everything(0)
    model = UNet(base=4, **config).eval()
    image = np.random.default_rng(0).random(size).astype(np.float32)
    prob = predict_sample(model, {}, image, device="cpu")
    assert prob.shape == size and np.isfinite(prob).all()


def test_training_images_smaller_than_the_network_takes_stop_with_the_file_named(tmp_path):
    data = write_dataset(tmp_path / "data", n_train=3, n_test=0, size=20)
    result = train_small(data, tmp_path, "--crop", 0, check=False)
    assert result.returncode == 1
    assert last_line(result).startswith("error: ") and "image smaller than 32 pixels a side" in last_line(result)
    assert "--img-size 32" in last_line(result)


# ---- a full disk -------------------------------------------------------------------------------------

def test_a_full_disk_gives_one_line_and_leaves_the_previous_file_whole(tmp_path):
    path = tmp_path / "last.npz"
    path.write_bytes(b"the previous checkpoint")

    def disk_full(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError) as raised:
        atomic_write(str(path), disk_full)
    assert str(raised.value) == f"{path}: could not be written (No space left on device); it is as it was before"
    assert raised.value.__suppress_context__
    assert path.read_bytes() == b"the previous checkpoint" and os.listdir(tmp_path) == ["last.npz"]


# ---- crafted checkpoints ---------------------------------------------------------------------------

KILL_MARKER = None  # a file: once it exists, batch_killing_its_worker_once has killed a worker


def batch_killing_its_worker_once(indices, seed):
    """dataloader's batch, except that the first batch of the second epoch kills its worker (kill -9)."""
    if seed[1] == 1 and not os.path.exists(KILL_MARKER):
        open(KILL_MARKER, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return dataloader._sampler["sampler"].batch(indices, seed)


def test_loader_workers_even_one_killed_midway_give_the_weights_of_a_run_without_workers(
        dataset, tmp_path, monkeypatch):
    augmented = ["--epochs", 3, "--weight-map", "--aug-elastic", 1, "--aug-affine", 1, "--aug-noise", 0.5]
    train_small(dataset, tmp_path / "undisturbed", *augmented, "--loader-workers", 0)
    monkeypatch.setattr(dataloader, "_loader_batch", batch_killing_its_worker_once)
    monkeypatch.setattr(sys.modules[__name__], "KILL_MARKER", str(tmp_path / "killed"))
    disturbed = train_small(dataset, tmp_path / "disturbed", *augmented, "--loader-workers", 2)
    assert os.path.exists(tmp_path / "killed") and "loader_workers=2" in disturbed.stdout
    assert re.search(r"warning: loader worker \d+ \(SIGKILL\) died; a new loader worker makes its work again",
                     disturbed.stderr)
    assert_same_weights(tmp_path / "disturbed", load_checkpoint(f"{tmp_path}/undisturbed/checkpoints/last.npz")[1])


def batch_killing_its_worker_from_the_third_of_epoch_2(indices, seed):
    """dataloader's batch, except that from the third batch of the second epoch on, each kills its worker."""
    if seed[1] == 1:
        with open(KILL_MARKER, "a") as calls:
            calls.write(".")
        if os.path.getsize(KILL_MARKER) >= 3:
            os.kill(os.getpid(), signal.SIGKILL)
    return dataloader._sampler["sampler"].batch(indices, seed)


def test_loader_workers_that_keep_dying_stop_the_run_with_one_line_keeping_its_state_for_resume(
        dataset, tmp_path, monkeypatch):
    flags = ["--epochs", 3, "--val-fraction", 0, "--schedule", "constant", "--loader-workers", 1]
    train_small(dataset, tmp_path / "undisturbed", *flags)
    monkeypatch.setattr(dataloader, "_loader_batch", batch_killing_its_worker_from_the_third_of_epoch_2)
    monkeypatch.setattr(sys.modules[__name__], "KILL_MARKER", str(tmp_path / "calls"))
    stopped = train_small(dataset, tmp_path / "disturbed", *flags, check=False)
    assert stopped.returncode == 1
    assert re.fullmatch(r"error: loader workers died 3 times \(loader worker \d+ \(SIGKILL\) the last; out of memory\?\): "
                        r"try a smaller --loader-workers; stopped in epoch 2, after step 2 of 4: \S+last.npz holds that "
                        r"state; continue with --resume", last_line(stopped))
    monkeypatch.undo()
    resumed = train_small(dataset, tmp_path / "disturbed", *flags, "--resume")
    assert "after epoch 1, step 2" in resumed.stdout
    assert_same_weights(tmp_path / "disturbed", load_checkpoint(f"{tmp_path}/undisturbed/checkpoints/last.npz")[1])


def crafted_checkpoint(tmp_path, **changes):
    path = str(tmp_path / "model.npz")
    save_checkpoint(path, UNet(base=4))
    meta, weights, _ = load_checkpoint(path)
    meta.update(changes)
    np.savez(path, __meta__=np.array(json.dumps(meta)), **{f"model/{k}": v for k, v in weights.items()})
    return path


MODEL = dict(n_channels=1, n_classes=1, bilinear=False, base=4, norm="batch", padding="same", dropout=0)


@pytest.mark.parametrize("changes, message", [
    (dict(model=None), "field model is null; this version reads an object"),
    (dict(model=[1, 2]), "field model is [1, 2]; this version reads an object"),
    (dict(model=dict(n_channels=1)), "field model.n_classes is missing"),
    (dict(model=dict(MODEL, n_channels=0)), "field model.n_channels is 0; this version reads a whole number of "
                                            "channels, 1-1024"),
    (dict(model=dict(MODEL, base="4")), 'field model.base is "4"; this version reads a whole number'),
    (dict(model=dict(MODEL, norm="groupnorm")),
     'field model.norm is "groupnorm"; this version reads batch or instance'),
    (dict(model=dict(MODEL, padding="reflect")), 'field model.padding is "reflect"; this version reads same or valid'),
    (dict(model=dict(MODEL, n_classes=300)), "field model.n_classes is 300; this version reads a whole number of "
                                             "outputs, 1-255"),
    (dict(model=dict(MODEL, attention=True)), "field model.attention is unknown to this version (a checkpoint of a "
                                              "newer one?)"),
    (dict(config=dict(norm="groupnorm")), 'field config.norm is "groupnorm", its model.norm "batch": the two describe '
                                          'different networks'),
    (dict(config=dict(outputs=3)), "field config.outputs is 3, its model.n_classes 1: the two describe different "
                                   "networks"),
    (dict(data=[]), "field data is []; this version reads an object"),
    (dict(data=dict(img_size=-3)), "field data.img_size is -3; this version reads a whole number of pixels"),
    (dict(data=dict(normalize="magic")), 'field data.normalize is "magic"; this version reads percentile or zscore '
                                         'or range'),
    (dict(data=dict(percentiles=[99.8, 1])), "field data.percentiles is [99.8, 1]; this version reads two "
                                             "percentiles, low before high"),
    (dict(data=dict(input_types=["uint8", "os.system"])), "field data.input_types is"),
    (dict(data=dict(input_levels=[[0.1, "high"]])), "field data.input_levels is"),
    (dict(data=dict(input_levels=[])), "field data.input_levels is []"),
    (dict(data=dict(object_target="blobs")), 'field data.object_target is "blobs"; this version reads boundary or '
                                             'touching or distance'),
    (dict(data=dict(tile_overlap=0.5)), "field data.tile_overlap is unknown to this version"),
    (dict(output_shift="left"), 'field output_shift is "left"; this version reads a number'),
    (dict(input_scale=float("nan")), "field input_scale is NaN; this version reads a number above 0"),
    (dict(calibrated_threshold=1.5), "field calibrated_threshold is 1.5; this version reads a number in (0, 1)"),
    (dict(object_thresholds=[0.5, 0.3]), "field object_thresholds is unknown to this version (a checkpoint of a "
                                         "newer one?)"),
    (dict(format="unet-npz/2"), "written by a newer version of this program (format unet-npz/2; this version reads "
                                "unet-npz/1): update the program to use it"),
    (dict(format="unet-npz/9"), "written by a newer version of this program (format unet-npz/9"),
    (dict(format="keras-h5"), "unknown checkpoint format 'keras-h5'"),
])
def test_crafted_checkpoint_metadata_stops_with_one_line_naming_the_field(tmp_path, changes, message):
    path = crafted_checkpoint(tmp_path, **changes)
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: {message}")):
        build_model(path, "cpu")


def test_a_checkpoint_whose_metadata_is_not_an_object_is_refused(tmp_path):
    path = str(tmp_path / "model.npz")
    np.savez(path, __meta__=np.array("[1, 2, 3]"))
    with pytest.raises(CheckpointError, match="model.npz: unknown checkpoint format 'list'"):
        load_checkpoint(path)


class _TensorStandIn:
    """Pickles as the original format's tensors do: a oneflow.Tensor whose state names its folder."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (_TensorStandIn, (), {"path": self.path})


def oneflow_folder(folder, tensors):
    """An original-format checkpoint folder: `tensors` maps state-dict names to (sub-folder, array)."""
    os.makedirs(folder)
    state = {}
    for name, (sub, array) in tensors.items():
        state[name] = _TensorStandIn(sub)
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
        dims = "".join(f"dim: {d}\n" for d in array.shape)
        open(os.path.join(folder, sub, "meta"), "w").write(f"shape {{ {dims} }}\ndata_type: kFloat\n")
        array.astype(np.float32).tofile(os.path.join(folder, sub, "out"))
    pickled = pickle.dumps({"protocol_version": 1, "data": state}, protocol=2)
    here = f"c{__name__}\n_TensorStandIn\n".encode()
    assert here in pickled
    open(os.path.join(folder, "pickled_data"), "wb").write(pickled.replace(here, b"coneflow\nTensor\n"))
    return str(folder)


def test_a_oneflow_checkpoint_with_a_1d_convolution_weight_stops_with_one_line(tmp_path):
    folder = oneflow_folder(tmp_path / "ck", {"inc.double_conv.0.weight": ("t1", np.zeros(4)),
                                              "outc.conv.weight": ("t2", np.zeros((1, 4, 1, 1)))})
    with pytest.raises(CheckpointError, match="ck: weights are not a U-Net's: a convolution's weight is not 4-D"):
        build_model(folder, "cpu")


@pytest.mark.parametrize("sub", ["..", ".", "a/../..", "/etc"])
def test_a_oneflow_checkpoint_cannot_read_files_outside_its_folder(tmp_path, sub):
    folder = oneflow_folder(tmp_path / "ck", {"inc.double_conv.0.weight": ("t1", np.zeros((4, 1, 3, 3)))})
    meta = open(os.path.join(folder, "t1", "meta")).read()
    open(tmp_path / "meta", "w").write(meta)  # what `..` would find
    np.zeros(36, np.float32).tofile(tmp_path / "out")
    pickled = open(os.path.join(folder, "pickled_data"), "rb").read()
    pickled = pickled.replace(b"\x58\x02\x00\x00\x00t1", b"\x58" + len(sub).to_bytes(4, "little") + sub.encode())
    open(os.path.join(folder, "pickled_data"), "wb").write(pickled)
    with pytest.raises(CheckpointError, match=f"refusing tensor folder '{sub}': not a folder inside the checkpoint"):
        build_model(folder, "cpu")
