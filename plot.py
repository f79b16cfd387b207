"""Draw the training curves of the last run into a PNG (and show them when a display exists).

    python3 plot.py                          # Unet_train.jsonl (beside Unet_train.txt) -> training_curves.png
    python3 plot.py my_run.jsonl --out my.png

Reads the JSON-lines log TrainUnetDataSet.py writes (log.py) and draws the losses together (the
validation loss is computed as the training loss is, so the two compare), and each validation
score and the learning rate in a panel of its own. Given a human-readable log, it reads the JSON
lines beside it; a file of one loss per line (the original example's log) works too.
Training redraws the same picture into progress.png after every epoch.
Runs with the machine's own python3: without matplotlib it re-runs itself in the project's .venv.
"""
import importlib.util
import os
import sys

from cli import ArgumentParser, file_to_write
from curves import plot_curves, read_log

HERE = os.path.dirname(os.path.abspath(__file__))


def _rerun_in_venv_without_matplotlib():
    if importlib.util.find_spec("matplotlib"):
        return
    for venv in (".venv", ".venv-torch"):
        python = os.path.join(HERE, venv, "bin", "python")
        if os.path.exists(python) and not os.environ.get("UNET_PLOT_REEXEC"):
            os.environ["UNET_PLOT_REEXEC"] = "1"
            os.execv(python, [python, os.path.abspath(__file__)] + sys.argv[1:])
    sys.exit("error: matplotlib is not installed: run `bash train.sh` once (it sets up .venv)")


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("log", nargs="?", default="Unet_train.txt", help="training log (its .jsonl beside it is read)")
    p.add_argument("--out", type=file_to_write, default="training_curves.png", help="PNG to write")
    args = p.parse_args(argv)
    _rerun_in_venv_without_matplotlib()
    try:
        plot_curves(read_log(args.log), args.out, show=bool(os.environ.get("DISPLAY")))
    except (OSError, ValueError) as err:
        sys.exit(f"error: {err}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
