"""Pictures for a person to check data and predictions: overlays, a montage (image | truth | prediction |
errors), VOC's class colours, loss weight maps, a grid of samples."""
import cv2
import numpy as np

MEMBRANE = (255, 200, 0)     # BGR: predicted membranes, tinted cyan-blue
MISSED = (0, 0, 255)         # red: a true membrane predicted as cell (can merge cells)
SPURIOUS = (0, 200, 255)     # orange: a cell pixel predicted as membrane (can split cells)


def voc_palette(n=256):
    """Pascal VOC's colour map: class i -> (r, g, b), as in its devkit."""
    palette = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


def _bgr(image):
    """A [0, 1] grey or RGB image (or a mask) as 8-bit BGR for OpenCV; of other channel counts, the first."""
    image = np.asarray(image, np.float32)
    if image.ndim == 3 and image.shape[2] != 3:
        image = image[..., 0]
    pixels = np.clip(image * 255, 0, 255).astype(np.uint8)
    return cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR if pixels.ndim == 3 else cv2.COLOR_GRAY2BGR)


def class_colors(classes):
    """Class indices (H x W) as a BGR picture in Pascal VOC's colours (0 = black background)."""
    return voc_palette()[classes][..., ::-1].copy()


def _tint(bgr, where, colour, alpha=0.55):
    out = bgr.copy()
    out[where] = (alpha * np.array(colour) + (1 - alpha) * out[where]).astype(np.uint8)
    return out


def overlay(image, pred, truth=None):
    """The [0, 1] image with predicted membranes tinted and, given `truth`, the errors marked.
    Class indices (pred not boolean): every class but 0 tinted in its colour."""
    if pred.dtype != bool:
        picture, where = _bgr(image), pred > 0
        picture[where] = (0.5 * class_colors(pred)[where] + 0.5 * picture[where]).astype(np.uint8)
        return picture
    pred = np.asarray(pred, bool)
    picture = _tint(_bgr(image), ~pred, MEMBRANE)
    return picture if truth is None else _mark_errors(picture, pred, truth)


def outline_objects(picture, objects):
    """The BGR picture with each numbered object's outline drawn in its own colour (VOC's, cycled)."""
    from skimage.segmentation import find_boundaries
    edge = find_boundaries(objects, mode="inner") & (objects > 0)
    out = picture.copy()
    out[edge] = voc_palette()[1 + (objects[edge].astype(np.int64) - 1) % 255][:, ::-1]
    return out


def _mark_errors(picture, pred, truth):
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    return _tint(_tint(picture, pred & ~truth, MISSED, 0.8), ~pred & truth, SPURIOUS, 0.8)


def montage(rows, tile=256):
    """One picture: a row (image | truth | prediction | errors) per (image, pred, truth) triple."""
    lines = []
    for image, pred, truth in rows:
        tiles = [_bgr(image), _bgr(truth), _bgr(pred), _mark_errors(_bgr(image), pred, truth)]
        scale = tile / max(image.shape)
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        lines.append(np.hstack([cv2.resize(t, size, interpolation=cv2.INTER_AREA) for t in tiles]))
    width = max(line.shape[1] for line in lines)
    return np.vstack([np.pad(line, ((0, 4), (0, width - line.shape[1]), (0, 0)), constant_values=255)
                      for line in lines])


def weight_picture(weights):
    """A colour picture of a loss weight map (blue: low, red: high)."""
    scaled = np.clip(weights / max(float(weights.max()), 1e-6) * 255, 0, 255).astype(np.uint8)
    return cv2.applyColorMap(scaled, cv2.COLORMAP_JET)


def grid(pictures, columns=3, tile=256):
    """Pictures (BGR) scaled to `tile` pixels a side and laid out `columns` to a row, gaps white."""
    tiles = [cv2.resize(p, (tile, tile), interpolation=cv2.INTER_AREA) for p in pictures]
    while len(tiles) % columns:
        tiles.append(np.full_like(tiles[0], 255))
    return np.vstack([np.hstack(tiles[i:i + columns]) for i in range(0, len(tiles), columns)])
