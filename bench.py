"""Time a U-Net training step and a whole-slice prediction on OneFlow and PyTorch, side by side.

    python bench.py                          # both backends, the CPU preset's and the paper's widths
    python bench.py --bases 16 --sizes 256 512 --steps 5

Each backend runs in its own environment (.venv for OneFlow, .venv-torch for PyTorch) in a
subprocess, one after the other, and the table compares them. Times are medians after a warm-up.
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHONS = {"oneflow": os.path.join(HERE, ".venv", "bin", "python"),
           "torch": os.path.join(HERE, ".venv-torch", "bin", "python")}


def measure(base, size, batch, steps):
    """Median seconds of one Adam+BCE train step and of one inference on a 512x512 slice."""
    import numpy as np

    import backend
    from unet import UNet

    device = backend.default_device()
    model = UNet(base=base).to(device)
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bases", type=int, nargs="+", default=[16, 64])
    p.add_argument("--sizes", type=int, nargs="+", default=[256])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--backends", nargs="+", default=["oneflow", "torch"], choices=list(PYTHONS))
    p.add_argument("--worker", nargs=3, type=int, metavar=("BASE", "SIZE", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(measure(*args.worker, args.steps)))
        return

    print(f"| backend | device | base | train crop | batch | train step (s) | predict 512x512 (s) |")
    print(f"| --- | --- | --- | --- | --- | --- | --- |")
    for base in args.bases:
        for size in args.sizes:
            for name in args.backends:
                if not os.path.exists(PYTHONS[name]):
                    print(f"| {name} | - | {base} | {size} | {args.batch} | not installed ({PYTHONS[name]}) | - |")
                    continue
                result = subprocess.run([PYTHONS[name], __file__, "--worker", str(base), str(size), str(args.batch),
                                         "--steps", str(args.steps)], env={**os.environ, "UNET_BACKEND": name},
                                        capture_output=True, text=True)
                if result.returncode != 0:
                    sys.exit(f"error: {name} benchmark failed:\n{result.stderr}")
                r = json.loads(result.stdout.strip().splitlines()[-1])
                print(f"| {name} | {r['device']} | {base} | {size} | {args.batch} | {r['train_s']:.2f} "
                      f"| {r['infer_512_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
