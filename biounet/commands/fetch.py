"""Make sure the ISBI 2012 data is at hand, and fetch the original example's pretrained checkpoint.

    biounet-fetch                        # fill train_image/ train_label/ test_image/; print the data folder
    biounet-fetch --need test_image
    biounet-fetch --pretrained     # download and unpack checkpoints.tar.gz into pretrained/

Where the data comes from, first that works:
  1. the folders already hold images;
  2. a local copy named by ISBI_DATA_DIR (a folder with the same three sub-folders);
  3. the original example's archives, downloaded (from ISBI_BASE_URL where set);
  4. offline, and only when all three folders are empty: a synthetic EM-like dataset in its own
     folder, synthetic_isbi/, loudly marked as such.
Only folders without images are filled: a user's own images are never written over. The folder
that holds the data to use (`.` or synthetic_isbi) is printed on stdout, everything else on stderr.
"""
import os
import sys

from biounet.core.cli import ArgumentParser
from biounet.data.fetch import FOLDERS, FetchError, ensure_isbi_data, fetch_pretrained


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--root", default=".", help="folder that gets train_image/ train_label/ test_image/")
    p.add_argument("--need", nargs="+", choices=FOLDERS, default=list(FOLDERS), help="the folders to fill")
    p.add_argument("--pretrained", action="store_true", help="fetch the pretrained checkpoint instead")
    args = p.parse_args(argv)
    try:
        if args.pretrained:
            print(fetch_pretrained(os.path.join(args.root, "pretrained")))
        else:
            print(ensure_isbi_data(args.root, os.environ.get("ISBI_DATA_DIR") or None, args.need)[0])
    except FetchError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
