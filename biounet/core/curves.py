"""Training curves: read from the JSON-lines log TrainUnetDataSet.py writes (log.py), and drawn into a
PNG, the losses together (the validation loss is computed as the training loss is, so the two
compare), each validation score and the learning rate in a panel of its own. plot.py draws them
from the command line; training redraws progress.png with them after every epoch.
"""
import json
import os

from biounet.core.log import json_log_path

NOT_CURVES = ("epoch", "epochs", "time", "best")


def read_log(path):
    """{curve name: [values per epoch]} of the last run in a log (a resumed run goes on with the run
    it resumes; an epoch logged twice keeps its later values; None where an epoch has no such value)."""
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
    for i, epoch in enumerate(sorted(epochs)):
        for key, value in epochs[epoch].items():
            curves.setdefault(key, [None] * i).append(value)
        for values in curves.values():  # None where an epoch was not validated (--val-every)
            values.extend([None] * (i + 1 - len(values)))
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
            epochs = [epoch for epoch, value in enumerate(values, start=1) if value is not None]
            ax.plot(epochs, [value for value in values if value is not None], marker="o", markersize=3, label=name)
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
