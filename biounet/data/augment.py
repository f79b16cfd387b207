"""Data augmentation: image (grey or RGB), label and loss weights transformed together; labels keep their values.

Each augmentation happens with its own probability (TrainUnetDataSet.py's --aug-* flags;
`python inspect_data.py IMAGES --augmented out.png` shows samples):
  flip       one of the 8 flips / 90-degree rotations
  affine     rotation (+-15 deg), scale (+-5%), shear (+-0.05), shift (+-5%) (the Keras seed's ranges)
  elastic    the U-Net paper's: displacements on a coarse 3x3 grid, Gaussian with sigma 10 px,
             interpolated bicubically to every pixel
  intensity  brightness (+-0.1), contrast (x0.8-1.2), gamma (0.7-1.4)
  noise      Gaussian, sigma up to 0.05
  blur       Gaussian, sigma 0.5-1.5 px
  stain      stained brightfield images (RGB, coloured, a bright background: H&E histology, IHC):
             the amounts of haematoxylin, eosin and DAB each scaled by 0.9-1.1 and shifted by +-0.01
             (about 7% of the stains in the DSB 2018 H&E images at their 99th percentile; Tellez et
             al. 2018's jitter in HED space); other images (grey, RGB files of equal channels,
             fluorescence on a dark background) are left alone
  colour     RGB images: one of channels shuffled, made grey, or (a bright background: stained
             or bright-field) inverted, so that a network for nuclei sees the other image types'
             look; grey images are left alone
"""

import cv2
import numpy as np
from skimage.color import hed2rgb, rgb2hed

DEFAULT_PROBABILITIES = dict(flip=1.0, affine=0.0, elastic=0.0, intensity=0.0, noise=0.0, blur=0.0, stain=1.0,
                             colour=0.0)
STAINED = 0.02  # an RGB image is coloured where its channels differ by more than this on average


def _remap(array, map_x, map_y, nearest=False):
    return cv2.remap(array, map_x, map_y, cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REFLECT_101)


def _warp(arrays, map_x, map_y):
    """Apply one geometric mapping to (image, label, weights): labels by nearest neighbour."""
    image, label, weights = arrays
    return (_remap(image, map_x, map_y), _remap(label, map_x, map_y, nearest=True),
            None if weights is None else _remap(weights, map_x, map_y))


def _grid(shape):
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    return xs, ys


def affine_maps(shape, rng):
    h, w = shape
    angle = np.deg2rad(rng.uniform(-15, 15))
    scale = rng.uniform(0.95, 1.05)
    shear = rng.uniform(-0.05, 0.05)
    shift = rng.uniform(-0.05, 0.05, 2) * (w, h)
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    inverse = np.array([[cos, -sin + shear], [sin, cos]], np.float32)  # output pixel -> input pixel
    xs, ys = _grid(shape)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    map_x = inverse[0, 0] * (xs - cx) + inverse[0, 1] * (ys - cy) + cx - shift[0]
    map_y = inverse[1, 0] * (xs - cx) + inverse[1, 1] * (ys - cy) + cy - shift[1]
    return map_x.astype(np.float32), map_y.astype(np.float32)


def elastic_maps(shape, rng, sigma=10.0, grid=3):
    h, w = shape
    xs, ys = _grid(shape)
    dx = cv2.resize(rng.normal(0, sigma, (grid, grid)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    dy = cv2.resize(rng.normal(0, sigma, (grid, grid)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    return xs + dx, ys + dy


def flip_rotate(arrays, rng):
    k, flip = int(rng.integers(4)), bool(rng.integers(2))
    out = []
    for a in arrays:
        if a is not None:
            a = np.rot90(a, k)
            a = np.ascontiguousarray(a[:, ::-1] if flip else a)
        out.append(a)
    return tuple(out)


def adjust_intensity(image, rng):
    """Gamma (on the image's own range: normalized images need not lie in [0, 1]), contrast, brightness."""
    gamma = np.exp(rng.uniform(np.log(0.7), np.log(1.4)))
    low, spread = image.min(), max(float(np.ptp(image)), 1e-6)
    image = ((image - low) / spread) ** gamma * spread + low
    mean = image.mean()
    return (image - mean) * rng.uniform(0.8, 1.2) + mean + rng.uniform(-0.1, 0.1)


def is_stained(image):
    """Whether an image in [0, 1] looks like stained brightfield: coloured RGB, mostly bright."""
    return (image.ndim == 3 and image.shape[2] == 3 and float(np.mean(np.ptp(image, axis=2))) > STAINED
            and float(np.median(image)) > 0.5)


def jitter_stains(image, rng):
    """An RGB image in [0, 1] with its stains' amounts (HED space) scaled and shifted at random."""
    stains = rgb2hed(np.clip(image, 0, 1))
    stains = stains * rng.uniform(0.9, 1.1, 3) + rng.uniform(-0.01, 0.01, 3)
    return hed2rgb(stains).astype(np.float32)


def recolour(image, rng):
    """An RGB image in [0, 1] with its channels shuffled, made grey, or, where its background is bright,
    inverted: one of the three at random (shuffled in place of inverting a dark image)."""
    kind = int(rng.integers(3))
    if kind == 1:
        return np.repeat(image.mean(axis=2, keepdims=True), 3, axis=2)
    if kind == 2 and float(np.median(image)) > 0.5:
        return 1 - image
    return np.ascontiguousarray(image[..., rng.permutation(3)])


def augment(image, label, weights, rng, probabilities):
    """(image, label, weights) after the augmentations drawn with `probabilities` (name -> p)."""
    p = {**DEFAULT_PROBABILITIES, **probabilities}
    arrays = (image.astype(np.float32), label.astype(np.uint8), weights)
    if rng.random() < p["flip"]:
        arrays = flip_rotate(arrays, rng)
    if rng.random() < p["affine"]:
        arrays = _warp(arrays, *affine_maps(image.shape[:2], rng))
    if rng.random() < p["elastic"]:
        arrays = _warp(arrays, *elastic_maps(image.shape[:2], rng))
    image, label, weights = arrays
    if rng.random() < p["intensity"]:
        image = adjust_intensity(image, rng)
    if rng.random() < p["noise"]:
        image = image + rng.normal(0, rng.uniform(0, 0.05), image.shape).astype(np.float32)
    if rng.random() < p["blur"]:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.5, 1.5))
    if rng.random() < p["stain"] and is_stained(image):
        image = jitter_stains(image, rng)
    if rng.random() < p["colour"] and image.ndim == 3 and image.shape[2] == 3:
        image = recolour(image, rng)
    return image.astype(np.float32), label, weights  # not clipped: prediction sees the normalized values as they are
