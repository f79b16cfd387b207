"""Prediction of images, datasets and volumes larger than memory (blockwise, Dask). Imports the layers
below."""
