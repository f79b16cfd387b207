"""Train the U-Net on a dataset of any layout datasets.py reads; keeps the best and the last checkpoint.

    python TrainUnetDataSet.py                                # ISBI folders, preset for this machine
    python TrainUnetDataSet.py --epochs 40 --batch-size 4 --base 64
    python TrainUnetDataSet.py --resume                       # go on from checkpoints/last.npz
    python TrainUnetDataSet.py --data-path stage1_train       # DSB 2018 nuclei, RGB
    python TrainUnetDataSet.py --data-path VOC2012 --classes 21 --img-size 256
    python TrainUnetDataSet.py --data-path volume.ome.zarr    # its labels/ group; read window by window
    UNET_BACKEND=torch python TrainUnetDataSet.py             # same code on PyTorch

The flags and what the data says are settled once into the run's configuration (config.py), printed
at the start and stored in every checkpoint. Every epoch prints (and tees into the log) one line:
the training loss, and on held-out images the validation loss (the same loss), pixel error, Dice and
the ISBI challenge's V_rand (several classes: pixel accuracy and mean IoU), and the time; the same
goes as one JSON line into Unet_train.jsonl, and progress.png is redrawn. `python3 plot.py` draws
the curves.
"""
import os
import sys

from biounet.core.files import DataError
from biounet.core.log import Logger
from biounet.core.processes import die_with_parent
from biounet.model import backend
from biounet.model.checkpoint import CheckpointError, RunFolder
from biounet.training.config import ConfigError
from biounet.training.flags import parse_args
from biounet.training.train import Stopped, StopRequest, TrainingError, train


def join_launched_run(processes):
    """A process of a data-parallel run: as many threads as its share of the cores (threads spinning
    against each other slow every process down), and killed with its launcher, which stops the whole
    run when any process fails (a process waiting for a dead peer would wait for ever)."""
    backend.set_threads(backend.cores() // int(os.environ.get("LOCAL_WORLD_SIZE", processes)))
    die_with_parent()  # checkpoints are written atomically


def main(argv=None):
    flags = parse_args(argv, description=__doc__)
    rank, processes = backend.distributed()
    if processes == 1:
        return train_and_log(flags, rank, processes)
    join_launched_run(processes)
    code = 0
    try:
        train_and_log(flags, rank, processes)
    except SystemExit as stop:  # exit at once: OneFlow's exit would wait for the other processes
        if isinstance(stop.code, str) and rank == 0:  # the others met the same error
            print(stop.code, file=sys.stderr)
        code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    # Finished too: tearing down the process group at the interpreter's exit aborted now and then
    # ("terminate called without an active exception"); everything is written and closed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def train_and_log(flags, rank, processes):
    if rank > 0:  # rank 0 speaks for the run; the others' errors still reach stderr
        flags.log, flags.progress, sys.stdout = "", "", open(os.devnull, "w")
    stop = StopRequest()
    logger = Logger(flags.log or os.devnull)
    logger.header(("resumed" if flags.resume else "run") + ": " + " ".join(sys.argv))
    folder = None
    try:
        folder = RunFolder(flags.checkpoint_dir, resuming=flags.resume) if rank == 0 else None
        train(flags, folder, stop, rank, processes)
    except (DataError, ConfigError, CheckpointError, TrainingError, OSError) as err:
        logger.fail(f"error: {err}")
    except Stopped as stopped:
        print(stopped)
        sys.exit(stopped.code)
    except KeyboardInterrupt:
        logger.fail("error: interrupted; the checkpoints of finished epochs are kept as they were")
    finally:
        logger.close()
        stop.restore()
        if folder is not None:
            folder.close()


if __name__ == "__main__":
    main()
