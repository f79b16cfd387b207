"""Make sure the ISBI 2012 data is at hand, and fetch the original example's pretrained checkpoint.

    python fetch_data.py                  # fill train_image/ train_label/ test_image/
    python fetch_data.py --pretrained     # download and unpack checkpoints.tar.gz into pretrained/

Where the data comes from, first that works:
  1. the folders already hold images;
  2. a local copy named by ISBI_DATA_DIR (a folder with the same three sub-folders);
  3. the original example's archives, downloaded (from ISBI_BASE_URL where set);
  4. offline with nothing at hand: a synthetic EM-like dataset, loudly marked as such.
"""
import argparse
import http.client
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.request

import cv2
import numpy as np
from scipy import ndimage

from dataloader import IMAGE_SUFFIXES, atomic_write, write_png

ORIGINAL_URL = "https://oneflow-static.oss-cn-beijing.aliyuncs.com/Dataset/Seg/ISBI_Challenge_cell_segmentation/"


def base_url():
    """Where the archives are downloaded from: ISBI_BASE_URL, else the original example's address."""
    return os.environ.get("ISBI_BASE_URL") or ORIGINAL_URL
FOLDERS = ("train_image", "train_label", "test_image")
SYNTHETIC_MARK = "SYNTHETIC_DATA.txt"

HOW_TO_GET_DATA = """\
The ISBI 2012 data could not be found or downloaded ({reason}).
To train on the real data, do one of these and run again:
  - put the 30 training slices in train_image/, their labels in train_label/ (255 = cell,
    0 = membrane, same file names) and test slices in test_image/;
  - or point ISBI_DATA_DIR at a folder holding train_image/ train_label/ test_image/;
  - or connect to the internet, so that {url}*.tar.gz can be downloaded.
"""


class FetchError(OSError):
    """A download or an archive that failed; the message says which and why."""


def has_images(folder):
    return os.path.isdir(folder) and any(n.lower().endswith(IMAGE_SUFFIXES) for n in os.listdir(folder))


def download(url, dest, timeout=60):
    """Fetch `url` into the file `dest` atomically; a failure leaves no partial file."""
    def copy_all(response, f):
        shutil.copyfileobj(response, f, 1 << 20)
        expected = response.headers.get("Content-Length")
        if expected is not None and f.tell() != int(expected):
            raise FetchError(f"could not download {url}: cut off after {f.tell()} of {expected} bytes")

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            atomic_write(dest, lambda f: copy_all(response, f))
    except FetchError:
        raise
    except urllib.error.HTTPError as err:
        raise FetchError(f"could not download {url}: HTTP {err.code} {err.reason}")
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        raise FetchError(f"could not download {url}: {getattr(err, 'reason', None) or repr(err)}")
    return dest


def safe_extract(archive, dest):
    """Unpack a tar archive into `dest`, refusing members that would land outside it or are links."""
    root = os.path.realpath(dest)
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for m in members:
                target = os.path.realpath(os.path.join(root, m.name))
                if not (m.isfile() or m.isdir()):
                    raise FetchError(f"{archive}: refusing {m.name!r}: not a plain file or folder")
                if os.path.commonpath([root, target]) != root:
                    raise FetchError(f"{archive}: refusing {m.name!r}: it would be written outside {dest}")
            for m in members:
                tar.extract(m, root, set_attrs=False)
    except (tarfile.TarError, EOFError) as err:
        raise FetchError(f"{archive}: damaged archive ({err})")


def copy_from_mirror(mirror, root):
    for name in FOLDERS:
        if not has_images(os.path.join(mirror, name)):
            raise FetchError(f"{mirror}: ISBI_DATA_DIR has no images in {name}/")
    for name in FOLDERS:
        target = os.path.join(root, name)
        if not has_images(target):
            shutil.copytree(os.path.join(mirror, name), target, dirs_exist_ok=True)


def download_isbi(root, url):
    for name in FOLDERS:
        target = os.path.join(root, name)
        if has_images(target):
            continue
        archive = download(url + name + ".tar.gz", os.path.join(root, name + ".tar.gz"))
        safe_extract(archive, root)
        os.remove(archive)
        if not has_images(target):
            raise FetchError(f"{archive}: unpacked, but it held no images in {name}/")


def synthetic_em_slice(size, rng, cell_size=40):
    """An EM-like slice: Voronoi cells with dark, blurred, noisy membranes; label 255 = cell."""
    n_cells = max(4, (size // cell_size) ** 2)
    seeds = np.ones((size, size), bool)
    ys, xs = rng.integers(0, size, n_cells), rng.integers(0, size, n_cells)
    seeds[ys, xs] = False
    cell_id = np.zeros((size, size), np.int32)
    cell_id[ys, xs] = np.arange(1, n_cells + 1)
    _, (iy, ix) = ndimage.distance_transform_edt(seeds, return_indices=True)
    cells = cell_id[iy, ix]
    border = np.zeros((size, size), bool)
    border[:-1] |= cells[:-1] != cells[1:]
    border[:, :-1] |= cells[:, :-1] != cells[:, 1:]
    membrane = ndimage.binary_dilation(border, iterations=int(rng.integers(1, 3)))
    label = np.where(membrane, 0, 255).astype(np.uint8)
    brightness = rng.uniform(0.55, 0.85, n_cells + 1)[cells]
    image = np.where(membrane, 0.2, brightness) + rng.normal(0, 0.04, (size, size))
    image = cv2.GaussianBlur(image.astype(np.float32), (0, 0), 1.2) + rng.normal(0, 0.05, (size, size))
    return (np.clip(image, 0, 1) * 255).astype(np.uint8), label


def write_synthetic(root, n_train=30, n_test=30, size=512, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n_train):
        image, label = synthetic_em_slice(size, rng)
        write_png(os.path.join(root, "train_image", f"{i}.png"), image)
        write_png(os.path.join(root, "train_label", f"{i}.png"), label)
    for i in range(n_test):
        write_png(os.path.join(root, "test_image", f"{i}.png"), synthetic_em_slice(size, rng)[0])
    with open(os.path.join(root, SYNTHETIC_MARK), "w") as f:
        f.write("train_image/ train_label/ test_image/ hold SYNTHETIC data made by fetch_data.py, "
                "not ISBI 2012. Delete them and this file to fetch the real data.\n")


def ensure_isbi_data(root=".", mirror=None):
    """Fill root/train_image, train_label, test_image; returns where the data came from."""
    url = base_url()
    if all(has_images(os.path.join(root, name)) for name in FOLDERS):
        if os.path.exists(os.path.join(root, SYNTHETIC_MARK)):
            print(f"WARNING: using SYNTHETIC data (see {SYNTHETIC_MARK}), not ISBI 2012", file=sys.stderr)
            return "synthetic"
        return "present"
    if mirror:
        copy_from_mirror(mirror, root)
        print(f"data: copied ISBI 2012 from {mirror}")
        return "mirror"
    try:
        download_isbi(root, url)
        print(f"data: downloaded ISBI 2012 from {url}")
        return "download"
    except FetchError as err:
        print(HOW_TO_GET_DATA.format(reason=err, url=url), file=sys.stderr)
    print("=" * 78 + "\nWARNING: running on a SYNTHETIC EM-like dataset (Voronoi cells), NOT ISBI 2012.\n"
          "Its scores say the pipeline works, nothing about real membranes.\n" + "=" * 78, file=sys.stderr)
    write_synthetic(root)
    return "synthetic"


def fetch_pretrained(dest="pretrained"):
    """The original example's OneFlow checkpoint folder, downloaded and unpacked once."""
    for folder, _, files in os.walk(dest):
        if "pickled_data" in files:
            return folder
    url = base_url() + "checkpoints.tar.gz"
    try:
        archive = download(url, os.path.join(dest, "checkpoints.tar.gz"))
    except FetchError as err:
        raise FetchError(f"{err}. The pretrained checkpoint needs the internet once; or unpack "
                         f"checkpoints.tar.gz into {dest}/ by hand")
    safe_extract(archive, dest)
    os.remove(archive)
    for folder, _, files in os.walk(dest):
        if "pickled_data" in files:
            return folder
    raise FetchError(f"{url}: unpacked, but it held no OneFlow checkpoint (no pickled_data)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=".", help="folder that gets train_image/ train_label/ test_image/")
    p.add_argument("--pretrained", action="store_true", help="fetch the pretrained checkpoint instead")
    args = p.parse_args(argv)
    try:
        if args.pretrained:
            print(fetch_pretrained(os.path.join(args.root, "pretrained")))
        else:
            ensure_isbi_data(args.root, os.environ.get("ISBI_DATA_DIR") or None)
    except FetchError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
