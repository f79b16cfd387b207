"""The U-Net paper's per-pixel loss weights, which force the network to separate touching cells.

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))     on membrane pixels

w_c balances the class frequencies; d1 and d2 are the distances to the nearest and the second
nearest cell. Picture of one:  python inspect_data.py train_image --weight-map weight_map.png
"""

import numpy as np
from scipy import ndimage

from biounet.data.labels import cells


def class_balance(label):
    """w_c: 1 / (2 x frequency of the pixel's class), so that both classes weigh the same in total."""
    cell_share = float(np.clip(np.mean(label > 0), 1e-6, 1 - 1e-6))
    return np.where(label > 0, 0.5 / cell_share, 0.5 / (1 - cell_share)).astype(np.float32)


def two_nearest_cell_distances(cell_ids, reach):
    """d1, d2: distances of every pixel to its nearest and second-nearest cell (inf beyond `reach`).

    Each cell's distance transform is computed only in its bounding box grown by `reach`: the
    weights vanish farther out, and the work stays proportional to the image, not image x cells."""
    shape = cell_ids.shape
    d1 = np.full(shape, np.inf, np.float32)
    d2 = np.full(shape, np.inf, np.float32)
    for index, box in enumerate(ndimage.find_objects(cell_ids), start=1):
        if box is None:
            continue
        y0, y1 = max(box[0].start - reach, 0), min(box[0].stop + reach, shape[0])
        x0, x1 = max(box[1].start - reach, 0), min(box[1].stop + reach, shape[1])
        distance = ndimage.distance_transform_edt(cell_ids[y0:y1, x0:x1] != index).astype(np.float32)
        near, second = d1[y0:y1, x0:x1], d2[y0:y1, x0:x1]
        second[...] = np.minimum(second, np.maximum(near, distance))
        near[...] = np.minimum(near, distance)
    return d1, d2


def weight_map(label, w0=10.0, sigma=5.0, instances=None):
    """Loss weights (float32, label's shape) for a binary label (1 = cell, 0 = membrane).

    Cells are the label's connected components, or the numbered `instances` where given (DSB
    2018's one mask per nucleus), so that touching objects are told apart too."""
    label = np.asarray(label) > 0
    # Distances beyond `reach` count as infinite; the term they drop is at most w0 exp(-18).
    reach = int(np.ceil(6 * sigma))
    d1, d2 = two_nearest_cell_distances(cells(label) if instances is None else instances, reach)
    border = w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma ** 2))
    return class_balance(label) + np.where(label, 0.0, border).astype(np.float32)
