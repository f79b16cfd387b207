"""The training flags: every setting a run takes, with its default, checked when parsed."""
import argparse

from biounet.core.cli import ArgumentParser, file_to_write, folder_to_write, object_size_flags, probability, ranged
from biounet.data.augment import DEFAULT_PROBABILITIES
from biounet.data.datasets import FORMATS
from biounet.data.loader import DEFAULT_PERCENTILES, NORMALIZATIONS
from biounet.evaluation.instances import OBJECT_TARGETS, STANDARD_DIAMETER
from biounet.model import backend
from biounet.model.unet import MIN_SIDE, NORMS, PADDINGS
from biounet.training.config import PRESETS


def parser(description=None):
    """The parser of every training flag."""
    p = ArgumentParser(description=description or __doc__)
    for add_flags in (data_flags, schedule_flags, network_flags, loss_flags, run_flags):
        add_flags(p)
    return p


def parse_args(argv=None, description=None):
    """The flags of a training run, settled by argparse (a mistake ends in one line naming the flag)."""
    return parser(description).parse_args(argv)


def data_flags(p):
    """What to train on, how to read it and what to predict."""
    p = p.add_argument_group("data")
    p.add_argument("--data-path", "--data_path", default="train_image",
                   help="training images: a folder (labels in --label-path), a DSB 2018 stage1_train folder, "
                        "a VOC root, an nnU-Net or Cellpose dataset, a TIFF volume, or a zarr / OME-Zarr store "
                        "(read window by window, never whole)")
    p.add_argument("--label-path", "--label_path",
                   help="labels matched to images by file name (255 = cell, 0 = membrane), or the labels' TIFF; "
                        "default: train_label/ beside the images' folder, or for a TIFF volume its name with "
                        "'volume' -> 'labels', or for an OME-Zarr image its NGFF labels/ group")
    p.add_argument("--data-format", choices=("auto",) + FORMATS, default="auto",
                   help="layout of --data-path (datasets.py); auto: detected")
    p.add_argument("--val-image-path", help="validation data (any layout), instead of holding out --val-fraction")
    p.add_argument("--val-label-path", help="validation labels (with --val-image-path, for folders and TIFFs); "
                   "default: train_label/ beside the validation images' folder")
    p.add_argument("--val-fraction", type=ranged(float, 0, below=1), default=0.1,
                   help="share of the training pairs held out for validation (0: none; VOC uses its val list)")
    p.add_argument("--classes", type=ranged(int, 1, 255), default=1,
                   help="1: one class against background (sigmoid); N > 1: softmax over class indices 0..N-1")
    p.add_argument("--instance-labels", action="store_true",
                   help="labels number the objects 1, 2, ... (GlaS's *_anno.bmp): nonzero = object, and the "
                        "weight map separates the numbered objects")
    p.add_argument("--instances", action=argparse.BooleanOptionalAction,
                   help="train for objects: background and classes of object pixels (--object-target) from the "
                        "numbered objects (or the labels' 4-connected regions), so that touching objects come apart; "
                        "default: on for DSB 2018 data")
    p.add_argument("--object-target", choices=OBJECT_TARGETS, default="touching",
                   help="--instances: what the network learns of objects: background, interior and a boundary "
                        "class of every object's outer 2 pixels (boundary) or only where an object comes within 2 "
                        "pixels of another (touching), or background and 4 levels of the distance to the object's "
                        "edge (distance); for touching and distance, prediction seeds objects at the interiors "
                        "(instances.py; touching measured best on DSB 2018: BENCHMARKS.md)")
    p.add_argument("--ignore-index", type=ranged(int, 0, 255), default=255, help="label value left out of loss and scores (classes > 1)")
    p.add_argument("--class-weights", help="classes > 1: cross-entropy weights, e.g. 1,2,2, or 'auto' "
                                           "(median frequency balancing on the training labels)")
    p.add_argument("--normalize", choices=("auto",) + NORMALIZATIONS, default="auto",
                   help="image intensities for the network, per image and channel: percentile (the --percentiles "
                        "mapped to 0 and 1, as StarDist and Cellpose do), zscore, or range (divided by the type's "
                        "largest value); auto: range for 8-bit images, else percentile. Prediction does the same")
    p.add_argument("--percentiles", type=ranged(float, 0, 100), nargs=2, default=DEFAULT_PERCENTILES,
                   metavar=("LOW", "HIGH"), help="--normalize percentile: the percentiles mapped to 0 and 1")
    object_size_flags(p, f"auto: measured on each image's objects, and every image rescaled so that they are as wide "
                         f"as the training images' median ({STANDARD_DIAMETER} pixels for numbered objects), as "
                         f"prediction then rescales new images (instances.py); default: auto where the labels number "
                         f"their objects (DSB 2018, Cellpose, --instance-labels), else each image at its own scale",
                      default=None)
    p.add_argument("--img-size", type=ranged(int, MIN_SIDE, also=(0,)), default=0,
                   help="resize every image to this square for training, and for prediction (0: keep sizes; "
                        "predictions come back at each image's own size)")


def schedule_flags(p):
    """How long and how fast: the preset, epochs, batches, the optimizer."""
    p = p.add_argument_group("schedule")
    p.add_argument("--preset", choices=["auto", "cpu", "gpu"], default="auto",
                   help="defaults for the flags below: auto = gpu on CUDA, else cpu; %s" % PRESETS)
    p.add_argument("--epochs", type=ranged(int, 1),
                   help="epochs to train: passes over the training images, or of --steps-per-epoch steps "
                        "(default: as many as fit --preset's time budget)")
    p.add_argument("--time-budget", type=ranged(float, 0.1), metavar="MINUTES",
                   help="instead of --epochs: as many epochs as end training after MINUTES (measured as it goes; "
                        "the learning-rate schedule follows; start-up and calibration come on top)")
    p.add_argument("--batch-size", "--batch_size", type=ranged(int, 1), help="images per step (default: from --preset)")
    p.add_argument("--steps-per-epoch", type=ranged(int, 0),
                   help="steps of an epoch, drawing the training pairs in a new random order each pass over them "
                        "(0: one pass over the pairs) (default: from --preset)")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                   help="Adam, or the paper's SGD with high momentum")
    p.add_argument("--momentum", type=ranged(float, 0, below=1), default=0.99, help="SGD momentum (the paper's 0.99)")
    p.add_argument("--lr", type=ranged(float, 0), help="learning rate at the start (default: from --preset)")
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                   help="learning rate over the epochs: cosine decay to lr/100, or constant")
    p.add_argument("--ema", type=ranged(float, 0, below=1), default=0.0, metavar="DECAY",
                   help="validate and keep as best.npz the exponential moving average of the weights, updated after "
                        "every step with this decay (e.g. 0.99; 0: the raw weights) (ema.py)")


def network_flags(p):
    """The U-Net and what it sees of each image."""
    p = p.add_argument_group("network")
    p.add_argument("--base", type=ranged(int, 1, 1024), help="channels of the first level (64 = the paper's U-Net) (default: from --preset)")
    p.add_argument("--crop", type=ranged(int, MIN_SIDE, also=(0,)), help="train on random crops of this size (0: whole images) (default: from --preset)")
    p.add_argument("--bilinear", action="store_true", help="bilinear upsampling instead of transposed convs")
    p.add_argument("--norm", choices=NORMS, help="normalization layers of the U-Net (default: from --preset)")
    p.add_argument("--padding", choices=PADDINGS, default="same",
                   help="valid: the paper's unpadded U-Net (572 -> 388), trained on mirrored tiles")
    p.add_argument("--dropout", type=ranged(float, 0, below=1), default=0.0, help="dropout at the end of the contracting path")


def loss_flags(p):
    """The loss, the augmentations, the decision threshold, and what picks best.npz."""
    p = p.add_argument_group("loss and checkpoints")
    p.add_argument("--dice-weight", type=ranged(float, 0),
                   help="weight of a soft-Dice term added to the cross-entropy (default 0 with one class, 1 with more)")
    p.add_argument("--weight-map", action=argparse.BooleanOptionalAction,
                   help="weight the loss per pixel as the U-Net paper does (weightmap.py), to separate cells; "
                        "default: on for one class in image folders and TIFFs (EM membranes), off otherwise")
    p.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                   help="after training, move the 0.5 decision to the threshold that fits the training images best")
    p.add_argument("--w0", type=ranged(float, 0), default=10.0, help="weight-map border weight")
    p.add_argument("--sigma", type=ranged(float, 0.1), default=5.0, help="weight-map border width, pixels")
    for name, default in DEFAULT_PROBABILITIES.items():
        p.add_argument(f"--aug-{name}", type=probability, default=default,
                       help=f"probability of the {name} augmentation (augment.py)")
    p.add_argument("--best-metric", default="auto",
                   choices=["auto", "val_v_rand", "val_dice", "val_pixel_error", "val_loss", "val_miou",
                            "val_pixel_accuracy", "val_map"],
                   help="validation score that picks best.npz; auto: val_miou with classes > 1, val_dice for "
                        "DSB 2018 nuclei, else the ISBI V_rand (train_loss when there is no validation set); "
                        "val_map: the DSB 2018 object score, where labels number objects")
    p.add_argument("--val-every", type=ranged(int, 1), default=1,
                   help="validate (and so pick best.npz) every N epochs and after the last")
    p.add_argument("--patience", type=ranged(int, 0), default=0,
                   help="stop after this many epochs without a better --best-metric (0: never)")


def run_flags(p):
    """Where it runs and what it writes."""
    p = p.add_argument_group("run")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--amp", choices=backend.PRECISIONS, default="off",
                   help="mixed precision of the forward pass: bf16 or fp16 (with loss scaling) on CUDA; "
                        "bf16 also on a CPU with PyTorch. Validation stays float32")
    p.add_argument("--seed", type=ranged(int, 0), default=0, help="the same seed gives the same run")
    p.add_argument("--loader-workers", type=ranged(int, 0, 64),
                   help="processes preparing the next batches (crops, augmentation, weight maps) while a step "
                        "runs; the same weights whatever the number (default: on CUDA the cores the training "
                        "processes leave, on a CPU 0, where the cores compute)")
    p.add_argument("--checkpoint-dir", type=folder_to_write, default="checkpoints", help="where best.npz and last.npz go")
    p.add_argument("--resume", action="store_true", help="continue from CHECKPOINT_DIR/last.npz")
    p.add_argument("--init-from", metavar="CHECKPOINT",
                   help="fine-tune: start from this checkpoint's weights (.npz, or the original OneFlow folder); its "
                        "network must be the one the flags build (--base, --norm, --padding, --bilinear, --dropout, "
                        "classes): biounet.load_model(CHECKPOINT).fine_tuning() gives them")
    p.add_argument("--log-file", "--log", dest="log", type=file_to_write, default="Unet_train.txt",
                   help="human-readable training log; one JSON line per epoch goes beside it (.jsonl), read by plot.py")
    p.add_argument("--progress", type=file_to_write, default="progress.png",
                   help="picture of the curves so far, redrawn after every epoch ('' : none)")
