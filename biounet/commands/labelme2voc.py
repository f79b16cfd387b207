"""Convert labelme annotations (one JSON per image) into a VOC-layout dataset to train on.

    biounet-labelme2voc my_annotations/ my_voc/ --labels background,cat,dog
    bash train.sh --data-path my_voc --classes 3         # or DATA_PATH=my_voc CLASSES=3 bash train.sh

Writes my_voc/JPEGImages/<name>.<ext> (the image, copied as it is), SegmentationClass/<name>.png
(class indices in a palette PNG, VOC's colours), ImageSets/Segmentation/{train,val}.txt and
class_names.txt. Classes are numbered in --labels order (default: background, then every label
found, sorted); shapes are painted in file order, so later shapes cover earlier ones. A shape
whose label is not in --labels stops the conversion; "__ignore__" paints 255 (ignored in training).
"""
import base64
import json
import os
import sys

import cv2
import numpy as np
from PIL import Image

from biounet.core.cli import ArgumentParser, ranged
from biounet.core.files import DataError, atomic_write
from biounet.core.visualize import voc_palette

IGNORE = "__ignore__"
LINE_WIDTH = 10     # labelme's own width for line, linestrip and point shapes
POINT_RADIUS = 5


def read_annotation(path):
    try:
        with open(path) as f:
            annotation = json.load(f)
        annotation["shapes"], annotation["imageHeight"], annotation["imageWidth"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a labelme annotation ({type(err).__name__}: {err})")
    return annotation


def paint_shape(mask, shape, value):
    points = np.round(np.asarray(shape["points"], np.float64)).astype(np.int32)
    kind = shape.get("shape_type") or "polygon"
    if kind == "polygon":
        cv2.fillPoly(mask, [points], value)
    elif kind == "rectangle":
        cv2.rectangle(mask, tuple(points[0]), tuple(points[1]), value, thickness=-1)
    elif kind == "circle":
        radius = int(round(np.linalg.norm(points[1] - points[0])))
        cv2.circle(mask, tuple(points[0]), radius, value, thickness=-1)
    elif kind in ("line", "linestrip"):
        cv2.polylines(mask, [points], False, value, thickness=LINE_WIDTH)
    elif kind == "point":
        cv2.circle(mask, tuple(points[0]), POINT_RADIUS, value, thickness=-1)
    else:
        raise ValueError(f"shape type {kind!r} is not supported")


def annotation_mask(annotation, class_ids, source):
    """Class-index mask (uint8) of one annotation; `class_ids` maps label names to indices."""
    mask = np.zeros((annotation["imageHeight"], annotation["imageWidth"]), np.uint8)
    for shape in annotation["shapes"]:
        label = shape.get("label")
        if label not in class_ids:
            raise DataError(f"{source}: label {label!r} is not one of the classes {sorted(class_ids)}")
        try:
            paint_shape(mask, shape, class_ids[label])
        except (ValueError, IndexError, KeyError, TypeError) as err:
            raise DataError(f"{source}: shape {label!r} cannot be drawn ({err})")
    return mask


def image_bytes(annotation, json_path):
    """(bytes, extension) of the annotated image: its file next to the JSON, else the embedded copy."""
    image_path = annotation.get("imagePath") or ""
    full = os.path.join(os.path.dirname(json_path), image_path)
    extension = os.path.splitext(image_path)[1].lower() or ".png"
    if image_path and os.path.isfile(full):
        with open(full, "rb") as f:
            return f.read(), extension
    if annotation.get("imageData"):
        return base64.b64decode(annotation["imageData"]), extension
    raise DataError(f"{json_path}: image {image_path!r} not found and no imageData embedded")


def write_palette_png(path, mask):
    picture = Image.fromarray(mask, mode="P")
    picture.putpalette(voc_palette().ravel().tolist())
    atomic_write(path, lambda f: picture.save(f, format="PNG"))


def convert(json_dir, out_dir, labels=None, val_fraction=0.2, seed=0):
    """Convert every *.json in `json_dir`; returns the class names in index order."""
    paths = sorted(os.path.join(json_dir, n) for n in os.listdir(json_dir) if n.endswith(".json"))
    if not paths:
        raise DataError(f"{json_dir}: no labelme .json files")
    annotations = [read_annotation(p) for p in paths]
    if labels is None:
        found = {s.get("label") for a in annotations for s in a["shapes"]} - {IGNORE, "background", "_background_"}
        labels = ["background"] + sorted(found)
    class_ids = {name: index for index, name in enumerate(labels)}
    class_ids.setdefault("_background_", 0)
    class_ids[IGNORE] = 255
    names = []
    for path, annotation in zip(paths, annotations):
        name = os.path.splitext(os.path.basename(path))[0]
        mask = annotation_mask(annotation, class_ids, path)
        data, extension = image_bytes(annotation, path)
        atomic_write(os.path.join(out_dir, "JPEGImages", name + extension), lambda f, d=data: f.write(d))
        write_palette_png(os.path.join(out_dir, "SegmentationClass", name + ".png"), mask)
        names.append(name)
    order = np.random.default_rng(seed).permutation(len(names))
    n_val = min(len(names) - 1, round(len(names) * val_fraction)) if len(names) > 1 else 0
    val = sorted(names[i] for i in order[:n_val])
    train = sorted(set(names) - set(val))
    for split, members in (("train", train), ("val", val), ("trainval", sorted(names))):
        text = "".join(f"{n}\n" for n in members).encode()
        atomic_write(os.path.join(out_dir, "ImageSets", "Segmentation", f"{split}.txt"), lambda f, t=text: f.write(t))
    atomic_write(os.path.join(out_dir, "class_names.txt"),
                 lambda f: f.write("".join(f"{n}\n" for n in labels).encode()))
    return labels, len(train), len(val)


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("json_dir", help="folder of labelme .json files (images beside them or embedded)")
    p.add_argument("out_dir", help="VOC-layout folder to write")
    p.add_argument("--labels", help="class names in index order, comma-separated (first = background), "
                                    "or a file with one per line")
    p.add_argument("--val-fraction", type=ranged(float, 0, below=1), default=0.2,
                   help="share of the images listed in val.txt")
    p.add_argument("--seed", type=ranged(int, 0), default=0)
    args = p.parse_args(argv)
    labels = None
    if args.labels:
        if os.path.isfile(args.labels):
            with open(args.labels) as f:
                labels = [line.strip() for line in f if line.strip() and line.strip() != IGNORE]
        else:
            labels = args.labels.split(",")
    try:
        labels, n_train, n_val = convert(args.json_dir, args.out_dir, labels, val_fraction=args.val_fraction,
                                         seed=args.seed)
    except DataError as err:
        sys.exit(f"error: {err}")
    print(f"{args.out_dir}: {n_train} training and {n_val} validation images, {len(labels)} classes: "
          + ", ".join(f"{i} {n}" for i, n in enumerate(labels)))
    print(f"train with: bash train.sh --data-path {args.out_dir} --classes {len(labels)}")


if __name__ == "__main__":
    main()
