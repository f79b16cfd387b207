import json
import os
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from biounet.data.labels import cells
from biounet.data.loader import read_image, read_label
from biounet.evaluation.instances import seeded_cells
from biounet.evaluation.metrics import dice, rand_and_info_scores
from biounet.model import backend
from biounet.model.checkpoint import build_model, load_checkpoint, load_weights, model_weights
from biounet.model.unet import UNet
from biounet.prediction.inference import SEEDS, predict_probability
from biounet.training.ema import WeightAverage
from conftest import ROOT, run_script, train_small, write_dataset


@pytest.mark.learning
def test_overfitting_one_small_image_reaches_dice_above_0_9(tmp_path):
    data = write_dataset(tmp_path / "data", n_train=1, n_test=0, size=48)
    train_small(data, tmp_path, "--epochs", 60, "--val-fraction", 0, "--base", 8, "--crop", 0, "--lr", 1e-2)
    model, meta = build_model(str(tmp_path / "checkpoints" / "last.npz"), "cpu")
    image, label = read_image(f"{data}/train_image/0.png"), read_label(f"{data}/train_label/0.png")
    assert dice(predict_probability(model, image, "cpu") > 0.5, label) > 0.9
    assert dice(predict_probability(model, image, "cpu") < 0.5, label == 0) > 0.5  # membranes found too


def test_training_keeps_best_and_last_checkpoints_and_logs_one_line_per_epoch(dataset, tmp_path):
    result = train_small(dataset, tmp_path, "--epochs", 3)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["best.npz", "last.npz"]
    epoch_lines = [line for line in open(tmp_path / "log.txt") if line.startswith("epoch ")]
    assert len(epoch_lines) == 3
    assert all(key in epoch_lines[0] for key in ["train_loss", "val_loss", "val_pixel_error", "val_dice",
                                                 "val_v_rand", "time"])
    assert "preset=cpu" in result.stdout and "base=4" in result.stdout and "norm=instance" in result.stdout
    meta = load_checkpoint(str(tmp_path / "checkpoints" / "last.npz"))[0]
    assert meta["epoch"] == 3
    assert meta["config"]["preset"] == "cpu" and meta["config"]["base"] == 4 and meta["config"]["crop"] == 32


def test_every_epoch_appends_a_json_line_and_redraws_the_progress_picture(dataset, tmp_path):
    train_small(dataset, tmp_path, "--epochs", 2, "--progress", tmp_path / "progress.png")
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert records[0]["event"] == "run" and records[0]["config"]["crop"] == 32 and records[0]["config"]["base"] == 4
    assert [r["epoch"] for r in records[1:]] == [1, 2]
    for record in records[1:]:
        assert set(record) == {"epoch", "epochs", "train_loss", "val_loss", "val_pixel_error", "val_dice",
                               "val_v_rand", "lr", "time", "best"}
    assert records[1]["lr"] == pytest.approx(1e-3) and records[2]["lr"] == pytest.approx(1e-5)
    printed = [line for line in open(tmp_path / "log.txt") if line.startswith("epoch 2/2")][0]
    assert f"val_dice {records[2]['val_dice']:.4f}" in printed
    assert (tmp_path / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("flags", [["--weight-map"], ["--dice-weight", 0.5], ["--classes", 2, "--dice-weight", 1]])
def test_the_validation_loss_is_the_training_loss_computed_on_the_validation_images(dataset, tmp_path, flags):
    """Unchanged weights (lr 0), whole images, no augmentation, validated on the training images
    themselves: the two losses must agree, weight map and Dice term included."""
    for name in os.listdir(f"{dataset}/train_label"):  # 0/1: binary masks and class indices alike
        path = f"{dataset}/train_label/{name}"
        cv2.imwrite(path, cv2.imread(path, cv2.IMREAD_UNCHANGED) // 255)
    result = train_small(dataset, tmp_path, "--epochs", 1, "--lr", 0, "--crop", 0, "--aug-flip", 0,
                         "--val-image-path", f"{dataset}/train_image", "--val-label-path", f"{dataset}/train_label",
                         "--no-calibrate", *flags)
    record = [json.loads(line) for line in open(tmp_path / "log.jsonl")][-1]
    assert record["val_loss"] == pytest.approx(record["train_loss"], rel=1e-4), result.stdout


def test_the_same_seed_gives_the_same_run(dataset, tmp_path):
    weights = []
    for run in ["a", "b"]:
        os.makedirs(tmp_path / run)
        train_small(dataset, tmp_path / run, "--seed", 7)
        weights.append(load_checkpoint(str(tmp_path / run / "checkpoints" / "last.npz"))[1])
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        np.testing.assert_array_equal(weights[0][name], weights[1][name], err_msg=name)


def test_resume_continues_the_run_exactly_where_it_stopped(dataset, tmp_path):
    for run in ["straight", "resumed"]:
        os.makedirs(tmp_path / run)
    # A constant learning rate, because a cosine schedule depends on the total number of epochs.
    train_small(dataset, tmp_path / "straight", "--epochs", 3, "--schedule", "constant")
    train_small(dataset, tmp_path / "resumed", "--epochs", 2, "--schedule", "constant")
    result = train_small(dataset, tmp_path / "resumed", "--epochs", 3, "--resume", "--schedule", "constant")
    assert "resumed from" in result.stdout and "after epoch 2" in result.stdout
    straight = load_checkpoint(str(tmp_path / "straight" / "checkpoints" / "last.npz"))[1]
    resumed = load_checkpoint(str(tmp_path / "resumed" / "checkpoints" / "last.npz"))[1]
    for name in straight:
        np.testing.assert_allclose(resumed[name], straight[name], atol=1e-6, err_msg=name)
    log = open(tmp_path / "resumed" / "log.txt").read()
    assert [line.split()[1] for line in log.splitlines() if line.startswith("epoch ")] == ["1/2", "2/2", "3/3"]


def test_bad_training_data_stops_with_one_line_naming_the_file(dataset, tmp_path):
    os.remove(f"{dataset}/train_label/2.png")
    result = train_small(dataset, tmp_path, check=False)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "train_image/2.png: no label named 2" in result.stderr


def test_help_lists_the_flags_with_their_defaults(tmp_path):
    out = " ".join(run_script("TrainUnetDataSet.py", "--help", cwd=tmp_path).stdout.split())
    for flag, default in [("--val-fraction", "0.1"), ("--checkpoint-dir", "checkpoints"), ("--seed", "0"),
                          ("--log", "Unet_train.txt"), ("--progress", "progress.png"), ("--preset", "auto"),
                          ("--optimizer", "adam"), ("--w0", "10.0")]:
        help_text = out[out.rindex(flag + " "):]
        assert help_text[help_text.index("(default: "):].startswith(f"(default: {default})"), flag
    assert ("--epochs EPOCHS epochs to train: passes over the training images, or of --steps-per-epoch steps "
            "(default: as many as fit --preset's time budget)") in out
    assert "default: None" not in out


def test_the_best_checkpoint_is_the_epoch_with_the_best_chosen_validation_score(dataset, tmp_path):
    train_small(dataset, tmp_path, "--epochs", 4, "--best-metric", "val_pixel_error")
    log = [line.split() for line in open(tmp_path / "log.txt") if line.startswith("epoch ")]
    errors = [float(words[words.index("val_pixel_error") + 1]) for words in log]
    best = load_checkpoint(str(tmp_path / "checkpoints" / "best.npz"))[0]
    assert best["best_metric"] == "val_pixel_error" and best["epoch"] == 1 + int(np.argmin(errors))
    assert best["best"] == pytest.approx(min(errors), abs=1e-4)


def test_patience_stops_training_once_the_score_stops_improving(dataset, tmp_path):
    # A learning rate of 0 never improves on the first epoch, so training stops after 1 + 2 epochs.
    result = train_small(dataset, tmp_path, "--epochs", 10, "--lr", 0, "--patience", 2, "--best-metric", "val_loss")
    assert "early stop: val_loss has not improved for 2 epochs" in result.stdout
    assert load_checkpoint(str(tmp_path / "checkpoints" / "last.npz"))[0]["epoch"] == 3


def test_an_explicit_validation_folder_with_its_labels_beside_it_is_used_instead_of_holding_out(dataset, tmp_path):
    other = write_dataset(tmp_path / "val", n_train=3, n_test=0, seed=5)
    result = train_small(dataset, tmp_path, "--val-image-path", f"{other}/train_image")
    assert "4 training pairs" in result.stdout and "3 for validation" in result.stdout


def last_weights(run):
    return load_checkpoint(str(run / "checkpoints" / "last.npz"))[1]


def test_the_papers_sgd_with_momentum_resumes_with_its_momentum_to_the_weights_of_an_uninterrupted_run(
        dataset, tmp_path):
    sgd = ["--optimizer", "sgd", "--lr", 0.01, "--momentum", 0.99, "--schedule", "constant", "--val-fraction", 0]
    train_small(dataset, tmp_path / "straight", *sgd, "--epochs", 2)
    train_small(dataset, tmp_path / "resumed", *sgd, "--epochs", 1)
    result = train_small(dataset, tmp_path / "resumed", *sgd, "--epochs", 2, "--resume")
    assert "resumed from" in result.stdout and "epoch 2/2 train_loss" in result.stdout
    straight, resumed = last_weights(tmp_path / "straight"), last_weights(tmp_path / "resumed")
    for name in straight:  # a momentum buffer lost on resuming would move every weight differently
        np.testing.assert_allclose(resumed[name], straight[name], atol=1e-6, err_msg=name)


def test_weight_map_and_augmentations_train_end_to_end(dataset, tmp_path):
    augmentations = ["--aug-elastic", 1, "--aug-affine", 1, "--aug-intensity", 1, "--aug-noise", 1, "--aug-blur", 1]
    train_small(dataset, tmp_path / "both", "--weight-map", *augmentations, "--epochs", 3, "--lr", 1e-2)
    losses = [json.loads(line)["train_loss"] for line in open(tmp_path / "both" / "log.jsonl") if '"epoch"' in line]
    assert losses[-1] < losses[0]
    assert load_checkpoint(str(tmp_path / "both" / "checkpoints" / "last.npz"))[0]["config"]["weight_map"] is True
    train_small(dataset, tmp_path / "no map", "--no-weight-map", *augmentations, "--epochs", 3, "--lr", 1e-2)
    train_small(dataset, tmp_path / "no augmentation", "--weight-map", "--epochs", 3, "--lr", 1e-2)
    both = last_weights(tmp_path / "both")
    for other in ("no map", "no augmentation"):  # each changes what the network learns
        assert not np.allclose(last_weights(tmp_path / other)["outc.conv.weight"], both["outc.conv.weight"]), other


def test_the_unpadded_network_trains_on_mirrored_tiles_and_predicts_whole_images(dataset, tmp_path):
    result = train_small(dataset, tmp_path, "--padding", "valid", "--dropout", 0.5, "--crop", 200, "--epochs", 1)
    assert "training tiles of 204 pixels give 20" in result.stdout
    model, meta = build_model(str(tmp_path / "checkpoints" / "last.npz"), "cpu")
    assert meta["model"]["padding"] == "valid" and meta["model"]["dropout"] == 0.5
    image = read_image(f"{dataset}/test_image/0.png")
    assert predict_probability(model, image, "cpu").shape == image.shape


def test_calibration_puts_the_decision_at_the_threshold_that_fits_the_training_images_best_and_seeds_cells_there(
        dataset, tmp_path):
    result = train_small(dataset, tmp_path, "--weight-map", "--epochs", 2, "--val-fraction", 0)
    assert "calibrated" in result.stdout
    path = str(tmp_path / "checkpoints" / "last.npz")
    meta, weights, _ = load_checkpoint(path)
    threshold = meta["calibrated_threshold"]
    assert 0.05 <= threshold <= 0.95 and meta["output_shift"] == pytest.approx(np.log(threshold / (1 - threshold)))
    raw = UNet(**meta["model"])
    load_weights(raw, weights, path)
    image = read_image(f"{dataset}/train_image/0.png")
    model = build_model(path, "cpu")[0]
    calibrated = predict_probability(model, image, "cpu")
    assert np.mean((calibrated > 0.5) == (predict_probability(raw.eval(), image, "cpu") > threshold)) > 0.999

    # and the cells between membranes seeded where they score best there
    tried = [(p * (1 - threshold) / (p * (1 - threshold) + (1 - p) * threshold), size) for p, size in SEEDS]
    chosen = (meta["seed_threshold"], meta["seed_size"])
    assert min(abs(seed - chosen[0]) for seed, size in tried if size == chosen[1]) < 1e-9
    pairs = [(predict_probability(model, read_image(f"{dataset}/train_image/{name}"), "cpu"),
              cells(read_image(f"{dataset}/train_label/{name}") > 0))
             for name in sorted(os.listdir(f"{dataset}/train_image"))]

    def v_rand(seeds):
        return np.mean([rand_and_info_scores(seeded_cells(prob, *seeds), truth)[0] for prob, truth in pairs])
    assert v_rand(chosen) == pytest.approx(max(v_rand(seeds) for seeds in tried), abs=1e-6)


def test_a_resumed_run_recalibrates_an_unchanged_best_checkpoint_from_its_weights_not_its_shifted_decision(
        dataset, tmp_path):
    train_small(dataset, tmp_path, "--weight-map", "--epochs", 2, "--lr", 1e-2)
    first = load_checkpoint(str(tmp_path / "checkpoints" / "best.npz"))[0]
    assert first["calibrated_threshold"] != 0.5  # else recalibrating the shifted decision would change nothing
    train_small(dataset, tmp_path, "--weight-map", "--epochs", 3, "--resume", "--lr", 0)  # no better epoch
    again = load_checkpoint(str(tmp_path / "checkpoints" / "best.npz"))[0]
    assert again["epoch"] == first["epoch"]
    assert again["calibrated_threshold"] == first["calibrated_threshold"]
    assert again["output_shift"] == pytest.approx(first["output_shift"])


def test_without_calibration_the_checkpoint_keeps_the_plain_decision(dataset, tmp_path):
    result = train_small(dataset, tmp_path, "--no-calibrate")
    assert "calibrated" not in result.stdout
    assert "output_shift" not in load_checkpoint(str(tmp_path / "checkpoints" / "last.npz"))[0]


def test_loader_workers_start_after_opencv_has_used_its_threads_in_the_training_process():
    code = """if True:
        import cv2, numpy as np
        from biounet.data.loader import BatchLoader
        image = np.zeros((2048, 2048), np.float32)
        for _ in range(3):  # OpenCV's thread pool runs, as augmentation's warps make it do
            cv2.remap(image, image, image, cv2.INTER_LINEAR)
        class Sampler:
            def batch(self, indices, seed):
                return indices
        loader = BatchLoader(Sampler(), workers=2)
        print(list(loader.batches([([1], 0), ([2], 1)])))
        loader.close()"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.stdout.strip() == "[[1], [2]]", result.stderr


def test_an_epoch_of_steps_per_epoch_draws_the_pairs_pass_after_pass_in_new_orders():
    from biounet.training.train import epoch_plan
    order, first_step, losses = epoch_plan(None, np.random.default_rng(0), 3, 10)
    assert len(order) == 10 and first_step == 0 and losses == []
    assert all(sorted(order[i:i + 3]) == [0, 1, 2] for i in (0, 3, 6))


@pytest.mark.skipif(backend.NAME != "torch", reason="the loop's schedule, not the framework: checked in the suite's "
                                                 "PyTorch run, where steps are faster (keeps the suite within its time)")
def test_steps_per_epoch_and_validation_every_few_epochs(dataset, tmp_path):
    result = train_small(dataset, tmp_path, "--epochs", 3, "--steps-per-epoch", 7, "--val-every", 2)
    assert "steps_per_epoch=7" in result.stdout and "val_every=2" in result.stdout
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")][1:]
    assert ["val_dice" in r for r in records] == [False, True, True]  # every 2nd epoch and the last
    assert not records[0]["best"] and load_checkpoint(str(tmp_path / "checkpoints" / "best.npz"))[0]["epoch"] in (2, 3)


@pytest.mark.skipif(backend.NAME != "torch", reason="the loop's schedule, not the framework: checked in the suite's "
                                                 "PyTorch run, where steps are faster (keeps the suite within its time)")
def test_a_time_budget_plans_the_epochs_that_fit_and_the_schedule_follows(dataset, tmp_path):
    begin = time.perf_counter()
    flags = ["--data-path", f"{dataset}/train_image", "--label-path", f"{dataset}/train_label", "--progress", "",
             "--base", 4, "--crop", 32, "--time-budget", 0.1]
    result = run_script("TrainUnetDataSet.py", *flags, cwd=tmp_path)
    seconds = time.perf_counter() - begin
    records = [json.loads(line) for line in open(tmp_path / "Unet_train.jsonl")][1:]
    assert len(records) >= 3 and records[-1]["epochs"] == len(records), result.stdout
    rates = [r["lr"] for r in records]  # the cosine schedule follows the plan to its end
    assert rates[0] == pytest.approx(1e-3) and rates == sorted(rates, reverse=True) and rates[-1] < 1e-4
    assert sum(r["time"] for r in records) <= 0.1 * 60 * 1.2 and seconds < 60
    assert load_checkpoint(str(tmp_path / "checkpoints" / "last.npz"))[0]["config"]["epochs"] == len(records)
    again = [*flags[:-2], "--resume", "--time-budget"]
    refused = run_script("TrainUnetDataSet.py", *again, 0.1, cwd=tmp_path, check=False)
    assert refused.returncode != 0 and "of --time-budget 0.1, and an epoch does not fit" in refused.stderr
    run_script("TrainUnetDataSet.py", *again, 0.15, cwd=tmp_path)  # a larger budget: trains for what is left of it
    meta = load_checkpoint(str(tmp_path / "checkpoints" / "last.npz"))[0]
    assert meta["epoch"] > len(records) and 0.1 * 60 <= meta["trained_seconds"] <= 0.15 * 60 * 1.2


def test_a_time_budget_and_epochs_together_are_refused_in_one_line(dataset, tmp_path):
    result = train_small(dataset, tmp_path, "--time-budget", 1, check=False)
    assert result.returncode != 0 and "--time-budget sets the number of epochs" in result.stderr


def test_validation_scores_are_the_same_when_images_of_one_size_share_a_forward_pass():
    from biounet.data.loader import SegmentationDataset
    from biounet.prediction.inference import validate
    from biounet.training.config import data_facts, settle
    from biounet.training.flags import parse_args
    rng = np.random.default_rng(0)
    shapes = [(48, 48), (48, 48), (48, 48), (40, 56), (48, 48)]  # batches: 3, then 1, then 1
    images = [rng.random(shape).astype(np.float32) for shape in shapes]
    labels = [(rng.random(shape) > 0.5).astype(np.uint8) for shape in shapes]
    dataset = SegmentationDataset(images, labels)
    backend.seed_everything(0)
    model = UNet(base=4, norm="instance")
    scores = []
    for batch in [1, 3]:
        flags = parse_args(["--batch-size", str(batch), "--dice-weight", "0.5"])
        config = settle(flags, data_facts("isbi", dataset, dataset), "cpu", backend.NAME)
        scores.append(validate(model, dataset, None, config, None, "cpu"))
    assert scores[0].keys() == scores[1].keys() and "val_v_rand" in scores[0]
    for name in scores[0]:
        assert scores[1][name] == pytest.approx(scores[0][name], abs=1e-5), name


def test_a_weight_average_moves_by_one_minus_its_decay_and_is_applied_only_inside_its_block():
    model = UNet(base=2, norm="batch")
    average = WeightAverage(model, decay=0.75)
    before = model_weights(model)
    with backend.flow.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    average.update(model)
    name = "inc.double_conv.0.weight"
    with average.applied(model):
        assert np.allclose(model_weights(model)[name], before[name] + 0.25)
    assert np.allclose(model_weights(model)[name], before[name] + 1)


def test_with_ema_the_best_checkpoint_holds_the_averaged_weights_and_last_the_trained_ones(dataset, tmp_path):
    train_small(dataset, tmp_path, "--ema", 0.9, "--epochs", 1, "--val-fraction", 0.25, "--no-calibrate")
    best, best_weights, _ = load_checkpoint(str(tmp_path / "checkpoints" / "best.npz"))
    last, last_weights, _ = load_checkpoint(str(tmp_path / "checkpoints" / "last.npz"))
    assert best["epoch"] == last["epoch"] == 1 and best["config"]["ema"] == 0.9
    assert not np.allclose(best_weights["outc.conv.weight"], last_weights["outc.conv.weight"])
