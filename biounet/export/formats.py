"""A checkpoint out as ONNX and as a bioimage.io model package, each checked against the project's
own prediction.
"""
import copy
import hashlib
import os
import shutil
import tempfile

import numpy as np
import tifffile

from biounet.core.files import DataError, atomic_write, write_png
from biounet.data.loader import match_channels, normalize, read_raw_image, resize
from biounet.evaluation.instances import object_class_names
from biounet.model import backend
from biounet.model.checkpoint import CheckpointError, build_model, input_normalization
from biounet.model.meta import TrainingData
from biounet.model.unet import smallest_side
from biounet.prediction.inference import predict_probability

EXPORT_TOLERANCE = 1e-4
OPSET = 17
SIZE_STEP = 16  # tiles a consumer picks: multiples of the U-Net's four poolings
U_NET_PAPER = dict(text="Ronneberger, Fischer, Brox. U-Net: Convolutional Networks for Biomedical Image "
                        "Segmentation. MICCAI 2015", doi="10.1007/978-3-319-24574-4_28")


class Probabilities(backend.flow.nn.Module):
    """What an exported file computes: the network on a normalized image, then sigmoid or softmax."""

    def __init__(self, model, input_scale=1.0):
        super().__init__()
        self.model, self.input_scale, self.softmax = model, input_scale, model.n_classes > 1

    def forward(self, image):
        logits = self.model(image * self.input_scale)
        return backend.flow.softmax(logits, dim=1) if self.softmax else backend.flow.sigmoid(logits)


def spatial_mean(x):
    """The mean over height and width, row by row then over the rows: onnxruntime sums a whole
    image's values in one float32 pass, which loses digits on large images."""
    return x.mean(dim=3, keepdim=True).mean(dim=2, keepdim=True)


class TwoPassInstanceNorm(backend.flow.nn.Module):
    """InstanceNorm2d (affine) as explicit means (spatial_mean), exported so: with onnxruntime's own
    InstanceNormalization the probabilities of a 640x512 DSB image were 2e-4 off (PyTorch float32: 1e-6
    from float64); so, 3e-6 (BENCHMARKS.md)."""

    def __init__(self, norm):
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps

    def forward(self, x):
        centred = x - spatial_mean(x)
        scale = backend.flow.rsqrt(spatial_mean(centred * centred) + self.eps)
        return centred * scale * self.weight[None, :, None, None] + self.bias[None, :, None, None]


def with_two_pass_instance_norm(module):
    """`module` with every InstanceNorm2d replaced by TwoPassInstanceNorm (the same numbers)."""
    for name, child in module.named_children():
        if isinstance(child, backend.flow.nn.InstanceNorm2d):
            setattr(module, name, TwoPassInstanceNorm(child))
        else:
            with_two_pass_instance_norm(child)
    return module


def load_for_export(path):
    """(Probabilities module to export, the project's network, checkpoint meta), or a CheckpointError
    saying why it cannot be exported."""
    if backend.NAME != "torch":
        raise CheckpointError(f"{path}: export runs on PyTorch (UNET_BACKEND=torch; bash export.sh sets it)")
    model, meta = build_model(path, "cpu")
    if model.padding == "valid":
        raise CheckpointError(f"{path}: the unpadded U-Net (--padding valid) gives smaller outputs than its "
                              f"inputs; export supports the padded one (--padding same)")
    exported = with_two_pass_instance_norm(copy.deepcopy(model))
    return Probabilities(exported, meta.get("input_scale", 1.0)).eval(), model, meta


def sample_image(path, channels, side):
    """(raw image H x W x C, its name): --sample, or a reproducible random 8-bit image."""
    if path:
        raw = match_channels(read_raw_image(path), channels, path)  # grey and RGB fit either, as in prediction
        raw = raw[..., None] if raw.ndim == 2 else raw
        if min(raw.shape[:2]) < side:
            raise DataError(f"{path}: image smaller than {side} pixels a side, the least the network takes")
        return raw, os.path.basename(path)
    return np.random.default_rng(0).integers(0, 256, (side * 2, side * 2, channels)).astype(np.uint8), "random"


def project_prediction(model, meta, normalized):
    """The project's own prediction (inference.py) of a normalized H x W x C image, as 1 x N x H x W."""
    image = normalized[..., 0] if normalized.shape[2] == 1 else normalized
    prob = predict_probability(model, image, "cpu", meta.get("input_scale", 1.0), tile=0)
    return (prob[None, None] if prob.ndim == 2 else prob.transpose(2, 0, 1)[None]).astype(np.float32)


def write_onnx(module, path, channels, side):
    example = backend.flow.zeros(1, channels, side, side)
    dynamic = {0: "batch", 2: "height", 3: "width"}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        backend.flow.onnx.export(module, example, os.path.join(scratch, "model.onnx"), input_names=["raw"],
                          output_names=["probability"], dynamic_axes={"raw": dynamic, "probability": dynamic},
                          opset_version=OPSET, dynamo=False)
        os.replace(os.path.join(scratch, "model.onnx"), path)


def write_torchscript(module, path, channels, side):
    traced = backend.flow.jit.trace(module, backend.flow.zeros(1, channels, side, side))
    atomic_write(path, lambda f: backend.flow.jit.save(traced, f))


def onnx_output(path, batch):
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {"raw": batch})[0]


def torchscript_output(path, batch):
    with backend.flow.no_grad():
        return backend.flow.jit.load(path)(backend.flow.from_numpy(batch)).numpy()


def check_export(name, output, expected):
    """Stop unless an exported file's output matches the project's prediction to EXPORT_TOLERANCE."""
    difference = float(np.abs(output - expected).max()) if output.shape == expected.shape else float("inf")
    if not difference <= EXPORT_TOLERANCE:
        raise CheckpointError(f"{name}: exported output differs from the project's prediction by {difference:.2g} "
                              f"(shape {output.shape}, expected {expected.shape})")
    return difference


def preprocessing(meta, raw_dtype):
    """bioimage.io preprocessing doing what dataloader.normalize does for the checkpoint."""
    method, (low, high) = input_normalization(meta)
    if method == "percentile":
        return [dict(id="scale_range", kwargs=dict(axes=["y", "x"], min_percentile=low, max_percentile=high))]
    if method == "zscore":
        return [dict(id="zero_mean_unit_variance", kwargs=dict(axes=["y", "x"]))]
    top = float(np.iinfo(raw_dtype).max) if np.issubdtype(raw_dtype, np.integer) else 1.0
    return [dict(id="scale_linear", kwargs=dict(gain=1.0 / top, offset=0.0))]


def output_names(meta):
    classes = meta["model"]["n_classes"]
    if TrainingData.of(meta).instances:
        return list(object_class_names(TrainingData.of(meta).object_target))
    return ["foreground"] if classes == 1 else [f"class{i}" for i in range(classes)]


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def cover(normalized, prob):
    """A 2:1 picture: the sample's first channel beside the first output channel that is not background."""
    grey = np.clip(normalized[..., 0], 0, 1)
    shown = prob[0, 0] if prob.shape[1] == 1 else 1 - prob[0, 0]
    return (np.concatenate([grey, shown], axis=1) * 255).round().astype(np.uint8)


def rdf(meta, name, author, license_name, files, raw, side):
    """The bioimage.io model description (format 0.5) of the package's `files`."""
    config = meta.get("config", {})
    channels = [f"channel{i}" for i in range(raw.shape[2])]
    space = [dict(type="space", id=axis, size=dict(min=side, step=SIZE_STEP)) for axis in ("y", "x")]
    same_size = [dict(type="space", id=axis, size=dict(tensor_id="raw", axis_id=axis)) for axis in ("y", "x")]
    trained_on = config.get("data_path", "unknown data")
    return dict(
        format_version="0.5.4", type="model", name=name,
        description=f"U-Net ({meta['model']['base']} channels at the top, {meta['model']['norm']} norm) for "
                    f"segmentation, trained with the OneFlow U-Net project on {os.path.basename(str(trained_on))}.",
        authors=[dict(name=author)], cite=[U_NET_PAPER], license=license_name,
        tags=["unet", "segmentation", "2d", "pytorch", "onnx"],
        documentation="README.md", covers=["cover.png"],
        inputs=[dict(id="raw", description=f"image, {len(channels)} channel(s)",
                     axes=[dict(type="batch"), dict(type="channel", channel_names=channels)] + space,
                     test_tensor=dict(source="test_input.npy", sha256=files["test_input.npy"]),
                     sample_tensor=dict(source="sample_input.tif", sha256=files["sample_input.tif"]),
                     data=dict(type="float32"), preprocessing=preprocessing(meta, raw.dtype))],
        outputs=[dict(id="probability", description="probability of each class per pixel",
                      axes=[dict(type="batch"), dict(type="channel", channel_names=output_names(meta))] + same_size,
                      test_tensor=dict(source="test_output.npy", sha256=files["test_output.npy"]),
                      sample_tensor=dict(source="sample_output.tif", sha256=files["sample_output.tif"]),
                      data=dict(type="float32", range=[0.0, 1.0]))],
        weights=dict(torchscript=dict(source="model.pt", sha256=files["model.pt"],
                                      pytorch_version=backend.flow.__version__.split("+")[0]),
                     onnx=dict(source="model.onnx", sha256=files["model.onnx"], opset_version=OPSET,
                               parent="torchscript")),  # both traced from the same PyTorch module
        training_data=dict(type="dataset", format_version="0.3.0", name=os.path.basename(str(trained_on)) or "data",
                           description=f"{config.get('data_format', 'images')} data at {trained_on}, normalized by "
                                       f"{input_normalization(meta)[0]}", authors=[dict(name=author)],
                           cite=[U_NET_PAPER], license=license_name),
        config=dict(unet=dict(model=meta["model"], data=meta.get("data", {}))),
    )


def readme(meta, name):
    method, (low, high) = input_normalization(meta)
    norm = f"the {low:g}th and {high:g}th percentiles of each channel mapped to 0 and 1" if method == "percentile" \
        else "each channel to mean 0 and standard deviation 1" if method == "zscore" else "divided by the type's range"
    return (f"# {name}\n\nA U-Net for 2D segmentation, exported from the OneFlow U-Net project.\n\n"
            f"- Input: a float32 image, batch x channel x y x x, normalized per image: {norm}.\n"
            f"- Output: per-pixel probabilities of {', '.join(output_names(meta))} (same size as the input).\n"
            f"- Sides of at least {smallest_side(meta['model']['norm'])} pixels; any size works, "
            f"multiples of {SIZE_STEP} avoid padding inside the network.\n"
            + (f"- Trained on images resized to {size}x{size}: resize yours to that, and the probabilities back.\n"
               if (size := TrainingData.of(meta).img_size) else "") +
            f"- Network: {meta['model']}.\n\n# Validation\n\nThe project checked the ONNX and TorchScript weights "
            f"against its own prediction of the test input to {EXPORT_TOLERANCE:g} (test_input.npy, test_output.npy); "
            f"its own scores of the network are in its training log.\n")


def write_package(folder, module, meta, raw, normalized, expected, name, author, license_name, side):
    """A bioimage.io model package in `folder` (written beside, then moved in place: all or nothing);
    returns how far its ONNX and TorchScript outputs are from `expected`."""
    import yaml
    if os.path.exists(folder) and os.listdir(folder):
        raise DataError(f"{folder}: folder exists and is not empty; give a new one")
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=".tmp-bioimageio-")
    try:
        path = lambda file: os.path.join(staging, file)  # noqa: E731
        write_onnx(module, path("model.onnx"), raw.shape[2], side)
        write_torchscript(module, path("model.pt"), raw.shape[2], side)
        batch = normalized.transpose(2, 0, 1)[None].astype(np.float32)
        differences = (check_export("model.onnx", onnx_output(path("model.onnx"), batch), expected),
                       check_export("model.pt", torchscript_output(path("model.pt"), batch), expected))
        np.save(path("test_input.npy"), raw.transpose(2, 0, 1)[None].astype(np.float32))
        np.save(path("test_output.npy"), expected)
        tifffile.imwrite(path("sample_input.tif"), raw.transpose(2, 0, 1))
        tifffile.imwrite(path("sample_output.tif"), expected[0])
        write_png(path("cover.png"), cover(normalized, expected))
        with open(path("README.md"), "w") as f:
            f.write(readme(meta, name))
        files = {file: sha256(path(file)) for file in ("model.onnx", "model.pt", "test_input.npy", "test_output.npy",
                                                       "sample_input.tif", "sample_output.tif")}
        with open(path("rdf.yaml"), "w") as f:
            yaml.safe_dump(rdf(meta, name, author, license_name=license_name, files=files, raw=raw, side=side), f,
                           sort_keys=False)
        if os.path.isdir(folder):
            os.rmdir(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return differences


def export(args):
    module, model, meta = load_for_export(args.checkpoint)
    side = smallest_side(meta["model"]["norm"])
    raw, sample_name = sample_image(args.sample, meta["model"]["n_channels"], side)
    trained_size = TrainingData.of(meta).img_size
    if trained_size:  # the network saw every image resized to this square: so do its test tensors
        raw = resize(raw, (trained_size, trained_size)).reshape(trained_size, trained_size, -1)
        print(f"note: trained on images resized to {trained_size}x{trained_size} (--img-size): the exported network "
              f"wants them so (its README says it)")
    normalized = normalize(raw, *input_normalization(meta), args.sample or "sample")
    expected = project_prediction(model, meta, normalized)
    batch = normalized.transpose(2, 0, 1)[None].astype(np.float32)
    if args.onnx:
        write_onnx(module, args.onnx, raw.shape[2], side)
        difference = check_export(args.onnx, onnx_output(args.onnx, batch), expected)
        print(f"wrote {args.onnx}: onnxruntime's output of {sample_name} ({raw.shape[1]}x{raw.shape[0]}) "
              f"within {difference:.1e} of the project's prediction")
    if args.bioimageio:
        name = args.name or f"U-Net {os.path.basename(str(meta.get('config', {}).get('data_path', ''))) or 'model'}"
        onnx, torchscript = write_package(args.bioimageio, module, meta, raw=raw, normalized=normalized,
                                          expected=expected, name=name, author=args.author,
                                          license_name=args.license, side=side)
        print(f"wrote {args.bioimageio}/rdf.yaml with ONNX and TorchScript weights (their outputs of {sample_name} "
              f"within {onnx:.1e} and {torchscript:.1e} of the project's prediction), test tensors, cover and README")
