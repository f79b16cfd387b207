"""The training logs: a human-readable one and, beside it, one JSON line per run and per epoch.

Logger tees everything printed to stdout into the human-readable log, as the original example did.
It is appended to, never truncated: each run starts with a header line (`== <time> run: ...` or
`== <time> resumed: ...`), and an error that stops a run is logged too.

The JSON-lines log (`Unet_train.jsonl` beside `Unet_train.txt`) is what plot.py reads: a run's
first line holds its command and settled configuration ({"event": "run" or "resumed", ...}), then
each epoch appends {"epoch": n, "train_loss": .., "val_loss": .., <every score>, "lr": .., "time": ..}.
"""
import json
import os
import sys
import time


def json_log_path(log):
    """The JSON-lines log that goes with the human-readable `log`."""
    return os.path.splitext(log)[0] + ".jsonl"


def append_json(path, record):
    """Append `record` to a JSON-lines file as one line."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


class Logger:
    def __init__(self, filename="Unet_train.txt"):
        self.terminal = sys.stdout
        os.makedirs(os.path.dirname(os.path.abspath(filename)), exist_ok=True)
        self.log = open(filename, "a", buffering=1)
        sys.stdout = self

    def header(self, text):
        self.log.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")

    def write(self, message):
        self.terminal.write(message)
        self.log.write(message)

    def flush(self):
        self.terminal.flush()
        self.log.flush()

    def isatty(self):
        return False

    def fail(self, message):
        """Log `message` and exit with it on stderr (status 1)."""
        self.log.write(message + "\n")
        self.close()
        sys.exit(message)

    def close(self):
        sys.stdout = self.terminal
        if not self.log.closed:
            self.log.close()
