"""The napari plugin (napari.yaml): the Segment and Train dock widgets, sample data, and a reader
of checkpoints and a writer of labels for training. Installed with `pip install 'biounet[napari]'`."""
