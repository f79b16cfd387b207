"""Score predictions against labels, matched by name: a table per image, the mean, and JSON.

    biounet-evaluate predict_prob/ test_label/ [--json scores.json]
    biounet-evaluate predict_image/ ../stage1_train/                      # DSB 2018 masks
    biounet-evaluate predict_image/ VOC2012/ --classes 21 --split val     # mean IoU
    biounet-evaluate --instances predict_instances/ ../stage1_train/     # DSB 2018 object scores

One class: predictions are masks (0/255) or cell-probability maps (8- or 16-bit PNG,
`predict_unet_test.py --save-prob`). The ISBI challenge's V_rand and V_info sweep the threshold,
so they reward probability maps; pixel scores and scikit-image's adapted Rand error and VI use 0.5.
Several classes: predictions are class-index PNGs; the mean row comes from the confusion matrix
summed over all images (as VOC scores), with IoU and accuracy per class.
--instances: predictions are label images numbering objects (16-bit PNG or TIFF, `bash test.sh`
writes them to predict_instances/), labels DSB 2018 masks/ folders or label images numbering
objects; scores per object (instances.py): the DSB 2018 metric map_05_095, ap50, f1_50, aji.
"""
import sys

from biounet.core.cli import ArgumentParser, file_to_write, ranged
from biounet.core.files import DataError
from biounet.data.datasets import FORMATS
from biounet.evaluation.scores import format_table, score_folder, write_json


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("pred_dir", help="folder of predicted masks, probability maps or class-index PNGs")
    p.add_argument("labels", help="label folder with the same file names (255 = cell), or a DSB 2018, VOC or "
                                  "TIFF dataset")
    p.add_argument("--data-format", choices=("auto",) + FORMATS, default="auto", help="layout of LABELS")
    p.add_argument("--split", default="val", help="VOC: the ImageSets/Segmentation list")
    p.add_argument("--classes", type=ranged(int, 1, 255), default=1, help="classes the network predicts (1: binary)")
    p.add_argument("--ignore-index", type=ranged(int, 0, 255), default=255, help="label value left out of the scores")
    p.add_argument("--instance-labels", action="store_true", help="labels number objects: nonzero = object")
    p.add_argument("--instances", action="store_true",
                   help="score objects: PRED_DIR holds label images numbering objects, LABELS numbers them too")
    p.add_argument("--json", type=file_to_write, help="also write every score, per image and mean, to this JSON file")
    args = p.parse_args(argv)
    try:
        scores = score_folder(args.pred_dir, args.labels, args.classes, ignore_index=args.ignore_index,
                              data_format=args.data_format, split=args.split, instance_labels=args.instance_labels,
                              instances=args.instances)
    except DataError as err:
        sys.exit(f"error: {err}")
    print(format_table(scores))
    if args.json:
        write_json(args.json, scores)


if __name__ == "__main__":
    main()
