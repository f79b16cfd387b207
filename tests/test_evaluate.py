import json
import os

import cv2
import numpy as np
import pytest

from biounet.evaluation.metrics import dice, pixel_accuracy
from biounet.evaluation.scores import score_folder
from conftest import run_script


def test_dice_and_accuracy_of_hand_made_masks():
    truth = np.array([[1, 1, 0, 0]])
    assert dice(truth, truth) == 1.0 and pixel_accuracy(truth, truth) == 1.0
    assert dice([[1, 0, 0, 0]], truth) == pytest.approx(2 * 1 / (1 + 2))
    assert pixel_accuracy([[1, 0, 0, 1]], truth) == 0.5
    assert dice(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0


def test_evaluate_scores_each_prediction_against_the_label_of_the_same_name(tmp_path):
    for folder in ["pred", "label"]:
        os.makedirs(tmp_path / folder)
    truth = np.full((16, 16), 255, np.uint8)
    truth[8] = 0
    cv2.imwrite(str(tmp_path / "label" / "a.png"), truth)
    cv2.imwrite(str(tmp_path / "pred" / "a.png"), truth)
    wrong = truth.copy()
    wrong[:4] = 0
    cv2.imwrite(str(tmp_path / "label" / "b.png"), truth)
    cv2.imwrite(str(tmp_path / "pred" / "b.png"), wrong)
    scores = score_folder(str(tmp_path / "pred"), str(tmp_path / "label"))
    assert scores["images"]["a.png"]["pixel_error"] == 0.0 and scores["images"]["a.png"]["v_rand"] == 1.0
    assert scores["images"]["b.png"]["pixel_error"] == pytest.approx(64 / 256)
    assert scores["mean"]["pixel_error"] == pytest.approx(32 / 256)
    out = run_script("biounet-evaluate", "pred", "label", "--json", "scores.json", cwd=tmp_path).stdout
    assert out.splitlines()[0].split() == ["image", "pixel_error", "dice", "iou", "mean_iou", "v_rand", "v_info",
                                           "adapted_rand_error", "vi"]
    assert out.splitlines()[-1].startswith("mean")
    mean = json.load(open(tmp_path / "scores.json"))["mean"]
    assert {"pixel_error", "dice", "iou", "v_rand", "v_info", "adapted_rand_error", "vi"} <= set(mean)
    assert mean == pytest.approx(scores["mean"])


def test_probability_maps_are_scored_with_the_threshold_sweep(tmp_path):
    for folder in ["prob", "label"]:
        os.makedirs(tmp_path / folder)
    truth = np.full((16, 16), 255, np.uint8)
    truth[:, 8] = 0
    prob = np.where(truth > 0, 60000, 0).astype(np.uint16)
    prob[5, 8] = 39321  # a faint membrane pixel (p = 0.6): a gap at 0.5, closed by higher thresholds
    cv2.imwrite(str(tmp_path / "label" / "x.png"), truth)
    cv2.imwrite(str(tmp_path / "prob" / "x.png"), prob)
    scores = score_folder(str(tmp_path / "prob"), str(tmp_path / "label"))["images"]["x.png"]
    assert scores["v_rand"] == 1.0 and scores["adapted_rand_error"] > 0.3
