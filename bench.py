"""Training and prediction speed of the U-Net on OneFlow and PyTorch, side by side, against the machine's limit.

    python bench.py                    # 256 and 512 pixels, base 16: one table
    python bench.py --sizes 512 --base 64 --steps 5
    python bench.py --quick            # a tiny run that checks the benchmark itself (the test suite's)

Rows: OneFlow with one process, OneFlow with one process per core (as train.sh and test.sh run it
on a CPU), PyTorch. Each row runs in its backend's environment (.venv, .venv-torch) in separate
processes, one row after the other; the processes of a row run at once and their images/s add up.
Columns: training and prediction images/s (median step after a warm-up; Adam + BCE, batch 1,
instance norm), the peak memory of a process, the model's FLOPs per image (convolutions, counted
from the layers) and the GFLOP/s achieved (training counted as 3x the forward pass). The limit:
a large float32 matrix product on all cores (numpy), measured in the same run.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

from cli import ArgumentParser, ranged

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHONS = {"oneflow": os.path.join(HERE, ".venv", "bin", "python"),
           "torch": os.path.join(HERE, ".venv-torch", "bin", "python")}


def forward_flops(base, size):
    """Multiply-adds x 2 of the convolutions of one forward pass on a size x size grey image."""
    import numpy as np

    import backend
    from unet import UNet
    model, total = UNet(base=base, norm="instance"), []

    def count(module, inputs, output):
        kernel = module.weight.shape  # conv: out, in, k, k; transposed: in, out, k, k
        pixels = (inputs[0] if isinstance(module, backend.nn.ConvTranspose2d) else output).shape[2:]
        total.append(2 * int(np.prod(kernel)) * int(np.prod(pixels)))
    for module in model.modules():  # a throw-away model: OneFlow's hooks cannot be removed
        if isinstance(module, (backend.nn.Conv2d, backend.nn.ConvTranspose2d)):
            module.register_forward_hook(count)
    with backend.flow.no_grad():
        model(backend.to_tensor(np.zeros((1, 1, size, size))))
    return sum(total)


def measure(base, size, steps, threads):
    """One process's figures: training and prediction images/s, peak memory, FLOPs per image."""
    import numpy as np

    import backend
    from unet import UNet

    backend.set_threads(threads)
    model = UNet(base=base, norm="instance")
    optimizer = backend.flow.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    x = backend.to_tensor(rng.random((1, 1, size, size)))
    y = backend.to_tensor(rng.random((1, 1, size, size)) > 0.5)

    def train_step():
        loss = backend.F.binary_cross_entropy_with_logits(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()

    def predict():
        with backend.flow.no_grad():
            model(x).sum().item()

    def median_seconds(step):
        times = []
        for _ in range(steps + 1):
            begin = time.perf_counter()
            step()
            times.append(time.perf_counter() - begin)
        return float(np.median(times[1:]))
    train_s = median_seconds(train_step)
    model.eval()
    predict_s = median_seconds(predict)
    return dict(train=1 / train_s, predict=1 / predict_s, flops=forward_flops(base, size),
                memory_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def matmul_gflops(n=2048, repeats=3):
    """GFLOP/s of a float32 n x n matrix product on all cores (numpy's BLAS): the machine's limit."""
    import numpy as np
    a = np.random.default_rng(0).random((n, n), np.float32)
    a @ a
    begin = time.perf_counter()
    for _ in range(repeats):
        a @ a
    return 2 * n ** 3 * repeats / (time.perf_counter() - begin) / 1e9


def run_row(backend_name, processes, base, size, steps):
    """Sum of images/s over `processes` processes measuring at once; the rest from the first."""
    cores = len(os.sched_getaffinity(0))
    command = [PYTHONS[backend_name], __file__, "--worker", str(base), str(size), str(steps),
               str(max(1, cores // processes))]
    running = [subprocess.Popen(command, env={**os.environ, "UNET_BACKEND": backend_name}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(processes)]
    results = []
    for process in running:
        out, err = process.communicate()
        if process.returncode != 0:
            sys.exit(f"error: {backend_name} benchmark failed:\n{err[-2000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return dict(results[0], train=sum(r["train"] for r in results), predict=sum(r["predict"] for r in results))


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--sizes", type=ranged(int, 32, 8192), nargs="+", default=[256, 512])
    p.add_argument("--base", type=ranged(int, 1, 1024), default=16)
    p.add_argument("--steps", type=ranged(int, 1), default=3, help="timed steps after one warm-up")
    p.add_argument("--backends", nargs="+", default=["oneflow", "torch"], choices=list(PYTHONS))
    p.add_argument("--quick", action="store_true", help="64 pixels, base 4, one step: checks the benchmark runs")
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        base, size, steps, threads = map(int, args.worker)
        print(json.dumps(measure(base, size, steps, threads)))
        return
    if args.quick:
        args.sizes, args.base, args.steps = [64], 4, 1
    cores = len(os.sched_getaffinity(0))
    limit = matmul_gflops(512 if args.quick else 2048)
    modes = [(name, n) for name in args.backends for n in ([1, cores] if name == "oneflow" and cores > 1 else [1])]
    print(f"limit: float32 matrix product on {cores} cores: {limit:.1f} GFLOP/s\n")
    print("| size | backend | processes | train img/s | predict img/s | peak MB/process | GFLOP/image | "
          "train GFLOP/s | predict GFLOP/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    best = {}
    for size in args.sizes:
        for name, processes in modes:
            if not os.path.exists(PYTHONS[name]):
                print(f"| {size} | {name} | - | not installed ({PYTHONS[name]}) | | | | | |")
                continue
            r = run_row(name, processes, args.base, size, args.steps)
            gflop = r["flops"] / 1e9
            print(f"| {size} | {name} | {processes} | {r['train']:.2f} | {r['predict']:.2f} | {r['memory_mb']:.0f} | "
                  f"{gflop:.3g} | {3 * gflop * r['train']:.1f} | {gflop * r['predict']:.1f} |", flush=True)
            for kind in ("train", "predict"):
                key = (size, name, kind)
                best[key] = max(best.get(key, 0), r[kind])
            best[(size, name, "predict_gflops")] = max(best.get((size, name, "predict_gflops"), 0), gflop * r["predict"])
    size = max(args.sizes)
    if (size, "oneflow", "train") in best and (size, "torch", "train") in best:
        print(f"\nat {size}px, OneFlow's best / PyTorch: training {best[(size, 'oneflow', 'train')] / best[(size, 'torch', 'train')]:.2f}, "
              f"prediction {best[(size, 'oneflow', 'predict')] / best[(size, 'torch', 'predict')]:.2f}")
    if (size, "torch", "predict_gflops") in best:
        print(f"PyTorch prediction at {size}px: {best[(size, 'torch', 'predict_gflops')] / limit:.0%} of the "
              f"matrix-product limit")


if __name__ == "__main__":
    main()
