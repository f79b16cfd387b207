"""Logger: tees everything printed to stdout into a log file, as the original example did."""
import sys


class Logger:
    def __init__(self, filename="Unet_train.txt", mode="w"):
        self.terminal = sys.stdout
        self.log = open(filename, mode, buffering=1)

    def write(self, message):
        self.terminal.write(message)
        self.log.write(message)

    def flush(self):
        self.terminal.flush()
        self.log.flush()

    def isatty(self):
        return False

    def close(self):
        sys.stdout = self.terminal
        self.log.close()
