"""Draw the training curves of the last run into training_curves.png (`biounet-plot` is the same
program). Runs with the machine's own python3: without matplotlib it re-runs itself in the
project's .venv. See `python3 plot.py --help`."""
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def in_project_venv():
    """Re-run this script in the project's environment when this Python lacks what it needs."""
    if importlib.util.find_spec("matplotlib") and importlib.util.find_spec("numpy"):
        return
    for venv in (".venv", ".venv-torch"):
        python = os.path.join(HERE, venv, "bin", "python")
        if os.path.exists(python) and not os.environ.get("UNET_PLOT_REEXEC"):
            os.environ["UNET_PLOT_REEXEC"] = "1"
            os.execv(python, [python, os.path.abspath(__file__)] + sys.argv[1:])
    sys.exit("error: matplotlib is not installed: run `bash train.sh` once (it sets up .venv)")


def main(argv=None):
    in_project_venv()
    from biounet.commands.plot import main as plot
    plot(argv)


if __name__ == "__main__":
    main()
