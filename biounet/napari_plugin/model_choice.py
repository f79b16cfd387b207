"""The model the plugin segments with, shared by its widgets and its reader: a checkpoint loaded by
dragging it onto the viewer, chosen in the Segment widget, or just trained by the Train widget; and
what the widgets share besides."""
from typing import Optional

from psygnal import Signal


class ModelChoice:
    """The chosen checkpoint's path; `changed` is emitted with it when another is chosen."""
    changed = Signal(str)

    def __init__(self):
        self.checkpoint: Optional[str] = None

    def choose(self, checkpoint):
        self.checkpoint = str(checkpoint)
        self.changed.emit(self.checkpoint)


CHOSEN = ModelChoice()


def listen(widget, signal, callback):
    """callback connected to signal while the magicgui `widget` is shown: its Qt widget may go (the
    dock closed) before the viewer's events or CHOSEN stop firing."""
    signal.connect(callback)
    widget.native.destroyed.connect(lambda: signal.disconnect(callback))


def one_line(error):
    """What napari's notification says of an error: its first line, never a traceback."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
