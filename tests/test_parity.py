"""OneFlow and PyTorch run the same model: same weights give the same outputs, checkpoints cross over.

The other framework lives in its own environment (.venv-torch for PyTorch, .venv for OneFlow),
so it runs in a subprocess and the two sides compare through saved arrays.
"""
import os
import subprocess

import numpy as np
import pytest

from biounet.model import backend
from biounet.model.checkpoint import build_model, save_checkpoint
from biounet.model.unet import UNet
from conftest import ROOT

OTHER = "torch" if backend.NAME == "oneflow" else "oneflow"
OTHER_PYTHON = os.path.join(ROOT, ".venv-torch" if OTHER == "torch" else ".venv", "bin", "python")

OTHER_SIDE = """
import sys
import numpy as np
from biounet.model import backend
from biounet.model.checkpoint import build_model, save_checkpoint
from biounet.model.unet import UNet
from parity_helpers import outputs, trained_a_little
ours, x, out = sys.argv[1], np.load(sys.argv[2]), sys.argv[3]
np.save(out + "/theirs_on_our_checkpoint.npy", outputs(build_model(ours, "cpu")[0], x))
model = trained_a_little(UNet(n_channels=1, n_classes=1, bilinear=True, base=8, norm="instance"), seed=1)
save_checkpoint(out + "/theirs.npz", model)
np.save(out + "/theirs.npy", outputs(model, x))
print(backend.NAME)
"""


def other_framework_available():
    if not os.path.exists(OTHER_PYTHON):
        return False
    probe = subprocess.run([OTHER_PYTHON, "-c", f"import {OTHER}"], capture_output=True)
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(not other_framework_available(),
                                reason=f"{OTHER} is not installed in {OTHER_PYTHON} (run_tests.sh installs it)")


@pytest.fixture(scope="module")
def exchange(tmp_path_factory):
    """Our checkpoint + outputs, and the other framework's outputs on it and its own checkpoint."""
    from parity_helpers import outputs, trained_a_little
    out = tmp_path_factory.mktemp("parity")
    x = np.random.default_rng(0).random((2, 1, 64, 80)).astype(np.float32)
    np.save(out / "x.npy", x)
    model = trained_a_little(UNet(n_channels=1, n_classes=1, bilinear=False, base=8), seed=0)
    save_checkpoint(str(out / "ours.npz"), model)
    env = {**os.environ, "UNET_BACKEND": OTHER, "PYTHONPATH": os.path.join(ROOT, "tests") + os.pathsep + ROOT}
    result = subprocess.run([OTHER_PYTHON, "-c", OTHER_SIDE, str(out / "ours.npz"), str(out / "x.npy"), str(out)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == OTHER
    return dict(x=x, ours=outputs(model, x), out=out)


def test_the_same_weights_give_the_same_outputs_on_oneflow_and_pytorch(exchange):
    theirs = np.load(exchange["out"] / "theirs_on_our_checkpoint.npy")
    assert np.abs(theirs - exchange["ours"]).max() <= 1e-4


def test_a_checkpoint_written_by_the_other_framework_loads_here_with_the_same_outputs(exchange):
    from parity_helpers import outputs
    model, meta = build_model(str(exchange["out"] / "theirs.npz"), "cpu")
    assert meta["backend"] == OTHER and meta["model"]["bilinear"] is True and meta["model"]["norm"] == "instance"
    assert np.abs(outputs(model, exchange["x"]) - np.load(exchange["out"] / "theirs.npy")).max() <= 1e-4
