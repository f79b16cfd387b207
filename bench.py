"""Time a U-Net training step and a whole-slice prediction on OneFlow and PyTorch, side by side.

    python bench.py                          # both backends, the CPU preset's and the paper's widths
    python bench.py --bases 16 --sizes 256 512 --steps 5

Each backend runs in its own environment (.venv for OneFlow, .venv-torch for PyTorch) in a
subprocess, one after the other, and the table compares them. Times are medians after a warm-up.
"""
import argparse
import itertools
import json
import os
import subprocess
import sys
import time

from cli import ArgumentParser, ranged

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHONS = {"oneflow": os.path.join(HERE, ".venv", "bin", "python"),
           "torch": os.path.join(HERE, ".venv-torch", "bin", "python")}


def measure(base, size, batch, steps, norm):
    """Median seconds of one Adam+BCE train step and of one inference on a 512x512 slice."""
    import numpy as np

    import backend
    from unet import UNet

    device = backend.default_device()
    model = UNet(base=base, norm=norm).to(device)
    optimizer = backend.flow.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    x = backend.to_tensor(rng.random((batch, 1, size, size)), device)
    y = backend.to_tensor(rng.random((batch, 1, size, size)) > 0.5, device)
    train_times = []
    for _ in range(steps + 1):
        begin = time.perf_counter()
        loss = backend.F.binary_cross_entropy_with_logits(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()
        train_times.append(time.perf_counter() - begin)
    model.eval()
    slice_ = backend.to_tensor(rng.random((1, 1, 512, 512)), device)
    infer_times = []
    with backend.flow.no_grad():
        for _ in range(steps + 1):
            begin = time.perf_counter()
            model(slice_).sum().item()
            infer_times.append(time.perf_counter() - begin)
    return dict(device=device, train_s=float(np.median(train_times[1:])), infer_512_s=float(np.median(infer_times[1:])))


def time_scoring(repeats=5):
    """Median seconds to score one 512x512 slice with every metric (ISBI threshold sweep included)."""
    import cv2
    import numpy as np

    from fetch_data import synthetic_em_slice
    from metrics import all_scores

    _, label = synthetic_em_slice(512, np.random.default_rng(0), cell_size=30)
    truth = label > 0
    prob = cv2.GaussianBlur(truth.astype(np.float32), (0, 0), 2)
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        all_scores(prob, truth)
        times.append(time.perf_counter() - begin)
    return float(np.median(times))


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--bases", type=ranged(int, 1, 1024), nargs="+", default=[16, 64])
    p.add_argument("--sizes", type=ranged(int, 32, 8192), nargs="+", default=[256])
    p.add_argument("--batch", type=ranged(int, 1), default=1)
    p.add_argument("--norms", nargs="+", default=["batch", "instance"], choices=["batch", "instance"])
    p.add_argument("--steps", type=ranged(int, 1), default=3)
    p.add_argument("--backends", nargs="+", default=["oneflow", "torch"], choices=list(PYTHONS))
    p.add_argument("--skip-scoring", action="store_true", help="leave out the timing of the metrics")
    p.add_argument("--worker", nargs=4, metavar=("BASE", "SIZE", "BATCH", "NORM"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        base, size, batch, norm = args.worker
        print(json.dumps(measure(int(base), int(size), int(batch), args.steps, norm)))
        return

    print("| backend | device | base | norm | train crop | batch | train step (s) | predict 512x512 (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for base, size, norm in itertools.product(args.bases, args.sizes, args.norms):
        for name in args.backends:
            row = f"| {name} | {{}} | {base} | {norm} | {size} | {args.batch} |"
            if not os.path.exists(PYTHONS[name]):
                print(row.format("-") + f" not installed ({PYTHONS[name]}) | - |")
                continue
            result = subprocess.run([PYTHONS[name], __file__, "--worker", str(base), str(size), str(args.batch), norm,
                                     "--steps", str(args.steps)], env={**os.environ, "UNET_BACKEND": name},
                                    capture_output=True, text=True)
            if result.returncode != 0:
                sys.exit(f"error: {name} benchmark failed:\n{result.stderr}")
            r = json.loads(result.stdout.strip().splitlines()[-1])
            print(row.format(r["device"]) + f" {r['train_s']:.2f} | {r['infer_512_s']:.2f} |", flush=True)
    if not args.skip_scoring:
        print(f"\nscoring one 512x512 slice (all metrics, ISBI threshold sweep): {time_scoring():.3f} s")


if __name__ == "__main__":
    main()
