"""The Python API (biounet/api.py) gives what the scripts give: the same masks, probabilities,
objects, stores, weights and scores, arrays in and out, and nothing written unless asked."""
import os
import subprocess
import sys
import threading

import cv2
import numpy as np
import pytest
import tifffile
import zarr

import biounet
from biounet.model.checkpoint import load_checkpoint
from conftest import run_script, tiny_checkpoint, write_dataset


def read(path):
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


@pytest.fixture
def checkpoint(tmp_path):
    return tiny_checkpoint(tmp_path / "tiny.npz", norm="batch")


def test_predict_gives_the_mask_probabilities_and_objects_the_script_writes(dataset, checkpoint, tmp_path):
    run_script("predict_unet_test.py", "--checkpoint", checkpoint, "--test-data-path", f"{dataset}/test_image",
               "--save-res-path", "masks", "--save-prob", "--prob-path", "prob", "--prob-bits", 32,
               "--instance-path", "objects", "--workers", 1, cwd=tmp_path)
    model = biounet.load_model(checkpoint, device="cpu")
    before = sorted(os.listdir(tmp_path))
    for name in sorted(os.listdir(f"{dataset}/test_image")):
        result = model.predict(read(f"{dataset}/test_image/{name}"))
        assert np.array_equal(result.mask, read(tmp_path / "masks" / name))
        assert np.array_equal(result.probabilities, tifffile.imread(tmp_path / "prob" / name.replace(".png", ".tif")))
        assert np.array_equal(result.objects, read(tmp_path / "objects" / name))
    assert sorted(os.listdir(tmp_path)) == before  # the API wrote nothing


def test_an_image_is_the_same_with_its_channels_first_or_last_and_at_any_bit_depth(checkpoint):
    model = biounet.load_model(tiny_checkpoint(os.path.dirname(checkpoint) + "/rgb.npz", n_channels=3),
                               device="cpu")
    rgb = np.random.default_rng(0).integers(0, 255, (48, 56, 3)).astype(np.uint8)
    last = model.predict(rgb, tta=False)
    assert np.array_equal(model.predict(rgb.transpose(2, 0, 1), tta=False).mask, last.mask)
    assert np.array_equal(model.predict(np.moveaxis(rgb, 2, 1), channel_axis=1, tta=False).mask, last.mask)
    assert np.array_equal(model.predict(rgb.astype(np.uint16) * 257, tta=False).mask, last.mask)
    with pytest.raises(ValueError, match=r"image: shape \(20, 48, 56\) is a stack"):
        model.predict(np.zeros((20, 48, 56), np.uint8))


def test_a_stack_is_each_slice_predicted_alone(checkpoint):
    model = biounet.load_model(checkpoint, device="cpu")
    stack = np.random.default_rng(1).integers(0, 4095, (3, 40, 48)).astype(np.uint16)
    result = model.predict_stack(stack, tta=False)
    assert result.mask.shape == result.objects.shape == result.probabilities.shape == (3, 40, 48)
    for z in range(3):
        assert np.array_equal(result.mask[z], model.predict(stack[z], tta=False).mask)


def test_predict_blocks_writes_the_stores_the_script_writes_only_where_asked(checkpoint, tmp_path):
    import dask.array
    volume = np.random.default_rng(2).integers(0, 255, (2, 70, 90)).astype(np.uint8)
    path = str(tmp_path / "vol.zarr")
    zarr.save_array(path, volume, chunks=(1, 32, 32))
    run_script("predict_unet_test.py", "--checkpoint", checkpoint, "--test-data-path", path, "--save-res-path",
               "script/masks", "--instance-path", "script/objects", "--block", 32, "--no-tta", "--workers", 1,
               cwd=tmp_path)
    model = biounet.load_model(checkpoint, device="cpu")
    for source in (path, dask.array.from_array(volume, chunks=(1, 32, 32))):
        out = tmp_path / ("api-path" if isinstance(source, str) else "api-dask")
        stores = model.predict_blocks(source, out, block=32, tta=False)
        assert sorted(stores) == ["masks", "objects", "probabilities"]
        for kind, folder in (("masks", "masks"), ("objects", "objects")):
            assert np.array_equal(stores[kind][:], zarr.open_array(str(tmp_path / "script" / folder / "vol.ome.zarr" /
                                                                     "0"))[:]), kind


def test_train_from_arrays_learns_the_weights_the_script_learns_from_the_same_files(tmp_path):
    data = write_dataset(tmp_path / "data", n_train=4, n_test=0, size=48)
    flags = dict(base=4, crop=32, epochs=2, loader_workers=0, calibrate=False)
    run_script("TrainUnetDataSet.py", "--data-path", f"{data}/train_image", "--label-path", f"{data}/train_label",
               "--checkpoint-dir", "script", "--log", "log.txt", "--progress", "", "--base", 4, "--crop", 32,
               "--epochs", 2, "--loader-workers", 0, "--no-calibrate", cwd=tmp_path)
    names = sorted(os.listdir(f"{data}/train_image"))
    run = biounet.train(images=[read(f"{data}/train_image/{n}") for n in names],
                        labels=[read(f"{data}/train_label/{n}") for n in names],
                        checkpoint_dir=tmp_path / "api", **flags)
    assert run.best == str(tmp_path / "api" / "best.npz") and run.stopped is None and "val_v_rand" in run.scores
    script, api = load_checkpoint(tmp_path / "script" / "last.npz")[1], load_checkpoint(run.last)[1]
    assert script.keys() == api.keys() and all(np.array_equal(script[k], api[k]) for k in script)


def test_training_stops_from_another_thread_after_a_step_and_resumes_to_the_end(tmp_path):
    data = write_dataset(tmp_path / "data", n_train=4, n_test=0, size=48)
    stop, steps = threading.Event(), []

    def progress(event):
        steps.append(event)
        if event["kind"] == "step" and event["step"] == 1:
            stop.set()
    flags = dict(base=4, crop=32, epochs=2, loader_workers=0, calibrate=False, checkpoint_dir=tmp_path / "ck")
    runner = threading.Thread(target=lambda: steps.append(biounet.train(
        f"{data}/train_image", f"{data}/train_label", progress=progress, stop=stop, **flags)))
    runner.start()
    runner.join(timeout=300)
    stopped = steps[-1]
    # asked during step 1's report: the processes agree on it in the next step, which ends the run
    assert stopped.stopped == f"stopped as asked in epoch 1, after step 2 of 3: {tmp_path}/ck/last.npz holds that " \
                              f"state; continue with resume=True"
    assert load_checkpoint(stopped.last)[0]["partial"]["step"] == 2
    finished = biounet.train(f"{data}/train_image", f"{data}/train_label", resume=True, **flags)
    assert finished.stopped is None and load_checkpoint(finished.last)[0]["epoch"] == 2


def test_probability_maps_decided_again_give_what_predict_gives_at_that_threshold(checkpoint):
    model = biounet.load_model(checkpoint, device="cpu")
    image = np.random.default_rng(3).integers(0, 255, (40, 48)).astype(np.uint8)
    maps, diameter = model.probability_maps(image, tta=False)
    for threshold in (0.3, 0.6):
        decided, predicted = model.decide(maps, diameter=diameter, threshold=threshold), \
            model.predict(image, tta=False, threshold=threshold)
        assert np.array_equal(decided.mask, predicted.mask) and np.array_equal(decided.objects, predicted.objects)


def test_predict_blocks_reports_each_block_and_a_stop_from_progress_goes_on_later_to_the_same_stores(
        checkpoint, tmp_path):
    volume = np.random.default_rng(4).integers(0, 255, (1, 64, 64)).astype(np.uint8)
    model, reports = biounet.load_model(checkpoint, device="cpu"), []

    def cancel_after_two(done, total):
        reports.append((done, total))
        if done == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        model.predict_blocks(volume, tmp_path / "cut", block=32, tta=False, progress=cancel_after_two)
    assert reports == [(1, 4), (2, 4)]
    finished = model.predict_blocks(str(tmp_path / "cut" / "input.zarr"), tmp_path / "cut", block=32, tta=False)
    whole = model.predict_blocks(volume, tmp_path / "whole", block=32, tta=False)
    assert np.array_equal(finished["masks"][:], whole["masks"][:])


def test_fine_tuning_starts_from_the_models_weights_and_another_network_is_one_line(tmp_path):
    data = write_dataset(tmp_path / "data", n_train=3, n_test=0, size=48)
    checkpoint = tiny_checkpoint(tmp_path / "tiny.npz", seed=7, norm="batch")  # not the weights seed 0 starts from
    model = biounet.load_model(checkpoint, device="cpu")
    common = dict(crop=32, epochs=1, loader_workers=0, calibrate=False)
    run = biounet.train(f"{data}/train_image", f"{data}/train_label", checkpoint_dir=tmp_path / "tuned", lr=0,
                        **common, **model.fine_tuning())
    start, tuned = load_checkpoint(checkpoint)[1], load_checkpoint(run.last)[1]
    trained = [k for k in start if not np.array_equal(start[k], tuned[k])]
    assert all("running" in k or "num_batches" in k for k in trained)  # learning rate 0: batch statistics only
    with pytest.raises(ValueError, match=r"^--init-from \S+tiny.npz: its network differs from the one the flags "
                                         r"build: base 4 \(this run: 8\)$"):
        biounet.train(f"{data}/train_image", f"{data}/train_label", checkpoint_dir=tmp_path / "other",
                      **common, **dict(model.fine_tuning(), base=8))


def test_a_grey_model_fine_tunes_on_colour_images_as_it_predicts_them(tmp_path):
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 255, (48, 48, 3)).astype(np.uint8) for _ in range(3)]
    labels = [(image[..., 0] > 128).astype(np.uint8) for image in images]
    model = biounet.load_model(tiny_checkpoint(tmp_path / "grey.npz"), device="cpu")
    run = biounet.train(images=images, labels=labels, checkpoint_dir=tmp_path / "tuned", crop=32, epochs=1,
                        calibrate=False, **model.fine_tuning())
    assert load_checkpoint(run.last)[0]["model"]["n_channels"] == 1


def test_evaluate_gives_the_scores_biounet_evaluate_prints(tmp_path):
    rng = np.random.default_rng(3)
    masks = [np.where(rng.random((32, 40)) > 0.5, 255, 0).astype(np.uint8) for _ in range(2)]
    labels = [np.where(rng.random((32, 40)) > 0.4, 255, 0).astype(np.uint8) for _ in range(2)]
    for folder, arrays in (("pred", masks), ("label", labels)):
        os.makedirs(tmp_path / folder)
        for n, array in enumerate(arrays):
            cv2.imwrite(str(tmp_path / folder / f"{n}.png"), array)
    printed = run_script("biounet-evaluate", "pred", "label", "--json", "scores.json", cwd=tmp_path).stdout
    scores = biounet.evaluate(masks, labels, names=["0.png", "1.png"])
    import json
    assert json.loads((tmp_path / "scores.json").read_text())["mean"] == pytest.approx(scores["mean"])
    assert f"{scores['mean']['dice']:.4f}" in printed.splitlines()[-1]


@pytest.mark.parametrize("call, message", [
    (lambda: biounet.train("x", bogus=1), "bogus: not a training flag (see biounet-train --help)"),
    (lambda: biounet.train("x", crop=-3), "argument --crop: -3 is out of range"),
    (lambda: biounet.train(images=[np.zeros((8, 8))]), "give data_path (and label_path), or both images and labels"),
    (lambda: biounet.load_model(), "give a checkpoint, or pretrained=True"),
    (lambda: biounet.PredictionSettings(threshold=2), "threshold 2: must be a probability, 0-1"),
])
def test_bad_arguments_raise_one_line_value_errors(call, message):
    with pytest.raises(ValueError) as raised:
        call()
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def test_the_console_script_predicts_from_any_folder(dataset, checkpoint, tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "biounet-predict")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([script, "--checkpoint", checkpoint, "--test-data-path", f"{dataset}/test_image",
                             "--no-tta", "--workers", "1"], cwd=elsewhere, capture_output=True, text=True, timeout=300,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(elsewhere / "predict_image")) == sorted(os.listdir(f"{dataset}/test_image"))


def test_without_a_framework_the_first_use_names_the_extra_to_install(tmp_path):
    for framework in ("oneflow", "torch"):  # stand before the environment's own: as if neither were installed
        (tmp_path / framework).mkdir()
        (tmp_path / framework / "__init__.py").write_text(
            f"raise ModuleNotFoundError(\"No module named '{framework}'\", name='{framework}')\n")
    env = {**{k: v for k, v in os.environ.items() if k != "UNET_BACKEND"}, "PYTHONPATH": str(tmp_path)}
    code = "import biounet; print('imported'); biounet.load_model('net.npz')"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and result.stdout == "imported\n"
    assert result.stderr == ("error: no deep-learning framework installed: pip install 'biounet[torch]', or "
                             "pip install 'biounet[oneflow]' (CPython 3.9-3.10)\n")


def test_several_checkpoints_predict_as_one_with_their_probabilities_averaged(dataset, tmp_path):
    first, second = (tiny_checkpoint(tmp_path / f"{name}.npz", seed=seed) for seed, name in enumerate("ab"))
    image = read(f"{dataset}/test_image/0.png")
    alone = [biounet.load_model(path, device="cpu").predict(image, tta=False).probabilities for path in (first, second)]
    ensemble = biounet.load_model([first, second], device="cpu")
    assert np.allclose(ensemble.predict(image, tta=False).probabilities, (alone[0] + alone[1]) / 2, atol=1e-5)
    run_script("predict_unet_test.py", "--checkpoint", first, second, "--test-data-path", f"{dataset}/test_image",
               "--save-res-path", "masks", "--no-tta", "--workers", 1, cwd=tmp_path)
    assert np.array_equal(read(tmp_path / "masks" / "0.png"), ensemble.predict(image, tta=False).mask)


def test_checkpoints_of_other_inputs_are_not_averaged(dataset, tmp_path):
    grey, rgb = tiny_checkpoint(tmp_path / "grey.npz"), tiny_checkpoint(tmp_path / "rgb.npz", n_channels=3)
    refused = run_script("predict_unet_test.py", "--checkpoint", grey, rgb, "--test-data-path",
                         f"{dataset}/test_image", cwd=tmp_path, check=False)
    assert refused.returncode == 1 and refused.stderr.strip() == (
        f"error: {rgb}: cannot be averaged with {grey}: they differ in input channels (3 against 1)")
