"""Objects: numbered label images of touching nuclei or cells from a network's probabilities,
their measurements, and the object scores of the Data Science Bowl 2018.

A network trained for objects (--instances) predicts background and classes of object pixels,
one of the OBJECT_TARGETS (--object-target): "boundary", three classes, background, interior and
the outer BOUNDARY_WIDTH pixels of every object, where it meets the background or another object;
"touching", the same but the boundary only where an object comes within BOUNDARY_WIDTH of another
(the class of the DSB 2018 winners), so that a lone object is all interior; "distance", each
object's distance to its edge in DISTANCE_LEVELS levels of its largest (the deep watershed
transform's quantized energy, Bai & Urtasun 2017). Its foreground is 1 - background; "interior"
seeds objects at the connected interiors (with distance levels: the upper half) and grows them by
a watershed on the boundary probability (the expected level), the way objects come from networks
trained for touching borders or distances (object_method); for boundaries the distance watershed
of the mask measured better on DSB 2018 (BENCHMARKS.md).

From a one-class foreground map: the mask at a threshold, holes filled, objects smaller than
`min_size` pixels removed, then objects that touch are split by a watershed on the distance to
the background, seeded at its maxima `min_distance` apart ("watershed"). For ISBI membranes the
objects are the cells between the membranes ("cells", cells_of): seeded where the cell probability
is high, grown until they meet in one-pixel lines that the mask keeps as membrane, so that a
threshold which thins membranes (good for pixel error) does not merge neighbouring cells.

Object size (Cellpose's idea): a network trained with --object-size sees every image rescaled so
that its objects' median diameter is STANDARD_DIAMETER pixels (nuclei; cells between membranes:
their training images' median, as membranes a few pixels thin must not shrink away); prediction
estimates the diameter of a new image from the objects of two quick passes (estimate_diameter)
and rescales it alike, and the watershed's seed distance and smallest object follow the diameter
(in_diameters).

Scores of a label image against the true one (objects matched one-to-one by IoU):
  map_05_095  the DSB 2018 metric: for IoU thresholds 0.50, 0.55, ..., 0.95, TP / (TP + FP + FN)
              with TP the objects matched at IoU > t, averaged over the thresholds
  ap50, f1_50 TP / (TP + FP + FN) and 2TP / (2TP + FP + FN) at IoU > 0.5
  aji         aggregated Jaccard index (Kumar et al. 2017)
"""
import io
import zipfile

import numpy as np
from roifile import ImagejRoi
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.measure import find_contours
from skimage.measure import label as connected
from skimage.measure import regionprops_table
from skimage.morphology import remove_small_objects
from skimage.segmentation import watershed

from biounet.data.labels import FOUR_CONNECTED, cells, renumber

THRESHOLDS = np.round(np.arange(0.5, 1.0, 0.05), 2)
METHODS = ("interior", "watershed", "cells")
BOUNDARY_WIDTH = 2  # pixels (Caicedo et al. 2019 used 2; other widths not measured here)
OBJECT_CLASSES = ("background", "interior", "boundary")  # the values 0, 1, 2 of object_classes
OBJECT_TARGETS = ("boundary", "touching", "distance")
DISTANCE_LEVELS = 4  # the classes of object pixels of the "distance" target
MEASUREMENTS = ("label", "area", "centroid", "bbox", "intensity_mean", "eccentricity")
STANDARD_DIAMETER = 24  # pixels: the median object diameter a network trained at an object size sees
SCALES = (0.25, 4.0)  # the rescaling of an image for its object size stays within these factors
PLAUSIBLE = 2.0  # rescaled for its estimated size, an image's objects come out within this factor of the standard
SEED_DISTANCE = 0.5  # the watershed's seeds at least this many diameters apart
SMALLEST_OBJECT = 0.05  # objects of less than this share of the median object's area are dropped


def median_diameter(objects):
    """The diameter in pixels (of a disc of the same area) of the object that holds the median object
    pixel, or None when there are none: the median weighted by area, so that specks and fragments
    (of a first, rough prediction) hardly count."""
    areas = np.sort(np.bincount(np.asarray(objects).ravel())[1:])
    areas = areas[areas > 0]
    if not len(areas):
        return None
    median_area = areas[np.searchsorted(np.cumsum(areas), areas.sum() / 2)]
    return float(np.sqrt(4 * median_area / np.pi))


def size_scale(diameter, standard=STANDARD_DIAMETER):
    """The factor that brings objects `diameter` pixels wide to `standard` (1 where it is unknown), within SCALES."""
    return 1.0 if not diameter else float(np.clip(standard / diameter, *SCALES))


def in_diameters(diameter, min_size=None, min_distance=None):
    """(min_size, min_distance) in pixels: those given, else the shares of the median object
    (SMALLEST_OBJECT of its area, SEED_DISTANCE of its diameter) where `diameter` is known, else 16 and 10."""
    if min_size is None:
        min_size = 16 if not diameter else max(1, round(SMALLEST_OBJECT * np.pi / 4 * diameter ** 2))
    if min_distance is None:
        min_distance = 10 if not diameter else max(1, round(SEED_DISTANCE * diameter))
    return min_size, min_distance


def estimate_diameter(foreground_at, standard=STANDARD_DIAMETER, method="watershed"):
    """(the median object diameter of an image in its own pixels or None, a warning or None), measured
    on the objects (by `method`, watershed or cells) of `foreground_at(scale)`, the foreground
    probability of the image rescaled by `scale`: first at its own scale, then at the scale that first
    estimate asks for, where the objects should come out `standard` pixels wide. Where they do not
    (within a factor PLAUSIBLE), or the first estimate makes one object as wide as half the image (a
    tissue or embryo seen as one blob), the image is also tried at half and twice its scale and the
    scale whose objects come nearest the standard kept; if none is plausible, None (predict at the
    image's own scale). The warning says when the first estimate was overruled."""
    at_own_scale = foreground_at(1.0)
    first = median_diameter(objects_of(at_own_scale, 0.5, method, *in_diameters(None)))
    if first is None:
        return None, None

    def seen_at(scale):  # the median diameter in the pixels of the image rescaled by `scale`
        return median_diameter(objects_of(foreground_at(scale), 0.5, method, *in_diameters(standard)))
    scale = size_scale(first, standard)
    seen = {scale: seen_at(scale)}
    if plausible(seen[scale], standard) and first < min(at_own_scale.shape) / 2:
        return seen[scale] / scale, None
    seen[1.0] = first
    for other in (0.5, 2.0):
        seen.setdefault(other, seen_at(other))
    tried = {scale: width for scale, width in seen.items() if width is not None}
    best = min(tried, key=lambda scale: abs(np.log(tried[scale] / standard)))
    if not plausible(tried[best], standard):
        return None, (f"objects estimated {first:.0f} pixels wide, but at no scale tried do they come out near the "
                      f"{standard:.0f} pixels the network was trained at: predicted at the image's own scale")
    if best == scale:
        return tried[best] / best, None
    return tried[best] / best, (f"objects estimated {first:.0f} pixels wide at first, overruled: at x{best:g} they "
                                f"come out {tried[best]:.0f} pixels wide, nearest the network's {standard:.0f}")


def plausible(width, standard):
    """Whether objects `width` pixels wide are within a factor PLAUSIBLE of the `standard` width."""
    return width is not None and 1 / PLAUSIBLE <= width / standard <= PLAUSIBLE


def object_class_names(target):
    """The classes a network for objects trained for `target` predicts, in the order of its outputs."""
    if target == "distance":
        return ("background",) + tuple(f"distance {k}/{DISTANCE_LEVELS}" for k in range(1, DISTANCE_LEVELS + 1))
    return OBJECT_CLASSES


def distance_levels(objects):
    """uint8 0 background, else 1..DISTANCE_LEVELS: each object pixel's distance to the object's edge
    as a share of the largest in that object, in equal steps (1 at the edge, the top level at its centre)."""
    levels = np.zeros(objects.shape, np.uint8)
    for number, box in enumerate(ndimage.find_objects(objects), start=1):
        if box is None:
            continue
        inside = np.pad(objects[box] == number, 1)
        distance = ndimage.distance_transform_edt(inside)[1:-1, 1:-1]
        level = np.ceil(DISTANCE_LEVELS * distance / distance.max()).clip(1, DISTANCE_LEVELS)
        levels[box] = np.where(objects[box] == number, level, levels[box])
    return levels


def object_classes(objects, target="boundary", width=BOUNDARY_WIDTH):
    """The training target of a network for objects, from numbered objects (0 = background):
    uint8 0 background, 1 interior, 2 boundary: the pixels of an object with another label less than
    `width` pixels away along rows, columns or diagonals; for target "boundary" background or
    another object, for "touching" another object only; for "distance", distance_levels."""
    objects = np.asarray(objects)
    if target == "distance":
        return distance_levels(objects)
    size = 2 * width + 1
    if target == "touching":
        objects = objects.astype(np.int64)
        lowest = ndimage.minimum_filter(np.where(objects > 0, objects, objects.max() + 1), size)  # ignore background
        highest = ndimage.maximum_filter(objects, size)
    else:
        lowest, highest = ndimage.minimum_filter(objects, size), ndimage.maximum_filter(objects, size)
    inside = (lowest == objects) & (highest == objects)
    return np.where(objects > 0, np.where(inside, 1, 2), 0).astype(np.uint8)


def object_method(data_format, instances=False, target=None):
    """How objects come from a network's probabilities where nothing asks otherwise: the cells
    between membranes for ISBI-like data (image folders, TIFFs), interior seeds for a network
    trained for touching borders or distances, else the distance watershed."""
    if data_format in ("pairs", "tiff"):
        return "cells"
    return "interior" if instances and target in ("touching", "distance") else "watershed"


def foreground(prob):
    """The object (cell) probability, H x W, of a one-class map or of the three classes' H x W x 3."""
    return prob if prob.ndim == 2 else 1 - prob[..., 0]


def objects_of(prob, threshold=0.5, method="watershed", min_size=16, min_distance=10, seeds=None):
    """Numbered objects (uint16, 0 = background) of a probability map by `method` (METHODS):
    interior needs the three classes' H x W x 3 map; the others take either. `seeds`: cells_of's."""
    if method == "interior":
        return split_by_interior(prob, threshold, min_size)
    if method == "cells":
        return without_small(renumber(cells_of(foreground(prob), threshold, seeds)), min_size)
    return split_objects(foreground(prob), threshold, min_size, min_distance)


def seeded_cells(prob, seed_threshold, seed_size=0):
    """Cells (numbered; 0: the one-pixel lines between them) of a cell probability map, grown by a
    4-connected watershed of the membrane probability from the 4-connected regions above
    `seed_threshold` of at least `seed_size` pixels (smaller ones are specks inside a cell, which
    would split it); all 0 without a seed."""
    seeds = cells(prob > seed_threshold)
    if seed_size:
        seeds = without_small(seeds, seed_size)
    if seeds.max() == 0:
        return seeds
    # Only the pixels between seeds and the seed pixels next to them can change: flood that band (faster).
    band = ndimage.binary_dilation(seeds == 0, FOUR_CONNECTED)
    flooded = watershed(1.0 - prob, np.where(band, seeds, 0), mask=band, connectivity=1, watershed_line=True)
    return np.where(band, flooded, seeds)


def cells_of(prob, threshold=0.5, seeds=None):
    """Cells between membranes (numbered, 0 = membrane) of a cell probability map: seeded_cells
    from `seeds`, (seed threshold, least seed size) (None: `threshold`, any size), each kept where
    the probability is above `threshold`, so that the lines where they meet stay membrane where the
    threshold thins it. Without a seed, the 4-connected regions above `threshold` (cells touch
    diagonally across a membrane one pixel thin)."""
    segments = seeded_cells(prob, *(seeds or (threshold, 0)))
    if segments.max() == 0:
        return connected(prob > threshold, connectivity=1)
    return np.where(prob > threshold, segments, 0)


def mask_of(prob, threshold=0.5, seeds=None):
    """The one-class mask (bool) of a cell probability map: above `threshold`; with `seeds` (membranes:
    cells_of's), the pixels of cells_of, so that the lines between cells stay membrane."""
    return prob > threshold if seeds is None else cells_of(prob, threshold, seeds) > 0


def _mask(prob, threshold, min_size):
    return remove_small_objects(ndimage.binary_fill_holes(prob > threshold), min_size)


def _flood(elevation, seeds, components, min_size):
    """Watershed of `elevation` from numbered `seeds` over the mask's numbered `components`; a
    component without a seed (thin objects have no distance maximum, small ones no interior) is one object."""
    mask = components > 0
    unseeded = np.isin(components, np.setdiff1d(np.arange(1, components.max() + 1), components[seeds > 0]))
    seeds = np.where(unseeded, components + seeds.max(), seeds)
    return without_small(watershed(elevation, seeds, mask=mask, connectivity=2), min_size)  # and cut-off slivers


def split_by_interior(prob, threshold=0.5, min_size=16):
    """Objects of a network for objects' probabilities (H x W x classes): the foreground mask (holes
    filled, small pieces removed) flooded from the connected regions where interior is the likeliest
    class, up the boundary probability; with distance levels (more than three classes) from where
    the expected level is in the upper half, down the expected level."""
    mask = _mask(foreground(prob), threshold, min_size)
    if prob.shape[2] == 3:
        interior, elevation = prob.argmax(axis=2) == 1, prob[..., 2]
    else:
        level = prob @ np.arange(prob.shape[2])
        interior, elevation = level > (prob.shape[2] - 1) / 2, -level
    return _flood(elevation, connected(mask & interior), connected(mask), min_size)


def split_objects(prob, threshold=0.5, min_size=16, min_distance=10):
    """Objects of a foreground probability map (H x W): touching ones split by the watershed of
    the distance to the background, seeded at its maxima `min_distance` apart."""
    mask = _mask(prob, threshold, min_size)
    components = connected(mask)
    distance = ndimage.distance_transform_edt(mask)
    peaks = peak_local_max(distance, min_distance=min_distance, labels=components, exclude_border=False)
    seeds = np.zeros(mask.shape, np.int32)
    seeds[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return _flood(-distance, seeds, components, min_size)


def without_small(objects, min_size):
    """The numbered objects of at least `min_size` pixels, renumbered."""
    too_small = np.bincount(objects.ravel()) < min_size
    return renumber(np.where(too_small[objects], 0, objects))


def measure(objects, image):
    """Columns (a dict of lists) of one row per object: label, area, centroid, bounding box, mean
    intensity (of the grey image, or the mean over channels) and eccentricity."""
    grey = image.mean(axis=2) if image.ndim == 3 else image
    table = regionprops_table(objects.astype(np.int32), intensity_image=grey, properties=MEASUREMENTS)
    return {name: values.tolist() for name, values in table.items()}


def roi_set(objects):
    """An ImageJ ROI set (the bytes of a RoiSet .zip for Fiji's ROI Manager): one polygon per object
    along its outer edge, in ImageJ's coordinates (pixel x spans x to x + 1), named by its number;
    for a stack (N x H x W) each ROI sits on its slice (ImageJ's position) and is named slice-number."""
    archive = io.BytesIO()
    pages = objects[None] if objects.ndim == 2 else objects
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as roi_zip:
        for page, plane in enumerate(pages, start=1):
            for number, box in enumerate(ndimage.find_objects(plane), start=1):
                if box is None:
                    continue
                piece = np.pad(plane[box] == number, 1).astype(np.float32)
                outline = max(find_contours(piece, 0.5), key=len)  # (row, col), halfway out to the next pixel
                xy = outline[:, ::-1] + (box[1].start - 0.5, box[0].start - 0.5)  # less the padding, plus half a pixel
                name = f"{number:04d}" if objects.ndim == 2 else f"{page:04d}-{number:04d}"
                roi = ImagejRoi.frompoints(xy, name=name)
                if objects.ndim == 3:
                    roi.position = page
                roi_zip.writestr(f"{name}.roi", roi.tobytes())
    return archive.getvalue()


def overlaps(pred, truth):
    """(intersection matrix truth x pred, truth areas, pred areas) for objects 1..N of each."""
    n_true, n_pred = int(truth.max()), int(pred.max())
    pairs = truth.astype(np.int64).ravel() * (n_pred + 1) + pred.astype(np.int64).ravel()
    counts = np.bincount(pairs, minlength=(n_true + 1) * (n_pred + 1)).reshape(n_true + 1, n_pred + 1)
    return counts[1:, 1:], counts[1:, :].sum(axis=1), counts[:, 1:].sum(axis=0)


def object_scores(pred, truth):
    """The object scores of numbered objects `pred` against `truth` (same shape, 0 = background):
    map_05_095, ap50, f1_50, aji, and the object counts."""
    pred, truth = renumber(pred), renumber(truth)
    inter, true_area, pred_area = overlaps(pred, truth)
    union = true_area[:, None] + pred_area[None, :] - inter
    iou = inter / np.maximum(union, 1)
    n_true, n_pred = iou.shape

    def matched(t):  # above IoU 0.5 a true object overlaps at most one predicted one that much
        return int(np.sum(iou > t))

    def ratio(tp, t_weight=1):
        denominator = t_weight * tp + (n_pred - tp) + (n_true - tp)
        return 1.0 if denominator == 0 else t_weight * tp / denominator
    tp50 = matched(0.5)
    return dict(map_05_095=float(np.mean([ratio(matched(t)) for t in THRESHOLDS])), ap50=ratio(tp50),
                f1_50=ratio(tp50, 2),
                aji=aggregated_jaccard(inter, union, iou, true_area=true_area, pred_area=pred_area),
                objects_predicted=n_pred, objects_true=n_true)


def aggregated_jaccard(inter, union, iou, true_area, pred_area):
    """AJI: every true object with the predicted one of highest IoU, intersections over unions
    summed; predicted objects matched to none add their area to the union. (inter, union, iou:
    true x predicted matrices.)"""
    if len(true_area) == 0:
        return 1.0 if len(pred_area) == 0 else 0.0
    best = iou.argmax(axis=1) if len(pred_area) else np.full(len(true_area), -1)
    total_inter, total_union, used = 0, 0, set()
    for i, j in enumerate(best):
        if j < 0 or inter[i, j] == 0:
            total_union += true_area[i]
            continue
        total_inter += inter[i, j]
        total_union += union[i, j]
        used.add(j)
    total_union += sum(area for j, area in enumerate(pred_area) if j not in used)
    return float(total_inter / total_union)
