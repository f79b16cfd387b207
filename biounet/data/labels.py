"""Numbered objects of a label image: the cells between membranes, the connected regions of a mask."""
import numpy as np
from scipy import ndimage
from skimage.measure import label as connected

FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


def cells(mask):
    """4-connected components of the cell pixels (1, 2, ...); membranes are 0."""
    return ndimage.label(np.asarray(mask, bool), FOUR_CONNECTED)[0]


def connected_objects(mask, connectivity=2):
    """Numbered objects of a mask: its connected regions (connectivity 1: 4-neighbours, 2: 8)."""
    return renumber(connected(np.asarray(mask) > 0, connectivity=connectivity))


def renumber(objects):
    """Labels 1..N (in the order of the old numbers) as uint16; 0 stays background."""
    values, inverse = np.unique(objects, return_inverse=True)
    numbers = np.arange(len(values)) + (0 if values[0] == 0 else 1)
    if len(values) > 65536:
        raise ValueError(f"{len(values) - 1} objects do not fit a 16-bit label image")
    return numbers[inverse].reshape(objects.shape).astype(np.uint16)
