import os

import cv2
import numpy as np
import pytest

from biounet.core.files import DataError, list_images
from biounet.data.augment import flip_rotate
from biounet.data.datasets import find_samples, load_dataset
from biounet.data.loader import Sampler, SegmentationDataset, read_image, read_label, resize


def write(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return str(path)


def test_images_are_scaled_to_0_1_and_labels_binarized_with_255_as_cell(tmp_path):
    image = write(tmp_path / "i.png", np.array([[0, 128], [255, 64]] * 8, np.uint8))
    label = write(tmp_path / "l.png", np.array([[0, 255]] * 16, np.uint8))
    assert read_image(image).dtype == np.float32
    assert read_image(image).min() == 0.0 and read_image(image).max() == 1.0
    assert set(np.unique(read_label(label))) == {0, 1}
    assert read_label(label)[0, 1] == 1


def test_labels_holding_0_and_1_are_read_as_they_are(tmp_path):
    label = write(tmp_path / "l.png", np.array([[0, 1]] * 16, np.uint8))
    assert read_label(label).sum() == 16


def test_a_label_with_other_values_stops_with_an_error_naming_the_file_and_values(tmp_path):
    label = write(tmp_path / "grey.png", np.array([[0, 128, 255]] * 16, np.uint8))
    with pytest.raises(DataError, match=r"grey\.png: label is not binary: values 0, 128, 255"):
        read_label(label)


def test_images_and_labels_are_paired_by_file_name_not_by_order(tmp_path):
    for name in ["b.png", "a.png", "c.png"]:
        write(tmp_path / "img" / name, np.zeros((16, 16), np.uint8))
    for name in ["c.png", "a.png", "b.tif"]:
        write(tmp_path / "lab" / name, np.zeros((16, 16), np.uint8))
    samples = find_samples(str(tmp_path / "img"), "pairs", str(tmp_path / "lab"))
    assert [(s.name, os.path.basename(s.source)) for s in samples] == [("a", "a.png"), ("b", "b.png"), ("c", "c.png")]
    assert samples[1].read_label().shape == (16, 16)  # b.png's label is b.tif


def test_images_are_listed_in_natural_order(tmp_path):
    for i in [10, 2, 1]:
        write(tmp_path / f"{i}.png", np.zeros((16, 16), np.uint8))
    assert [os.path.basename(p) for p in list_images(tmp_path)] == ["1.png", "2.png", "10.png"]


def test_an_image_without_a_label_stops_with_an_error_naming_it(tmp_path):
    write(tmp_path / "img" / "a.png", np.zeros((16, 16), np.uint8))
    write(tmp_path / "img" / "lonely.png", np.zeros((16, 16), np.uint8))
    write(tmp_path / "lab" / "a.png", np.zeros((16, 16), np.uint8))
    with pytest.raises(DataError, match=r"lonely\.png: no label named lonely"):
        find_samples(str(tmp_path / "img"), "pairs", str(tmp_path / "lab"))


def test_a_label_of_another_size_than_its_image_stops_with_an_error_naming_both(tmp_path):
    write(tmp_path / "img" / "a.png", np.zeros((16, 16), np.uint8))
    write(tmp_path / "lab" / "a.png", np.zeros((16, 20), np.uint8))
    with pytest.raises(DataError, match=r"lab/a\.png: label is 20x16 but its image .*img/a\.png is 16x16"):
        load_dataset(find_samples(str(tmp_path / "img"), "pairs", str(tmp_path / "lab")))


def test_a_corrupt_image_stops_with_an_error_naming_it(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(DataError, match=r"broken\.png: not a readable image"):
        read_image(str(bad))


def test_a_missing_image_stops_with_an_error_naming_it(tmp_path):
    with pytest.raises(DataError, match=r"gone\.png: file not found"):
        read_image(str(tmp_path / "gone.png"))


def test_an_empty_folder_stops_with_an_error_naming_it(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: folder holds no images"):
        list_images(tmp_path / "empty")


def test_augmentation_moves_image_and_label_identically_and_covers_all_8_orientations():
    rng = np.random.default_rng(0)
    image = rng.random((8, 8)).astype(np.float32)
    label = (image > 0.5).astype(np.uint8)
    seen = set()
    for _ in range(200):
        aug_image, aug_label, _ = flip_rotate((image, label, None), rng)
        np.testing.assert_array_equal(aug_label, (aug_image > 0.5).astype(np.uint8))
        seen.add(aug_image.tobytes())
    assert len(seen) == 8


def test_batches_are_float_n_1_h_w_crops_with_binary_labels():
    rng = np.random.default_rng(0)
    images = [rng.random((40, 50)).astype(np.float32) for _ in range(5)]
    labels = [(im > 0.5).astype(np.uint8) for im in images]
    sampler = Sampler(SegmentationDataset(images, labels), crop=32, augment={"flip": 1.0})
    shapes = [(x.shape, y.shape, x.dtype, set(np.unique(y)))
              for x, y, _ in (sampler.batch(indices, (0, epoch)) for epoch, indices in enumerate(([0, 1], [2, 3], [4])))]
    assert [s[0] for s in shapes] == [(2, 1, 32, 32), (2, 1, 32, 32), (1, 1, 32, 32)]
    assert all(s[2] == np.float32 and s[3] <= {0.0, 1.0} for s in shapes)


def test_images_of_different_sizes_in_one_batch_stop_with_a_hint_to_crop():
    images = [np.zeros((32, 32), np.float32), np.zeros((40, 32), np.float32)]
    sampler = Sampler(SegmentationDataset(images, [im.astype(np.uint8) for im in images]))
    with pytest.raises(DataError, match="cannot share a batch: train with --crop"):
        sampler.batch([0, 1], (0, 0))


@pytest.mark.parametrize("channels", [3, 5])  # a network for objects' 3 or 5 class probabilities
def test_resizing_keeps_every_channel_and_each_as_if_resized_alone(channels):
    maps = np.random.default_rng(0).random((20, 30, channels)).astype(np.float32)
    resized = resize(maps, (40, 60))
    assert resized.shape == (40, 60, channels) and resized.dtype == np.float32
    for c in range(channels):
        np.testing.assert_allclose(resized[..., c], resize(maps[..., c], (40, 60)), atol=1e-6)
