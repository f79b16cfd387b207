"""Draw the training curves of the last run into a PNG (and show them when a display exists).

    biounet-plot                             # Unet_train.jsonl (beside Unet_train.txt) -> training_curves.png
    biounet-plot my_run.jsonl --out my.png

Reads the JSON-lines log TrainUnetDataSet.py writes (log.py) and draws the losses together (the
validation loss is computed as the training loss is, so the two compare), and each validation
score and the learning rate in a panel of its own. Given a human-readable log, it reads the JSON
lines beside it; a file of one loss per line (the original example's log) works too.
Training redraws the same picture into progress.png after every epoch.
"""
import os
import sys

from biounet.core.cli import ArgumentParser, file_to_write
from biounet.core.curves import plot_curves, read_log


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("log", nargs="?", default="Unet_train.txt", help="training log (its .jsonl beside it is read)")
    p.add_argument("--out", type=file_to_write, default="training_curves.png", help="PNG to write")
    args = p.parse_args(argv)
    try:
        plot_curves(read_log(args.log), args.out, show=bool(os.environ.get("DISPLAY")))
    except (OSError, ValueError) as err:
        sys.exit(f"error: {err}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
