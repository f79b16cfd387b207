import os
import re
import signal

import cv2
import numpy as np
import pytest

from biounet.model import backend
from biounet.model.unet import UNet
from biounet.prediction import inference
from biounet.prediction.inference import predict_probability
from conftest import run_script, tiny_checkpoint


@pytest.fixture(scope="module")
def model():
    backend.seed_everything(0)
    return UNet(base=4, norm="batch").eval()


def test_prediction_writes_one_binary_mask_per_input_named_after_it(dataset, tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "tiny.npz")
    odd = np.random.default_rng(0).integers(0, 255, (50, 70)).astype(np.uint8)
    cv2.imwrite(f"{dataset}/test_image/odd_size.png", odd)
    run_script("predict_unet_test.py", "--checkpoint", checkpoint,
               "--test-data-path", f"{dataset}/test_image", "--save-res-path", tmp_path / "pred", cwd=tmp_path)
    assert sorted(os.listdir(tmp_path / "pred")) == ["0.png", "1.png", "odd_size.png"]
    for name in os.listdir(tmp_path / "pred"):
        mask = cv2.imread(str(tmp_path / "pred" / name), cv2.IMREAD_UNCHANGED)
        source = cv2.imread(f"{dataset}/test_image/{name}", cv2.IMREAD_UNCHANGED)
        assert mask.shape == source.shape and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}


def test_prediction_without_a_checkpoint_says_how_to_get_one(dataset, tmp_path):
    result = run_script("predict_unet_test.py", "--checkpoint", tmp_path / "none.npz",
                        "--test-data-path", f"{dataset}/test_image", cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path}/none.npz: checkpoint not found (train first, or use --pretrained)"


def test_a_corrupt_test_image_stops_with_its_name_and_keeps_masks_already_written(dataset, tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "tiny.npz")
    os.makedirs(tmp_path / "pred")
    (tmp_path / "pred" / "9.png").write_bytes(b"an earlier result")
    with open(f"{dataset}/test_image/9.png", "wb") as f:
        f.write(b"not an image")
    result = run_script("predict_unet_test.py", "--checkpoint", checkpoint,
                        "--test-data-path", f"{dataset}/test_image", "--save-res-path", tmp_path / "pred",
                        cwd=tmp_path, check=False)
    assert result.returncode != 0 and "test_image/9.png: not a readable image" in result.stderr
    assert (tmp_path / "pred" / "9.png").read_bytes() == b"an earlier result"
    assert sorted(os.listdir(tmp_path / "pred")) == ["0.png", "1.png", "9.png"]


def test_pretrained_weights_offline_fail_with_a_clear_message(dataset, tmp_path):
    result = run_script("predict_unet_test.py", "--pretrained", "--test-data-path", f"{dataset}/test_image",
                        cwd=tmp_path, env={"ISBI_BASE_URL": "http://127.0.0.1:9/"}, check=False)
    assert result.returncode != 0
    assert "error: could not download http://127.0.0.1:9/checkpoints.tar.gz" in result.stderr
    assert "needs the internet once" in result.stderr


def test_prediction_can_save_probability_maps_overlays_and_a_montage(dataset, tmp_path):
    run_script("predict_unet_test.py", "--checkpoint", tiny_checkpoint(tmp_path / "tiny.npz"),
               "--test-data-path", f"{dataset}/train_image", "--save-res-path", tmp_path / "pred",
               "--save-prob", "--prob-path", tmp_path / "prob", "--prob-bits", 16,
               "--overlay-path", tmp_path / "overlay", "--label-path", f"{dataset}/train_label", cwd=tmp_path)
    names = sorted(os.listdir(f"{dataset}/train_image"))
    assert sorted(os.listdir(tmp_path / "prob")) == names
    assert sorted(os.listdir(tmp_path / "overlay")) == sorted(names + ["montage.png"])
    prob = cv2.imread(str(tmp_path / "prob" / "0.png"), cv2.IMREAD_UNCHANGED)
    mask = cv2.imread(str(tmp_path / "pred" / "0.png"), cv2.IMREAD_UNCHANGED)
    assert prob.dtype == np.uint16 and np.array_equal(prob > 32767, mask == 255)
    picture = cv2.imread(str(tmp_path / "overlay" / "0.png"), cv2.IMREAD_UNCHANGED)
    assert picture.shape == mask.shape + (3,)
    montage = cv2.imread(str(tmp_path / "overlay" / "montage.png"))
    assert montage.shape[1] == 4 * 256  # image | truth | prediction | errors


def test_a_large_image_is_predicted_in_bounded_tiles_that_blend_into_the_whole_image_result(model, monkeypatch):
    image = np.random.default_rng(0).random((300, 220)).astype(np.float32)
    whole = predict_probability(model, image, "cpu", tile=0)
    shapes = []
    forward = inference._forward
    monkeypatch.setattr(inference, "_forward", lambda m, im, *a: shapes.append(im.shape) or forward(m, im, *a))
    tiled = predict_probability(model, image, "cpu", tile=128, overlap=48)
    assert max(max(s) for s in shapes) == 128 and len(shapes) == 4 * 3
    assert tiled.shape == whole.shape and np.isfinite(tiled).all()
    assert np.abs(tiled - whole).mean() < 0.01


def test_an_image_within_one_tile_is_predicted_whole(model):
    image = np.random.default_rng(1).random((64, 80)).astype(np.float32)
    np.testing.assert_array_equal(predict_probability(model, image, "cpu", tile=128),
                                  predict_probability(model, image, "cpu", tile=0))


def test_test_time_augmentation_makes_the_prediction_follow_flips_and_rotations_of_the_input(model):
    image = np.random.default_rng(2).random((48, 48)).astype(np.float32)
    prob = predict_probability(model, image, "cpu", tta=True)
    np.testing.assert_allclose(predict_probability(model, image[:, ::-1].copy(), "cpu", tta=True), prob[:, ::-1],
                               atol=1e-5)
    np.testing.assert_allclose(predict_probability(model, np.rot90(image).copy(), "cpu", tta=True), np.rot90(prob),
                               atol=1e-5)
    assert not np.allclose(predict_probability(model, image, "cpu"), prob, atol=1e-5)


def test_images_predicted_by_several_processes_are_those_of_one_process(dataset, tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "tiny.npz")
    cv2.imwrite(f"{dataset}/test_image/2.png", np.random.default_rng(1).integers(0, 255, (40, 72)).astype(np.uint8))
    for workers in (1, 3):
        out = run_script("predict_unet_test.py", "--checkpoint", checkpoint, "--test-data-path",
                         f"{dataset}/test_image", "--save-res-path", tmp_path / f"masks{workers}", "--save-prob",
                         "--prob-path", tmp_path / f"prob{workers}", "--workers", workers, cwd=tmp_path).stdout
        assert ("predicting with 3 processes" in out) == (workers == 3)
        assert [line.split(" -> ")[0] for line in out.splitlines() if " -> " in line] == \
               [f"{dataset}/test_image/{i}.png" for i in range(3)]  # reported in order
    for folder in ("masks", "prob"):
        names = sorted(os.listdir(tmp_path / f"{folder}1"))
        assert names == ["0.png", "1.png", "2.png"] == sorted(os.listdir(tmp_path / f"{folder}3"))
        for name in names:
            assert (tmp_path / f"{folder}1" / name).read_bytes() == (tmp_path / f"{folder}3" / name).read_bytes()


def predict_one_killing_its_worker_once(job, index):
    """The prediction workers' task, except that the first try of image 1 kills its worker (kill -9)."""
    from biounet.prediction import predict
    if index == 1 and not os.path.exists(os.environ["KILL_MARKER"]):
        open(os.environ["KILL_MARKER"], "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return predict._predict_one(job, index)


@pytest.mark.skipif(backend.NAME != "oneflow", reason="processes, not the framework: checked in the suite's OneFlow "
                                                   "run (keeps the suite within its time; the loader's are on both)")
def test_a_prediction_worker_killed_midway_is_replaced_and_every_mask_is_written_as_by_one_process(
        dataset, tmp_path, monkeypatch):
    from biounet.prediction import predict
    checkpoint = tiny_checkpoint(tmp_path / "tiny.npz")
    cv2.imwrite(f"{dataset}/test_image/2.png", np.random.default_rng(1).integers(0, 255, (40, 72)).astype(np.uint8))
    run_script("predict_unet_test.py", "--checkpoint", checkpoint, "--test-data-path", f"{dataset}/test_image",
               "--save-res-path", tmp_path / "undisturbed", "--workers", 1, cwd=tmp_path)
    monkeypatch.setattr(predict, "_predict_one", predict_one_killing_its_worker_once)
    monkeypatch.setenv("KILL_MARKER", str(tmp_path / "killed"))
    result = run_script("predict_unet_test.py", "--checkpoint", checkpoint, "--test-data-path",
                        f"{dataset}/test_image", "--save-res-path", tmp_path / "disturbed", "--workers", 2, cwd=tmp_path)
    assert os.path.exists(tmp_path / "killed")
    assert re.search(r"warning: prediction worker \d+ \(SIGKILL\) died; a new prediction worker makes its work again",
                     result.stderr)
    assert sorted(os.listdir(tmp_path / "disturbed")) == ["0.png", "1.png", "2.png"]
    for name in os.listdir(tmp_path / "disturbed"):
        assert (tmp_path / "disturbed" / name).read_bytes() == (tmp_path / "undisturbed" / name).read_bytes()


@pytest.mark.parametrize("shape", [(64, 64), (48, 80), (40, 56, 3)])
def test_the_eight_views_in_batches_give_what_they_give_one_at_a_time(shape):
    backend.seed_everything(0)
    model = UNet(n_channels=shape[2] if len(shape) == 3 else 1, base=4, norm="instance").eval()
    image = np.random.default_rng(0).random(shape).astype(np.float32)
    alone = predict_probability(model, image, "cpu", tta=True, batch=1)
    for batch in (3, 8):
        assert np.abs(predict_probability(model, image, "cpu", tta=True, batch=batch) - alone).max() < 1e-4


def test_a_compiled_network_gives_what_the_eager_one_gives():
    backend.seed_everything(0)
    model = UNet(base=4, norm="instance").eval()
    image = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    eager = predict_probability(model, image, "cpu", tta=True, batch=8)
    compiled = backend.compiled(model)
    assert compiled.n_channels == 1 and compiled.padding == model.padding  # the network's attributes, as before
    assert np.abs(predict_probability(compiled, image, "cpu", tta=True, batch=8) - eager).max() < 1e-4


def test_test_sh_batches_and_compiles_with_the_same_masks(dataset, tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "net.npz")
    for folder, flags in (("plain", ["--batch", 1]), ("fast", ["--batch", 8, "--compile"])):
        run_script("predict_unet_test.py", "--checkpoint", checkpoint, "--test-data-path", f"{dataset}/test_image",
                   "--save-res-path", tmp_path / folder, "--workers", 1, *flags, cwd=tmp_path)
    assert sorted(os.listdir(tmp_path / "plain")) == sorted(os.listdir(tmp_path / "fast"))
    for name in os.listdir(tmp_path / "plain"):
        assert np.array_equal(cv2.imread(str(tmp_path / "plain" / name)), cv2.imread(str(tmp_path / "fast" / name)))
