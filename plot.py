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
import json
import os
import sys

from cli import ArgumentParser
from log import json_log_path

HERE = os.path.dirname(os.path.abspath(__file__))
NOT_CURVES = ("epoch", "epochs", "time", "best")


def read_log(path):
    """{curve name: [values per epoch]} of the last run in a log (a resumed run goes on with the run
    it resumes; an epoch logged twice keeps its later values)."""
    if not path.endswith(".jsonl") and os.path.exists(json_log_path(path)):
        path = json_log_path(path)
    with open(path) as f:
        lines = [line.strip() for line in f if line.strip()]
    if lines and lines[0].startswith("{"):
        curves = _read_json_lines(lines)
    else:  # the original's format: one loss per line
        try:
            curves = {"train_loss": [float(line) for line in lines]}
        except ValueError:
            curves = {}
    if not curves.get("train_loss"):
        raise ValueError(f"{path}: no training losses found in the log")
    return curves


def _read_json_lines(lines):
    epochs = {}
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a killed run
            continue
        if record.get("event") == "run":
            epochs = {}
        elif "epoch" in record:
            epochs[record["epoch"]] = {k: v for k, v in record.items() if k not in NOT_CURVES}
    curves = {}
    for epoch in sorted(epochs):
        for key, value in epochs[epoch].items():
            curves.setdefault(key, []).append(value)
    return curves


def plot_curves(curves, out, show=False):
    """Draw `curves` into the PNG `out` (atomically): the losses in one panel, each other curve in its own."""
    import matplotlib
    if not show:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

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
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = out + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, out)
    if show:
        plt.show()
    plt.close(fig)


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
    p.add_argument("--out", default="training_curves.png", help="PNG to write")
    args = p.parse_args(argv)
    _rerun_in_venv_without_matplotlib()
    try:
        plot_curves(read_log(args.log), args.out, show=bool(os.environ.get("DISPLAY")))
    except (OSError, ValueError) as err:
        sys.exit(f"error: {err}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
