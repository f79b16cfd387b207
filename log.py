"""Logger: tees everything printed to stdout into a log file, as the original example did.

The log is appended to, never truncated: each run starts with a header line (`== <time> run: ...`
or `== <time> resumed: ...`, which plot.py reads), and an error that stops a run is logged too."""
import sys
import time


class Logger:
    def __init__(self, filename="Unet_train.txt"):
        self.terminal = sys.stdout
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
