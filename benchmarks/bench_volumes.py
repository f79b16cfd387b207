"""Blockwise prediction of volumes (volumes.py) measured as a user runs it: predict_unet_test.py
commands, one after the other, each timed and its largest process's peak memory read.

    python benchmarks/bench_volumes.py memory --sizes 256 2048        # peak memory against volume size (MiB)
    python benchmarks/bench_volumes.py workers --sizes 64             # megapixels/s with 1 and 2 workers, both frameworks
    python benchmarks/bench_volumes.py isbi --checkpoint checkpoints/best.npz --images ../shared/data/isbi2012/test_image
    python benchmarks/bench_volumes.py training --sizes 256 2048      # training from a store: peak memory against its size

memory and workers predict synthetic volumes of 4096 x 4096 slices (uint16 and uint8; written
first, as OME-Zarr, into --work) with an untrained tiny network (or --checkpoint), without the 8 views;
isbi predicts a folder of images as today (in memory) and the same images as one OME-Zarr volume
(blockwise), with test.sh's defaults, and compares the masks; training trains one epoch of a base-1
network on 256 x 256 crops from labelled synthetic stores (TrainUnetDataSet.py, read window by window).
"""
import os
import shutil
import subprocess

import numpy as np

from biounet.core.cli import ArgumentParser, ranged

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project
PYTHONS = {"oneflow": os.path.join(HERE, ".venv", "bin", "python"),
           "torch": os.path.join(HERE, ".venv-torch", "bin", "python")}
MEASURE = ("import resource, subprocess, sys, time; start = time.time(); "
           "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).returncode; "
           "print(code, time.time() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def measured(framework, *args, script="predict_unet_test.py"):
    """(seconds, peak MiB of the largest process) of `SCRIPT ARGS` on `framework`."""
    python = PYTHONS[framework]
    command = [python, "-c", MEASURE, python, os.path.join(HERE, script), *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, UNET_BACKEND=framework))
    code, seconds, peak_kib = result.stdout.split()
    if code != "0":
        raise SystemExit(f"error: {script} {' '.join(map(str, args))} failed on {framework}:\n{result.stderr}")
    return float(seconds), int(peak_kib) / 1024


def synthetic_volume(path, mib, dtype=np.uint8, side=4096, chunk=1024, labels=False):
    """An OME-Zarr volume of `mib` MiB of 4096 x 4096 slices of blocky random texture, written a slice at
    a time; with `labels`, its bright half as 0/255 labels in its NGFF labels/ group."""
    import zarr

    from biounet.prediction import stores
    if os.path.exists(os.path.join(path, ".zattrs")):
        return path
    slices = mib * 2 ** 20 // (side * side * np.dtype(dtype).itemsize)
    group = zarr.open_group(path, mode="w")
    array = group.create_dataset("0", shape=(slices, side, side), chunks=(1, chunk, chunk), dtype=dtype,
                                 dimension_separator="/")
    if labels:
        group.require_group("labels").attrs["labels"] = ["bright"]
        label_group = zarr.open_group(os.path.join(path, "labels", "bright"), mode="w")
        label_array = label_group.create_dataset("0", shape=array.shape, chunks=array.chunks, dtype=np.uint8,
                                                 dimension_separator="/")
        label_group.attrs.update(stores.ngff_attributes("bright", "zyx", [1.0, 1.0, 1.0], label=True))
    tile = (np.random.default_rng(0).random((side // 8, side // 8)) * np.iinfo(dtype).max).astype(dtype)
    for z in range(slices):
        array[z] = np.kron(np.roll(tile, z, axis=0), np.ones((8, 8), dtype))
        if labels:
            label_array[z] = np.where(array[z] > np.iinfo(dtype).max // 2, 255, 0).astype(np.uint8)
    group.attrs.update(stores.ngff_attributes("synthetic", "zyx", [1.0, 1.0, 1.0]))
    return path


def tiny_checkpoint(path, base):
    """An untrained U-Net (batch norm, `base` channels), written by the OneFlow environment."""
    if not os.path.exists(path):
        code = ("from biounet.model.checkpoint import save_checkpoint; "
                f"from biounet.model.unet import UNet; save_checkpoint({path!r}, UNet(base={base}, norm='batch'), data={{}})")
        subprocess.run([PYTHONS["oneflow"], "-c", code], check=True, env=dict(os.environ, UNET_BACKEND="oneflow"))
    return path


def table(header, rows):
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    lines = [" | ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in [header] + rows]
    return "\n".join([lines[0], "-+-".join("-" * w for w in widths)] + lines[1:])


def bench_memory(args, checkpoint):
    rows = []
    for size in args.sizes:
        path = synthetic_volume(os.path.join(args.work, f"vol{size}-16bit.ome.zarr"), size, np.uint16)
        for framework in args.backends:
            out = os.path.join(args.work, f"out-memory-{framework}")
            shutil.rmtree(out, ignore_errors=True)
            seconds, peak = measured(framework, "--checkpoint", checkpoint, "--test-data-path", path, "--no-tta",
                                     "--workers", 1, "--block", args.block, "--save-res-path", out)
            pixels = size * 2 ** 20 / 2
            rows.append([framework, f"{size} MiB", f"{pixels / 1e6 / seconds:.1f}", f"{seconds:.0f}", f"{peak:.0f}"])
            print(rows[-1], flush=True)
    print(table(["framework", "volume (uint16)", "Mpx/s", "seconds", "peak MiB (largest process)"], rows))


def bench_workers(args, checkpoint):
    path = synthetic_volume(os.path.join(args.work, f"vol{args.sizes[0]}.ome.zarr"), args.sizes[0])
    rows = []
    for framework in args.backends:
        first = None
        for workers in (1, 2):
            out = os.path.join(args.work, f"out-workers-{framework}-{workers}")
            shutil.rmtree(out, ignore_errors=True)
            seconds, peak = measured(framework, "--checkpoint", checkpoint, "--test-data-path", path, "--no-tta",
                                     "--workers", workers, "--block", args.block, "--save-res-path", out)
            rate = args.sizes[0] * 2 ** 20 / 1e6 / seconds
            steady = steady_rate(os.path.join(out, os.path.basename(path), ".unet", "done"), workers, args.block)
            first = first or (rate, steady)
            rows.append([framework, workers, f"{rate:.2f}", f"{rate / first[0]:.2f}x", f"{steady:.2f}",
                         f"{steady / first[1]:.2f}x", f"{seconds:.0f}", f"{peak:.0f}"])
            print(rows[-1], flush=True)
    print(table(["framework", "workers", "Mpx/s", "speed-up", "Mpx/s once started", "speed-up", "seconds",
                 "peak MiB"], rows))


def steady_rate(done, workers, block):
    """Megapixels/s of the blocks done after each worker's first (start-up left out), from the
    times their markers were written."""
    times = sorted(os.path.getmtime(os.path.join(done, name)) for name in os.listdir(done))
    return (len(times) - workers) * block * block / 1e6 / (times[-1] - times[workers - 1])


def bench_isbi(args, checkpoint):
    """Today's prediction of a folder of slices against the same slices as one OME-Zarr volume."""
    import zarr

    from biounet.core.files import list_images
    from biounet.data.loader import read_raw_image
    from biounet.prediction import stores
    paths = list_images(args.images)
    stack = np.stack([read_raw_image(p) for p in paths])
    volume = os.path.join(args.work, "slices.ome.zarr")
    shutil.rmtree(volume, ignore_errors=True)
    group = zarr.open_group(volume, mode="w")
    group.create_dataset("0", data=stack, chunks=(1,) + stack.shape[1:], dimension_separator="/")
    group.attrs.update(stores.ngff_attributes("slices", "zyx", [1.0, 1.0, 1.0]))
    rows = []
    for framework in args.backends:
        folder, blockwise = (os.path.join(args.work, f"isbi-{framework}-{kind}") for kind in ("folder", "blockwise"))
        for out in (folder, blockwise):
            shutil.rmtree(out, ignore_errors=True)
        in_memory = measured(framework, "--checkpoint", checkpoint, "--test-data-path", args.images,
                             "--save-res-path", folder)
        blocks = measured(framework, "--checkpoint", checkpoint, "--test-data-path", volume, "--save-res-path", blockwise)
        masks = zarr.open_array(os.path.join(blockwise, "slices.ome.zarr", "0"), mode="r")[:]
        expected = np.stack([read_raw_image(os.path.join(folder, os.path.splitext(os.path.basename(p))[0] + ".png"))
                             for p in paths])
        differ = int(np.count_nonzero(masks != expected))
        rows.append([framework, f"{in_memory[0]:.0f}", f"{blocks[0]:.0f}", f"{blocks[0] / in_memory[0] - 1:+.1%}",
                     f"{in_memory[1]:.0f} / {blocks[1]:.0f}", f"{differ} of {masks.size}"])
        print(rows[-1], flush=True)
    print(table(["framework", "folder s", "OME-Zarr s", "overhead", "peak MiB folder / zarr", "mask pixels differing"],
                rows))


def bench_training(args, checkpoint):
    """Training from stores of growing size: one epoch (every 1024-pixel window once), base 1, crops of 256."""
    rows = []
    for size in args.sizes:
        path = synthetic_volume(os.path.join(args.work, f"labelled{size}.ome.zarr"), size, labels=True)
        for framework in args.backends:
            out = os.path.join(args.work, f"train-{framework}-{size}")
            shutil.rmtree(out, ignore_errors=True)
            seconds, peak = measured(framework, "--data-path", path, "--base", 1, "--crop", 256, "--batch-size", 1,
                                     "--epochs", 1, "--no-calibrate", "--progress", "", "--checkpoint-dir", out,
                                     "--log-file", os.path.join(out, "log.txt"), script="TrainUnetDataSet.py")
            with open(os.path.join(out, "log.txt")) as f:
                epoch = next(line for line in f if line.startswith("epoch 1/1"))
            epoch_seconds = float(epoch.split(" time ")[1].split("s")[0])
            rows.append([framework, f"{size} MiB", f"{seconds:.0f}", f"{epoch_seconds:.0f}", f"{peak:.0f}"])
            print(rows[-1], flush=True)
    print(table(["framework", "store (uint8)", "seconds", "epoch s", "peak MiB"], rows))


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("what", choices=["memory", "workers", "isbi", "training"])
    p.add_argument("--sizes", type=ranged(int, 16), nargs="+", default=[256, 2048], help="volume sizes, MiB")
    p.add_argument("--backends", nargs="+", choices=list(PYTHONS), default=list(PYTHONS))
    p.add_argument("--checkpoint", help="default: an untrained network of --base channels")
    p.add_argument("--base", type=ranged(int, 1, 64), default=1)
    p.add_argument("--block", type=ranged(int, 32), default=1024)
    p.add_argument("--images", default=os.path.join(HERE, "..", "shared", "data", "isbi2012", "test_image"))
    p.add_argument("--work", default="/tmp/bench_volumes", help="where volumes and outputs are written")
    args = p.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    checkpoint = args.checkpoint or tiny_checkpoint(os.path.join(args.work, f"tiny-{args.base}.npz"), args.base)
    print(f"bench_volumes {args.what}: {os.cpu_count()} cores, checkpoint {checkpoint}", flush=True)
    {"memory": bench_memory, "workers": bench_workers, "isbi": bench_isbi, "training": bench_training}[args.what](
        args, checkpoint)


if __name__ == "__main__":
    main()
