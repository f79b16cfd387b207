"""What the plugin's tests share: the fixtures of a shown viewer (a hidden one's screenshots are
black) and of napari's notifications, small images, a tiny saved model, waiting for a widget, and
reading a screenshot. (Not a conftest.py: tests/conftest.py is imported by that name.)"""
import numpy as np
import pytest
from napari.utils.notifications import notification_manager

from biounet.data.fetch import synthetic_em_slice
from conftest import tiny_checkpoint


@pytest.fixture
def viewer(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1200, 900)
    return viewer


@pytest.fixture
def notifications():
    said = []
    notification_manager.notification_ready.connect(said.append)
    yield said
    notification_manager.notification_ready.disconnect(said.append)


def em_slice(size, seed=0):
    """A synthetic EM slice (uint8) of size x size pixels."""
    return synthetic_em_slice(size, np.random.default_rng(seed), cell_size=16)[0]


def em_pair(size, seed=0):
    """A synthetic EM slice and its label (255 = cell)."""
    return synthetic_em_slice(size, np.random.default_rng(seed), cell_size=16)


def tiny_model(path):
    """A tiny untrained U-Net saved as a checkpoint; its path."""
    tiny_checkpoint(path)
    return str(path)


def wait_until_idle(qtbot, widget, timeout=120000):
    """Wait until the widget's worker has finished and its Run button is back."""
    qtbot.waitUntil(lambda: widget.worker is None and widget.run_button.enabled, timeout=timeout)
    qtbot.wait(50)


def coloured_share(screenshot):
    """The share of a screenshot's pixels in colour (a labels layer's), not grey or black."""
    rgb = screenshot[..., :3].astype(int)
    return float(np.mean(rgb.max(axis=2) - rgb.min(axis=2) > 40))
