"""The configuration is settled once, from the flags and what the data says, and cannot change after."""
import os

import pytest

from biounet.training.config import ConfigError, DataFacts, describe, settle
from biounet.training.flags import parse_args
from conftest import train_small

ISBI = DataFacts("pairs", 1, [(512, 512)], ("0", 512), False, None, True)
MIXED = DataFacts("dsb2018", 3, [(256, 256), (256, 320), (520, 696)], ("a", 256), True, None, True)
VOC = DataFacts("voc", 3, [(100, 100)], ("a", 100), False, [60, 30, 10], True)


def settled(flags, data=ISBI, device="cpu"):
    return settle(parse_args(flags), data, device, "oneflow")


def test_the_preset_for_the_device_fills_only_the_flags_left_open():
    cpu = settled(["--epochs", "3"])
    assert (cpu.preset, cpu.base, cpu.crop, cpu.batch_size, cpu.norm, cpu.epochs) == ("cpu", 16, 256, 1, "instance", 3)
    gpu = settled(["--base", "32"], device="cuda")
    assert (gpu.preset, gpu.base, gpu.crop, gpu.batch_size, gpu.norm) == ("gpu", 32, 0, 4, "batch")
    assert settled(["--preset", "gpu"]).base == 64


def test_on_a_gpu_an_epoch_is_long_enough_that_validation_does_not_dominate_it():
    assert (settled([]).steps_per_epoch, settled([], device="cuda").steps_per_epoch) == (0, 250)
    assert settled(["--steps-per-epoch", "0"], device="cuda").steps_per_epoch == 0


def test_the_presets_train_for_a_time_budget_unless_epochs_are_given():
    assert (settled([]).time_budget, settled([], device="cuda").time_budget) == (30, 10)
    assert (settled(["--epochs", "3"]).time_budget, settled(["--epochs", "3"]).epochs) == (None, 3)
    assert settled(["--time-budget", "2"]).time_budget == 2


def test_images_of_several_sizes_in_batches_train_on_crops_of_the_smallest_side_and_say_so():
    config = settled(["--preset", "gpu"], MIXED)
    assert config.crop == 256 and "images of 3 sizes: batches of random 256x256 crops" in describe(config)
    assert settled(["--preset", "gpu", "--crop", "128"], MIXED).crop == 128
    assert settled(["--preset", "gpu", "--batch-size", "1"], MIXED).crop == 0  # one image a step: any size
    assert settled(["--preset", "gpu"]).crop == 0


def test_the_unpadded_net_trains_on_the_tile_whose_output_covers_the_crop_less_its_margins():
    config = settled(["--padding", "valid", "--crop", "310"])
    assert config.crop == 316  # 16 x 12 + 124: the smallest tile whose output (132 pixels) covers 310 - 184
    assert "unpadded U-Net: training tiles of 316 pixels give 132" in describe(config)
    assert settled(["--padding", "valid", "--preset", "gpu"]).crop == 0
    assert settled(["--padding", "valid", "--preset", "gpu"], MIXED).crop == 268  # mixed sizes: 256-pixel crops, less the margins


def test_dsb_data_trains_for_objects_by_default_with_three_outputs_and_picks_best_by_the_object_score():
    nuclei = settled([], MIXED)
    assert (nuclei.instances, nuclei.outputs, nuclei.classes, nuclei.best_metric) == (True, 3, 1, "val_map")
    assert "trained for objects: classes background, interior, boundary" in describe(nuclei)
    one_class = settled(["--no-instances"], MIXED)
    assert (one_class.instances, one_class.outputs, one_class.best_metric) == (False, 1, "val_dice")
    assert settled(["--weight-map"], MIXED).instances is False  # the weight map separates them instead
    isbi = settled([])
    assert (isbi.instances, isbi.outputs) == (False, 1) and settled(["--instances"]).outputs == 3
    distance = settled(["--object-target", "distance"], MIXED)  # background and 4 levels of distance
    assert distance.outputs == 5 and "classes background, distance 1/4, distance 2/4, distance 3/4, distance 4/4" \
        in describe(distance)
    with pytest.raises(ConfigError, match="^--instances trains objects of one class: it needs --classes 1$"):
        settled(["--instances", "--classes", "3"], VOC)
    with pytest.raises(ConfigError, match="^--weight-map weighs the one-class loss"):
        settled(["--instances", "--weight-map"], MIXED)


def test_the_weight_map_is_on_for_one_class_of_em_folders_and_tiffs_and_the_dice_term_for_several_classes():
    isbi, nuclei = settled([]), settled([], MIXED)
    assert (isbi.weight_map, isbi.dice_weight) == (True, 0.0)
    assert (nuclei.weight_map, nuclei.dice_weight) == (False, 1.0)  # trained for objects: three classes
    assert settled(["--no-instances"], MIXED).dice_weight == 0.0
    assert settled(["--weight-map"], MIXED).weight_map is True
    assert settled(["--no-weight-map"]).weight_map is False
    voc = settled(["--classes", "3"], VOC)
    assert (voc.weight_map, voc.dice_weight) == (False, 1.0)
    assert settled(["--classes", "3", "--dice-weight", "0"], VOC).dice_weight == 0.0


def test_the_best_checkpoint_is_picked_by_the_score_that_fits_the_task():
    assert settled([]).best_metric == "val_v_rand"
    assert settled([], MIXED).best_metric == "val_map"  # nuclei are trained for objects and counted
    assert settled(["--no-instances"], MIXED).best_metric == "val_dice"
    assert settled(["--classes", "3"], VOC).best_metric == "val_miou"
    assert settled([], ISBI._replace(validation=False)).best_metric == "train_loss"
    assert settled(["--best-metric", "val_loss"]).best_metric == "val_loss"


@pytest.mark.parametrize("flags, data, message", [
    (["--classes", "3", "--instance-labels"], VOC, "--instance-labels numbers objects of one class: it needs --classes 1"),
    (["--classes", "3", "--weight-map"], VOC, "--weight-map separates objects of one class; with --classes 3"),
    (["--class-weights", "1,2"], ISBI, "--class-weights weighs several classes: it needs --classes 2 or more"),
    (["--classes", "3", "--class-weights", "1,2"], VOC, "--class-weights '1,2': expected 3 weights"),
    (["--classes", "3", "--class-weights", "1,a,2"], VOC, "--class-weights '1,a,2': expected numbers separated"),
    (["--classes", "3", "--class-weights", "1,-2,2"], VOC, "expected 3 weights (one per class), each >= 0"),
    (["--val-label-path", "v"], ISBI, "--val-label-path labels the images of --val-image-path: give both"),
    (["--percentiles", "99", "1"], ISBI, "--percentiles 99 1: the low percentile must be below the high one"),
    (["--best-metric", "val_miou"], ISBI, "--best-metric val_miou is not scored with --classes 1"),
    (["--best-metric", "val_dice"], ISBI._replace(validation=False), "there is no validation set"),
    ([], ISBI._replace(smallest=("tiny.png", 20)), "tiny.png: image smaller than 32 pixels a side"),
])
def test_contradictory_flags_stop_with_one_line_naming_the_flag(flags, data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        settled(flags, data)


def test_the_settled_configuration_cannot_change_and_is_described_in_full():
    config = settled([])
    with pytest.raises(AttributeError, match="settled: crop cannot change"):
        config.crop = 64
    text = describe(config)
    assert all(f"{key}=" in text for key in vars(config) if key != "notes")
    assert "crop=256" in text and "weight_map=True" in text and "augment={'flip': 1.0" in text


def test_a_training_run_with_contradictory_flags_stops_with_that_line_and_writes_no_checkpoint(dataset, tmp_path):
    result = train_small(dataset, tmp_path, "--class-weights", "1,2", check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "error: --class-weights weighs several classes: it needs " \
                                                     "--classes 2 or more"
    assert os.listdir(tmp_path / "checkpoints") == []


def test_data_parallel_processes_share_one_global_batch_equally():
    assert settle(parse_args([]), ISBI, "cpu", "oneflow", processes=2).batch_size == 2  # the preset's 1, rounded up
    assert settle(parse_args(["--preset", "gpu"]), ISBI, "cuda", "torch", processes=3).batch_size == 6
    with pytest.raises(ConfigError, match="--batch-size 3: the batch of a step is shared equally by the 2 processes"):
        settle(parse_args(["--batch-size", "3"]), ISBI, "cpu", "oneflow", processes=2)
