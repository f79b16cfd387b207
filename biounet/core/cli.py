"""Command-line plumbing shared by the scripts: help that shows every default, errors in one
line, and numeric flags checked against their range when they are parsed."""
import argparse
import math
import os


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the docstring's layout and shows every flag's default (a flag without one says in its help
    what decides it)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes end in one line (`error: argument --crop: ...`), exit status 2."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def ranged(kind, low=None, high=None, below=None, also=()):
    """An argparse type: a finite `kind` (int or float) with low <= value <= high and value < below
    (each bound optional), or one of the values in `also` (e.g. 0 for "off")."""
    bounds = [f">= {low}" if low is not None else "", f"<= {high}" if high is not None else "",
              f"< {below}" if below is not None else ""]
    rule = " and ".join(b for b in bounds if b)
    if also:
        rule = " or ".join([str(v) for v in also] + [rule])

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}")
        if value in also:
            return value
        if (not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high)
                or (below is not None and value >= below)):
            raise argparse.ArgumentTypeError(f"{text} is out of range (must be {rule})")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


probability = ranged(float, 0, 1)


def object_size_flags(p, auto_help, default="auto"):
    """--object-size auto|PIXELS and --no-object-size (dest object_size: "auto", a number or "off")."""
    pixels = ranged(float, 2, 2000)

    def object_size(text):
        return "auto" if text == "auto" else pixels(text)
    object_size.__name__ = "object size"
    p.add_argument("--object-size", type=object_size, default=default, metavar="auto|PIXELS",
                   help=f"the objects' median diameter: {auto_help}; PIXELS: the images' objects are that wide")
    p.add_argument("--no-object-size", dest="object_size", action="store_const", const="off",
                   help="every image at its own pixel scale, whatever its objects' size")


def _file_in_the_way(path):
    """The file that keeps `path` from being a folder (the path itself, or a folder above it), or None."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return None if os.path.isdir(path) else path


def folder_to_write(text):
    """An argparse type: a folder to write into (made if missing), not a file."""
    if in_the_way := _file_in_the_way(text):
        if in_the_way == os.path.abspath(text):
            raise argparse.ArgumentTypeError(f"{text} is a file, not a folder to write into")
        raise argparse.ArgumentTypeError(f"{text} cannot be made: {in_the_way} is a file, not a folder")
    return text


def file_to_write(text):
    """An argparse type: a file to write (made or replaced), not a folder; "" for none."""
    if text and os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file to write")
    if text and (in_the_way := _file_in_the_way(os.path.dirname(os.path.abspath(text)))):
        raise argparse.ArgumentTypeError(f"{text} cannot be written: {in_the_way} is a file, not a folder")
    return text


def path_to_read(text):
    """An argparse type: a file or folder that exists."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text}: no such file or folder")
    return text
