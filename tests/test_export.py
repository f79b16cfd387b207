"""export.py: a checkpoint out as ONNX (checked with onnxruntime) and as a bioimage.io model package
(validated by bioimageio.spec and run by bioimageio.core, as bioimage.io's tools do). Export runs on
PyTorch; on OneFlow it says so in one line."""
import json
import os

import numpy as np
import pytest
import tifffile

from biounet.data.loader import normalize
from biounet.model import backend
from biounet.model.checkpoint import build_model
from biounet.prediction.inference import predict_probability
from conftest import run_script, tiny_checkpoint

ON_TORCH = backend.NAME == "torch"
needs_torch = pytest.mark.skipif(not ON_TORCH, reason="export runs on PyTorch: checked in the suite's PyTorch run")


def two_channel_sample(path, shape=(64, 80)):
    """A 16-bit two-channel TIFF with a bright square in the first channel."""
    rng = np.random.default_rng(1)
    image = rng.integers(100, 400, (2, *shape)).astype(np.uint16)
    image[0, 16:40, 20:50] += 3000
    tifffile.imwrite(path, image)
    return np.moveaxis(image, 0, -1)


@pytest.mark.skipif(ON_TORCH, reason="the refusal is OneFlow's; PyTorch exports (tests below)")
def test_export_on_oneflow_says_to_use_pytorch(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "tiny.npz")
    result = run_script("biounet-export", checkpoint, "--onnx", tmp_path / "m.onnx", cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {checkpoint}: export runs on PyTorch (UNET_BACKEND=torch; bash export.sh sets it)"
    assert not os.path.exists(tmp_path / "m.onnx")


@needs_torch
def test_onnx_export_predicts_as_the_project_does_at_any_size(tmp_path):
    import onnxruntime
    checkpoint = tiny_checkpoint(tmp_path / "tiny.npz", n_channels=2, n_classes=1,
                                 data=dict(normalize="percentile", percentiles=[1.0, 99.8]))
    raw = two_channel_sample(tmp_path / "sample.tif")
    out = run_script("biounet-export", checkpoint, "--onnx", tmp_path / "m.onnx", "--sample", tmp_path / "sample.tif",
                     cwd=tmp_path).stdout
    assert "within" in out
    model, _ = build_model(checkpoint, "cpu")
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for height, width in ((64, 80), (50, 70), (96, 33)):  # sizes the export never saw, odd ones too
        image = normalize(raw[:height, :width] if height <= 64 else np.tile(raw, (2, 1, 1))[:height, :width],
                          "percentile")
        expected = predict_probability(model, image, "cpu", tile=0)
        output = session.run(None, {"raw": image.transpose(2, 0, 1)[None].copy()})[0]
        assert output.shape == (1, 1, height, width)
        assert np.abs(output[0, 0] - expected).max() < 1e-4


@needs_torch
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")  # bioimage.io's TorchScript weights still are
def test_bioimageio_package_validates_runs_and_describes_the_preprocessing(tmp_path):
    import yaml
    from bioimageio.core import test_model
    from bioimageio.spec import load_description
    checkpoint = tiny_checkpoint(tmp_path / "three.npz", n_channels=2, n_classes=3,
                                 data=dict(instances=True, normalize="percentile", percentiles=[2.0, 99.5]))
    raw = two_channel_sample(tmp_path / "sample.tif")
    run_script("biounet-export", checkpoint, "--bioimageio", tmp_path / "pkg", "--sample", tmp_path / "sample.tif",
               "--name", "nuclei", "--author", "Ada", cwd=tmp_path)
    assert sorted(os.listdir(tmp_path / "pkg")) == ["README.md", "cover.png", "model.onnx", "model.pt", "rdf.yaml",
                                                   "sample_input.tif", "sample_output.tif", "test_input.npy",
                                                   "test_output.npy"]
    description = load_description(str(tmp_path / "pkg" / "rdf.yaml"), perform_io_checks=True)
    summary = description.validation_summary
    assert summary.status == "valid-format", summary.format()
    for weights in ("onnx", "torchscript"):  # run as bioimage.io tools run it: preprocessing, inference, test output
        ran = test_model(str(tmp_path / "pkg" / "rdf.yaml"), weight_format=weights)
        assert ran.status == "passed", ran.format()
    rdf = yaml.safe_load((tmp_path / "pkg" / "rdf.yaml").read_text())
    assert rdf["inputs"][0]["preprocessing"] == [dict(id="scale_range", kwargs=dict(
        axes=["y", "x"], min_percentile=2.0, max_percentile=99.5))]
    assert rdf["outputs"][0]["axes"][1]["channel_names"] == ["background", "interior", "boundary"]
    assert set(rdf["weights"]) == {"onnx", "torchscript"}
    test_input = np.load(tmp_path / "pkg" / "test_input.npy")
    assert np.array_equal(test_input[0], np.moveaxis(raw, -1, 0).astype(np.float32))  # raw: before preprocessing
    model, _ = build_model(checkpoint, "cpu")
    expected = predict_probability(model, normalize(raw, "percentile", (2.0, 99.5)), "cpu", tile=0)
    test_output = np.load(tmp_path / "pkg" / "test_output.npy")
    assert test_output.shape == (1, 3, 64, 80) and np.abs(test_output[0].transpose(1, 2, 0) - expected).max() < 1e-6
    assert np.allclose(test_output.sum(axis=1), 1, atol=1e-5)  # softmax over the three classes


@needs_torch
def test_bioimageio_export_keeps_a_folder_that_holds_files(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "tiny.npz")
    os.makedirs(tmp_path / "pkg")
    (tmp_path / "pkg" / "mine.txt").write_text("keep")
    result = run_script("biounet-export", checkpoint, "--bioimageio", tmp_path / "pkg", cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {tmp_path}/pkg: folder exists and is not empty; give a new one"
    assert os.listdir(tmp_path / "pkg") == ["mine.txt"]


def test_checkpoints_record_what_export_needs(tmp_path):
    """The normalization export describes comes from the checkpoint (range for checkpoints from before)."""
    from biounet.model.checkpoint import input_normalization, load_checkpoint
    old = tiny_checkpoint(tmp_path / "old.npz")
    new = tiny_checkpoint(tmp_path / "new.npz", data=dict(normalize="zscore", percentiles=[1.0, 99.8]))
    assert input_normalization(load_checkpoint(old)[0]) == ("range", (1.0, 99.8))
    assert input_normalization(load_checkpoint(new)[0]) == ("zscore", (1.0, 99.8))
    assert json.loads(str(np.load(new)["__meta__"]))["data"]["normalize"] == "zscore"
