"""The ISBI 2012 data and the original example's pretrained checkpoint: found locally, downloaded,
or (offline) a synthetic stand-in, never written over a user's own images.
"""
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile

import cv2
import numpy as np
from scipy import ndimage

from biounet.core.files import IMAGE_SUFFIXES, atomic_write, write_png

ORIGINAL_URL = "https://oneflow-static.oss-cn-beijing.aliyuncs.com/Dataset/Seg/ISBI_Challenge_cell_segmentation/"


def base_url():
    """Where the archives are downloaded from: ISBI_BASE_URL, else the original example's address."""
    return os.environ.get("ISBI_BASE_URL") or ORIGINAL_URL


FOLDERS = ("train_image", "train_label", "test_image")
SYNTHETIC_DIR = "synthetic_isbi"
SYNTHETIC_MARK = "SYNTHETIC_DATA.txt"
MiB = 1 << 20
# What an archive may unpack to at most: 30 slices of 512x512 are 8 MiB; the checkpoint ~125 MiB.
UNPACKED_LIMIT = {"train_image": 128 * MiB, "train_label": 128 * MiB, "test_image": 128 * MiB,
                  "checkpoints": 1024 * MiB}

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


def say(message):
    print(message, file=sys.stderr)


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
        raise FetchError(f"could not download {url}: {getattr(err, 'reason', None) or err}")
    return dest


def safe_extract(archive, dest, max_bytes=1024 * MiB):
    """Unpack a tar archive into `dest`, refusing members that would land outside it or are links,
    and archives that would unpack to more than `max_bytes`."""
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
            total = sum(m.size for m in members)
            if total > max_bytes:
                raise FetchError(f"{archive}: refusing to unpack {total / MiB:.0f} MiB, more than the "
                                 f"{max_bytes / MiB:.0f} MiB it should hold")
            for m in members:
                tar.extract(m, root, set_attrs=False)
    except (tarfile.TarError, EOFError) as err:
        raise FetchError(f"{archive}: damaged archive ({err})")
    except OSError as err:
        if isinstance(err, FetchError):
            raise
        raise FetchError(f"{archive}: could not unpack ({err})")


def fetch_archive(url, name, staging):
    """Download `url` into the folder `staging` and unpack it there; returns the unpacked folder."""
    archive = download(url, os.path.join(staging, os.path.basename(url)))
    unpacked = os.path.join(staging, "unpacked")
    os.makedirs(unpacked)
    safe_extract(archive, unpacked, UNPACKED_LIMIT[name])
    return unpacked


def move_new_entries(source, target):
    """Move what `source` holds into `target`, leaving alone every name `target` has already."""
    os.makedirs(target, exist_ok=True)
    for name in os.listdir(source):
        if not os.path.exists(os.path.join(target, name)):
            os.replace(os.path.join(source, name), os.path.join(target, name))


def copy_from_mirror(mirror, root, names):
    """Copy the mirror's folders `names` that hold images; returns those it had none for."""
    for name in names:
        for file in os.listdir(os.path.join(mirror, name)) if has_images(os.path.join(mirror, name)) else []:
            if not os.path.exists(os.path.join(root, name, file)):
                os.makedirs(os.path.join(root, name), exist_ok=True)
                shutil.copy2(os.path.join(mirror, name, file), os.path.join(root, name, file))
    return [name for name in names if not has_images(os.path.join(mirror, name))]


def download_isbi(root, url, names):
    """Download and unpack each archive in a staging folder of its own, removed afterwards, then
    move its images into the (image-less) folder; a failure leaves every folder as it was."""
    for name in names:
        with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as staging:
            unpacked = fetch_archive(url + name + ".tar.gz", name, staging)
            if not has_images(os.path.join(unpacked, name)):
                raise FetchError(f"{url}{name}.tar.gz: unpacked, but it held no images in {name}/")
            move_new_entries(os.path.join(unpacked, name), os.path.join(root, name))


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
        f.write("This folder holds SYNTHETIC data made by fetch_data.py, not ISBI 2012. It is used only while "
                "train_image/ train_label/ test_image/ beside it are all empty.\n")


def synthetic_fallback(root):
    """root/synthetic_isbi, written once: the data of the last resort."""
    folder = os.path.join(root, SYNTHETIC_DIR)
    if not all(has_images(os.path.join(folder, name)) for name in FOLDERS):
        write_synthetic(folder)
    say("=" * 78 + f"\nWARNING: running on a SYNTHETIC EM-like dataset (Voronoi cells) in {folder}/, NOT ISBI "
        "2012.\nIts scores say the pipeline works, nothing about real membranes.\n" + "=" * 78)
    return folder


def ensure_isbi_data(root=".", mirror=None, needed=FOLDERS):
    """Make sure root/<name> holds images for every folder in `needed` (train.sh needs the training
    folders, test.sh the test folder). When one does not, every image-less folder of the three is
    filled, so that the other script finds its data too; folders holding images are never touched.

    Returns (the folder holding the data to use: `root`, or root/synthetic_isbi; where it came from:
    present, mirror, download or synthetic)."""
    url = base_url()
    empty = lambda names: [n for n in names if not has_images(os.path.join(root, n))]  # noqa: E731
    if not empty(needed):
        if os.path.exists(os.path.join(root, SYNTHETIC_MARK)):  # written there by versions before synthetic_isbi/
            say(f"WARNING: using SYNTHETIC data (see {SYNTHETIC_MARK}), not ISBI 2012")
        return root, "present"
    if mirror:
        lacking = copy_from_mirror(mirror, root, empty(FOLDERS))
        if empty(needed):
            raise FetchError(f"{mirror}: ISBI_DATA_DIR has no images in {empty(needed)[0]}/")
        say(f"data: copied ISBI 2012 from {mirror}" + (f" (it has no {', '.join(lacking)})" if lacking else ""))
        return root, "mirror"
    try:
        download_isbi(root, url, empty(FOLDERS))
        say(f"data: downloaded ISBI 2012 from {url}")
        return root, "download"
    except FetchError as err:
        if not empty(needed):  # what this run needs arrived, another folder did not
            say(f"warning: {err}")
            return root, "download"
        if any(has_images(os.path.join(root, name)) for name in FOLDERS):
            raise FetchError(f"{os.path.normpath(os.path.join(root, empty(needed)[0]))}/ holds no images and "
                             f"{err}; put the images there, or set ISBI_DATA_DIR")
        say(HOW_TO_GET_DATA.format(reason=err, url=url))
    return synthetic_fallback(root), "synthetic"


DSB_SAMPLE_URL = "https://data.broadinstitute.org/bbbc/BBBC038/stage1_test.zip"  # DSB 2018's stage 1 test images


def fetch_sample(name, cache):
    """The path of a sample image, downloaded once into `cache`: "isbi2012" (the first ISBI 2012 test
    slice: from ISBI_DATA_DIR where set, else the original example's archive) or "dsb2018" (a DSB 2018
    nuclei image from the Broad's BBBC038 copy; DSB_SAMPLE_URL overrides)."""
    target = os.path.join(cache, f"{name}.png")
    if os.path.exists(target):
        return target
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as staging:
        if name == "isbi2012":
            mirror = os.environ.get("ISBI_DATA_DIR")
            folder = os.path.join(mirror, "test_image") if mirror else os.path.join(
                fetch_archive(base_url() + "test_image.tar.gz", "test_image", staging), "test_image")
            found = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES)) \
                if os.path.isdir(folder) else []
            if not found:
                raise FetchError(f"{folder}: no ISBI 2012 test slices there")
            shutil.copyfile(os.path.join(folder, found[0]), os.path.join(staging, "sample.png"))
        else:
            url = os.environ.get("DSB_SAMPLE_URL") or DSB_SAMPLE_URL
            archive = download(url, os.path.join(staging, "dsb.zip"))
            try:
                with zipfile.ZipFile(archive) as zipped:
                    images = sorted(n for n in zipped.namelist() if "/images/" in n and n.lower().endswith(".png"))
                    if not images:
                        raise FetchError(f"{url}: no DSB 2018 images (*/images/*.png) in it")
                    with zipped.open(images[0]) as source, open(os.path.join(staging, "sample.png"), "wb") as out:
                        shutil.copyfileobj(source, out)
            except zipfile.BadZipFile as err:
                raise FetchError(f"{url}: damaged archive ({err})")
        os.replace(os.path.join(staging, "sample.png"), target)
    return target


def fetch_pretrained(dest="pretrained"):
    """The original example's OneFlow checkpoint folder, downloaded and unpacked once."""
    def checkpoint_in(folder):
        return next((sub for sub, _, files in os.walk(folder) if "pickled_data" in files), None)

    found = checkpoint_in(dest)
    if found:
        return found
    url = base_url() + "checkpoints.tar.gz"
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".fetch-") as staging:
        try:
            unpacked = fetch_archive(url, "checkpoints", staging)
        except FetchError as err:
            raise FetchError(f"{err}. The pretrained checkpoint needs the internet once; or unpack "
                             f"checkpoints.tar.gz into {dest}/ by hand")
        if not checkpoint_in(unpacked):
            raise FetchError(f"{url}: unpacked, but it held no OneFlow checkpoint (no pickled_data)")
        move_new_entries(unpacked, dest)
    return checkpoint_in(dest)
