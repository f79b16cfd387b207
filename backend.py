"""The one place where the deep-learning framework is chosen: OneFlow (default) or PyTorch.

    UNET_BACKEND=oneflow   OneFlow 0.9 (CPython 3.8-3.10)
    UNET_BACKEND=torch     PyTorch
    unset                  OneFlow when it imports, else PyTorch

OneFlow mirrors PyTorch's API, so the rest of the code writes `flow.cat`, `nn.Conv2d`, `F.pad`
against whichever module was imported here, plus the few helpers below where the two differ.
"""
import os
import random

import numpy as np

# Measured on our CPUs: OneFlow's oneDNN path is 1.5-2.5x slower than its own kernels.
os.environ.setdefault("ONEFLOW_ENABLE_ONEDNN_OPTS", "0")
# OneFlow's CUDA build logs warnings about the missing GPU driver and InfiniBand at every start.
os.environ.setdefault("GLOG_minloglevel", "2")

NAME = os.environ.get("UNET_BACKEND", "").strip().lower()
if NAME == "oneflow":
    import oneflow as flow
elif NAME == "torch":
    import torch as flow
elif NAME == "":
    try:
        import oneflow as flow
        NAME = "oneflow"
    except ImportError:
        import torch as flow
        NAME = "torch"
else:
    raise SystemExit(f"error: UNET_BACKEND must be 'oneflow' or 'torch', not {NAME!r}")

nn = flow.nn
F = flow.nn.functional


def default_device():
    # Checked first on purpose: any CUDA call on a GPU-less machine aborts OneFlow (exit 134).
    return "cuda" if flow.cuda.is_available() else "cpu"


def resolve_device(name="auto"):
    if name == "auto":
        return default_device()
    if name.startswith("cuda") and not flow.cuda.is_available():
        raise SystemExit(f"error: --device {name} asked for, but {NAME} sees no CUDA GPU")
    return name


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    flow.manual_seed(seed)


def to_tensor(array, device="cpu", dtype=np.float32):
    """A tensor copy of a numpy array (dtype=None keeps the array's own; 0-d stays 0-d)."""
    return flow.from_numpy(np.array(array, dtype=dtype, order="C")).to(device)


def to_numpy(tensor):
    return tensor.detach().cpu().numpy()
