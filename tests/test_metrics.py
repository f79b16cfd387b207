"""The scores on hand-made segmentations whose values can be worked out by hand."""
import numpy as np
import pytest
from skimage.metrics import adapted_rand_error, variation_of_information

from biounet.data.labels import cells
from biounet.evaluation.metrics import (class_scores, isbi_scores, pixel_scores, rand_and_info_scores, skimage_scores,
                                        thinned_segments)


def two_cells(width=9, height=8):
    """Two equal cells side by side, split by a one-pixel membrane column."""
    truth = np.ones((height, width), bool)
    truth[:, width // 2] = False
    return truth


def test_pixel_scores_of_a_hand_made_case():
    truth = np.array([[1, 1, 1, 0]], bool)
    pred = np.array([[1, 1, 0, 0]], bool)
    s = pixel_scores(pred, truth)
    assert s["pixel_error"] == 0.25 and s["pixel_accuracy"] == 0.75
    assert s["dice"] == pytest.approx(2 * 2 / (2 + 3)) and s["iou"] == pytest.approx(2 / 3)
    assert s["precision"] == 1.0 and s["recall"] == pytest.approx(2 / 3)
    assert s["membrane_dice"] == pytest.approx(2 * 1 / (1 + 2)) and s["membrane_iou"] == 0.5
    assert s["mean_iou"] == pytest.approx((2 / 3 + 0.5) / 2)


def test_dice_equals_f1_and_empty_masks_score_1():
    s = class_scores([[0, 1, 1, 0]], [[1, 1, 0, 0]])
    assert s["dice"] == pytest.approx(2 * s["precision"] * s["recall"] / (s["precision"] + s["recall"]))
    assert class_scores(np.zeros((3, 3)), np.zeros((3, 3)))["dice"] == 1.0


def test_ground_truth_cells_are_4_connected_components():
    mask = np.array([[1, 0, 1],
                     [0, 1, 0]], bool)
    assert cells(mask).max() == 3  # diagonal neighbours are separate cells


def test_identical_segmentations_score_1():
    truth = two_cells()
    assert isbi_scores(truth.astype(float), truth) == {"v_rand": 1.0, "v_info": 1.0}


def test_two_equal_cells_merged_into_one_score_exactly_two_thirds_and_zero():
    # Ground truth: two cells of n pixels each. Prediction: one cell. Rand (N^2 normalization):
    # sum p_ij^2 = 2 (1/2)^2 = 1/2, sum a_i^2 = 1/2, sum b_j^2 = 1 -> precision 1/2, recall 1 -> F = 2/3.
    # Information: H(S) = 0, I(S;T) = 0 -> V_info = 0.
    truth = two_cells()
    assert isbi_scores(np.ones(truth.shape), truth) == {"v_rand": pytest.approx(2 / 3), "v_info": 0.0}


def test_a_cell_split_in_two_scores_exactly():
    # Ground truth: one cell of 72 pixels. Prediction: two cells of 32 and a membrane column of
    # k = 8 pixels inside the true cell, each a single-pixel segment.
    truth = np.ones((8, 9), bool)
    pred = two_cells().astype(float)
    n, k = truth.size, 8
    # sum p_ij^2 = 2 (32/72)^2 + k/n^2 = sum b_j^2 + k/n^2; sum a_i^2 = 1.
    sum_ab = 2 * (32 / n) ** 2 + k / n ** 2
    expected = 2 * sum_ab / (sum_ab + 1)  # precision 1, recall sum_ab
    assert isbi_scores(pred, truth)["v_rand"] == pytest.approx(expected)


def test_thick_predicted_borders_are_thinned_to_one_pixel_and_forgiven():
    truth = two_cells(width=12)
    pred = truth.copy()
    pred[:, 5:8] = False  # a three-pixel membrane where the truth has one
    segments = thinned_segments(pred.astype(float), 0.5)
    assert np.count_nonzero(segments == 0) == truth.shape[0]  # one border pixel per row left
    assert isbi_scores(pred.astype(float), truth)["v_rand"] == pytest.approx(1.0, abs=0.02)


def test_a_gap_in_a_predicted_membrane_merges_cells_and_is_punished():
    truth = two_cells()
    pred = truth.copy()
    pred[3, 4] = True
    assert isbi_scores(pred.astype(float), truth)["v_rand"] == pytest.approx(2 / 3)


def test_the_best_threshold_of_a_probability_map_counts():
    truth = two_cells()
    prob = np.where(truth, 0.95, 0.0)
    prob[3, 4] = 0.5  # a weak membrane pixel: kept as border from threshold 0.5 on
    assert isbi_scores(prob, truth)["v_rand"] == 1.0


def test_the_rand_score_equals_counting_pixel_pairs():
    rng = np.random.default_rng(0)
    truth_cells, segments = rng.integers(0, 4, (7, 8)), rng.integers(0, 3, (7, 8))
    inside = truth_cells > 0
    t, s = truth_cells[inside], segments[inside].copy()
    s[s == 0] = 100 + np.arange(np.count_nonzero(s == 0))  # border pixels: segments of their own
    same_t, same_s = t[:, None] == t[None, :], s[:, None] == s[None, :]
    precision = (same_t & same_s).sum() / same_s.sum()
    recall = (same_t & same_s).sum() / same_t.sum()
    v_rand, _ = rand_and_info_scores(segments, truth_cells)
    assert v_rand == pytest.approx(2 * precision * recall / (precision + recall))


def test_the_information_score_agrees_with_scikit_image_where_no_border_pixel_is_left():
    rng = np.random.default_rng(1)
    truth_cells, segments = rng.integers(1, 5, (20, 20)), rng.integers(1, 4, (20, 20))
    _, v_info = rand_and_info_scores(segments, truth_cells)
    h_s_given_t, h_t_given_s = variation_of_information(truth_cells, segments)  # in bits
    h_t = -sum(p * np.log2(p) for p in np.bincount(truth_cells.ravel())[1:] / 400)
    h_s = -sum(p * np.log2(p) for p in np.bincount(segments.ravel())[1:] / 400)
    mutual = h_t - h_t_given_s
    assert mutual == pytest.approx(h_s - h_s_given_t)
    assert v_info == pytest.approx(2 * mutual / (h_s + h_t))


def test_skimage_scores_are_computed_on_cells_with_membranes_left_out():
    truth = two_cells()
    scores = skimage_scores(np.ones(truth.shape, bool), truth)
    assert scores["adapted_rand_error"] == pytest.approx(adapted_rand_error(cells(truth), np.ones((8, 9), int))[0])
    assert scores["vi"] == pytest.approx(1.0)  # H(truth | pred) = 1 bit, H(pred | truth) = 0
    assert skimage_scores(truth, truth) == {"adapted_rand_error": 0.0, "vi": 0.0}
