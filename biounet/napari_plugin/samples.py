"""napari's File > Open Sample: an ISBI 2012 EM slice and a DSB 2018 nuclei image, fetched once as
the scripts fetch data and read as they read images (offline: one line saying so, and no layer)."""
import os

from biounet.core.files import DataError
from biounet.data.fetch import FetchError, fetch_sample
from biounet.data.loader import read_raw_image
from biounet.napari_plugin.model_choice import one_line


class SampleUnavailable(RuntimeError):
    """A sample that could not be fetched or read; the message says why in one line."""


def sample_cache():
    cache = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return os.path.join(cache, "biounet", "samples")


def sample(name, title):
    try:
        image = read_raw_image(fetch_sample(name, sample_cache()))
    except (FetchError, DataError) as error:  # napari shows it as one notification
        raise SampleUnavailable(f"biounet: {title}: {one_line(error)}") from None
    return [(image, {"name": title}, "image")]


def isbi_slice():
    return sample("isbi2012", "ISBI 2012 EM slice")


def dsb_nuclei():
    return sample("dsb2018", "DSB 2018 nuclei")
