import cv2
import numpy as np
import pytest
from scipy import ndimage

from biounet.data.augment import DEFAULT_PROBABILITIES, augment
from biounet.data.labels import cells
from biounet.data.weightmap import class_balance, weight_map
from conftest import run_script

GEOMETRIC = dict(flip=1.0, affine=1.0, elastic=1.0)


def blobs(size=64, seed=0):
    rng = np.random.default_rng(seed)
    label = np.zeros((size, size), np.uint8)
    for y, x in rng.integers(8, size - 8, (6, 2)):
        label[y - 6:y + 6, x - 6:x + 6] = 1
    return label


def test_geometric_augmentations_move_image_label_and_weights_together_and_keep_labels_binary():
    rng = np.random.default_rng(0)
    label = blobs()
    for _ in range(10):
        image, aug_label, weights = augment(label.astype(np.float32), label, 2.0 * label.astype(np.float32), rng,
                                            GEOMETRIC)
        assert set(np.unique(aug_label)) <= {0, 1}
        assert np.mean((image > 0.5) == (aug_label == 1)) > 0.97
        assert np.mean((weights > 1.0) == (aug_label == 1)) > 0.97


def test_with_every_probability_at_zero_nothing_changes():
    rng = np.random.default_rng(0)
    image = rng.random((32, 32)).astype(np.float32)
    label = blobs(32)
    out = augment(image, label, None, rng, {name: 0.0 for name in DEFAULT_PROBABILITIES})
    np.testing.assert_array_equal(out[0], image)
    np.testing.assert_array_equal(out[1], label)
    assert out[2] is None


def test_intensity_noise_and_blur_change_the_image_only():
    rng = np.random.default_rng(0)
    image = rng.random((32, 32)).astype(np.float32)
    label = blobs(32)
    out = augment(image, label, None, rng, dict(flip=0.0, intensity=1.0, noise=1.0, blur=1.0))
    assert not np.allclose(out[0], image) and out[0].dtype == np.float32
    assert -0.5 < out[0].min() and out[0].max() < 1.5  # about the image's own range
    np.testing.assert_array_equal(out[1], label)


def test_normalized_values_outside_0_to_1_are_kept_as_prediction_sees_them():
    rng = np.random.default_rng(0)
    zscored = rng.normal(0, 1, (32, 32)).astype(np.float32)  # --normalize zscore: half of it negative
    flipped = augment(zscored, blobs(32), None, rng, dict(flip=1.0))[0]
    assert sorted(flipped.ravel()) == sorted(zscored.ravel())
    shifted = augment(zscored, blobs(32), None, rng, dict(flip=0.0, intensity=1.0))[0]
    assert shifted.min() < -1 and shifted.max() > 1


def test_inspect_data_says_what_was_found_and_draws_augmented_samples_and_the_weight_map(tmp_path, dataset):
    out = run_script("dataloader.py", f"{dataset}/train_image", "--label-path", f"{dataset}/train_label",
                     "--augmented", tmp_path / "aug.png", "--samples", 5, "--weight-map", tmp_path / "w.png",
                     cwd=tmp_path).stdout
    assert f"{dataset}/train_image: pairs, 4 images (4 labelled)\nsizes: 64x64 uint8 (4)\nlabel values: 0, 255\n" in out
    augmented = cv2.imread(str(tmp_path / "aug.png"))
    assert augmented.shape == (2 * 256, 3 * 256, 3)  # the image and 5 samples, 3 to a row
    assert len({augmented[y:y + 256, x:x + 256].tobytes() for y in (0, 256) for x in (0, 256, 512)}) == 6
    assert cv2.imread(str(tmp_path / "w.png")).shape == (64, 64, 3)


def test_class_balance_gives_both_classes_the_same_total_weight():
    label = blobs()
    w = class_balance(label)
    assert w[label == 1].sum() == pytest.approx(w[label == 0].sum()) and w.mean() == pytest.approx(1.0)


def test_a_one_pixel_membrane_between_two_cells_gets_the_papers_border_weight():
    label = np.ones((20, 21), np.uint8)
    label[:, 10] = 0  # d1 = d2 = 1 on the membrane
    w = weight_map(label, w0=10, sigma=5)
    assert w[5, 10] == pytest.approx(class_balance(label)[5, 10] + 10 * np.exp(-(1 + 1) ** 2 / (2 * 25)))
    assert w[5, 3] == pytest.approx(class_balance(label)[5, 3])  # inside a cell: class weight only


def test_a_membrane_next_to_a_single_cell_gets_no_border_weight():
    label = np.zeros((20, 20), np.uint8)
    label[5:15, 5:15] = 1
    np.testing.assert_allclose(weight_map(label), class_balance(label))


def test_the_weight_map_equals_one_distance_map_per_cell_computed_the_slow_way():
    label = blobs(64, seed=3)
    ids = cells(label)
    distances = np.sort(np.stack([ndimage.distance_transform_edt(ids != i) for i in range(1, ids.max() + 1)]), 0)
    border = 10 * np.exp(-((distances[0] + distances[1]) ** 2) / (2 * 25))
    expected = class_balance(label) + np.where(label > 0, 0, border)
    np.testing.assert_allclose(weight_map(label), expected, atol=1e-6)


def test_stain_jitter_changes_the_colours_of_stained_images_a_little_and_leaves_grey_ones_alone():
    rng = np.random.default_rng(0)
    label = blobs(32)
    pink = np.array([0.9, 0.6, 0.8], np.float32)  # eosin, and haematoxylin's purple where the label is
    stained = np.where(label[..., None] == 1, np.array([0.4, 0.2, 0.6], np.float32), pink)
    jittered = [augment(stained, label, None, rng, dict(flip=0.0, stain=1.0)) for _ in range(5)]
    for image, aug_label, _ in jittered:
        np.testing.assert_array_equal(aug_label, label)
        assert image.shape == stained.shape and image.dtype == np.float32
        assert 0.0005 < np.abs(image - stained).mean() < 0.1
    assert not np.allclose(jittered[0][0], jittered[1][0])  # drawn anew each time
    grey = np.repeat(stained.mean(axis=2, keepdims=True), 3, axis=2)  # a grey image saved as RGB
    fluorescence = np.where(label[..., None] == 1, np.array([0.1, 0.2, 0.9], np.float32), 0.02)  # blue on black
    for other in (grey, fluorescence):
        np.testing.assert_array_equal(augment(other, label, None, rng, dict(flip=0.0, stain=1.0))[0], other)


def test_recolouring_shuffles_greys_or_inverts_a_bright_rgb_image_and_leaves_grey_ones_alone():
    rng = np.random.default_rng(0)
    label = np.zeros((16, 16), np.uint8)
    bright = np.full((16, 16, 3), (0.9, 0.8, 0.7), np.float32)
    seen = {augment(bright, label, None, rng, dict(flip=0.0, stain=0.0, colour=1.0))[0][0, 0].round(2).tobytes()
            for _ in range(40)}
    expected = {np.array(c, np.float32).round(2).tobytes() for c in
                [(0.9, 0.8, 0.7), (0.9, 0.7, 0.8), (0.8, 0.9, 0.7), (0.8, 0.7, 0.9), (0.7, 0.9, 0.8), (0.7, 0.8, 0.9),
                 (0.8, 0.8, 0.8), (0.1, 0.2, 0.3)]}
    assert seen == expected  # every shuffle, the grey and the inverse, nothing else
    dark = bright - 0.6
    assert all(augment(dark, label, None, rng, dict(flip=0.0, stain=0.0, colour=1.0))[0].max() < 0.35
               for _ in range(20))  # a dark background is never inverted
    grey = np.full((16, 16), 0.3, np.float32)
    np.testing.assert_array_equal(augment(grey, label, None, rng, dict(flip=0.0, colour=1.0))[0], grey)
