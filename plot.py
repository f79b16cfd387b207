"""Draw the training curves from the training log into a PNG (and show them when a display exists).

    python3 plot.py                          # Unet_train.txt -> training_curves.png
    python3 plot.py my_run.txt --out my.png

Reads the lines `epoch N/M train_loss .. val_loss .. val_dice ..` that TrainUnetDataSet.py logs
and draws every curve they hold (losses together, each validation score in its own panel), or
reads the original example's format: one loss value per line.
Runs with the machine's own python3: without matplotlib it re-runs itself in the project's .venv.
"""
import os
import re
import sys

from cli import ArgumentParser

HERE = os.path.dirname(os.path.abspath(__file__))

try:
    import matplotlib
except ImportError:
    for venv in (".venv", ".venv-torch"):
        python = os.path.join(HERE, venv, "bin", "python")
        if os.path.exists(python) and not os.environ.get("UNET_PLOT_REEXEC"):
            os.environ["UNET_PLOT_REEXEC"] = "1"
            os.execv(python, [python, os.path.abspath(__file__)] + sys.argv[1:])
    sys.exit("error: matplotlib is not installed: run `bash train.sh` once (it sets up .venv)")

EPOCH_LINE = re.compile(r"^epoch (\d+)/\d+ (.*)$")
NEW_RUN_LINE = re.compile(r"^== \S+ \S+ run: ")  # a header of log.py; "resumed:" goes on with the run
PAIR = re.compile(r"([a-z_]+) (-?[\d.]+(?:e-?\d+)?|nan|inf)")


def read_log(path):
    """{curve name: [values per epoch]} of the last run in a training log (a resumed run goes on
    with the run it resumes; an epoch logged twice keeps its later values)."""
    epochs = {}
    with open(path) as f:
        lines = [line.strip() for line in f if line.strip()]
    for line in lines:
        if NEW_RUN_LINE.match(line):
            epochs = {}
        match = EPOCH_LINE.match(line)
        if match:
            epochs[int(match.group(1))] = [(k, float(v)) for k, v in PAIR.findall(match.group(2)) if k != "time"]
    curves = {}
    for epoch in sorted(epochs):
        for key, value in epochs[epoch]:
            curves.setdefault(key, []).append(value)
    if not curves:  # the original's format: one loss per line
        try:
            curves = {"train_loss": [float(line) for line in lines]}
        except ValueError:
            curves = {}
    if not curves.get("train_loss"):
        raise ValueError(f"{path}: no training losses found in the log")
    return curves


def plot_curves(curves, out):
    show = bool(os.environ.get("DISPLAY"))
    if not show:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One panel for the losses, one for each validation score (their scales differ).
    panels = [("loss", {k: v for k, v in curves.items() if k.endswith("loss")})]
    panels += [(k, {k: v}) for k, v in curves.items() if not k.endswith("loss")]
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (title, group) in zip(axes.flat, panels):
        for name, values in group.items():
            ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=name)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = out + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, out)
    print(f"wrote {out}")
    if show:
        plt.show()


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("log", nargs="?", default="Unet_train.txt", help="training log")
    p.add_argument("--out", default="training_curves.png", help="PNG to write")
    args = p.parse_args(argv)
    try:
        plot_curves(read_log(args.log), args.out)
    except (OSError, ValueError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
