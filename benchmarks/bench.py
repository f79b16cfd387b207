"""Training and prediction speed of the U-Net on OneFlow and PyTorch, side by side, against the machine's limit.

    python benchmarks/bench.py                    # 256 and 512 pixels, base 16, CPU: one table
    python benchmarks/bench.py --sizes 512 --base 64 --norm batch --batch 16 --device cuda --amp bf16 --backends torch
    python benchmarks/bench.py --quick            # a tiny run that checks the benchmark itself (the test suite's)
    python benchmarks/bench.py --pipeline --base 2 --backends oneflow torch   # the real training loop: loader workers, overheads

Rows: OneFlow eager with one process and with one process per core (as train.sh and test.sh run it
on a CPU), OneFlow's nn.Graph, PyTorch eager and torch.compile. Each row runs in its backend's
environment (.venv, .venv-torch; --oneflow-python, --torch-python) in separate processes, one row
after the other; the processes of a row run at once and their images/s add up; a mode that fails
says why in its row. Columns: training and prediction images/s (median step after two warm-ups;
Adam + BCE), the peak memory of a process (on CUDA: tensors), the model's FLOPs per image
(convolutions, counted from the layers) and the GFLOP/s achieved (training counted as 3x the
forward pass). The limit, measured in the same run: a large float32 matrix product on all cores
(numpy), on CUDA one on the GPU in the run's precision.

--pipeline times TrainUnetDataSet.py itself, as train.sh runs it, on the ISBI slices (--images,
--labels; whole 512 x 512 slices, elastic + affine, the weight map, batches of --batch): the seconds
of an epoch that neither validates nor ends the run, with 0, 1 and 2 --loader-workers, its images/s
and their ratio to the bare step's (the rows above, measured in the same run); and what an epoch
that validates, draws progress.png and writes last.npz costs on top. Then predict_unet_test.py as
test.sh runs it (one process, the 8 views, a network of --base), eager and --compile, on the first
image of --test-images (twice: the first run fills torch.compile's cache) and on all of them: its
start-up, its images/s after start-up, and their ratio to the bare forward pass's (an image is 8 passes).
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import time

from biounet.core.cli import ArgumentParser, ranged

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project


def forward_flops(base, size):
    """Multiply-adds x 2 of the convolutions of one forward pass on a size x size grey image."""
    import numpy as np

    from biounet.model import backend
    from biounet.model.unet import UNet
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


def measure(base, size, steps, threads, device, batch, norm, amp, mode):
    """One process's figures: training and prediction images/s, peak memory, FLOPs per image.
    mode: eager, graph (OneFlow's nn.Graph, one per shape) or compile (torch.compile)."""
    import numpy as np

    from biounet.model import backend
    from biounet.model.unet import UNet

    backend.set_threads(threads)
    flow, F = backend.flow, backend.F
    model = UNet(base=base, norm=norm).to(device)
    optimizer = flow.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    x = backend.to_tensor(rng.random((batch, 1, size, size)), device)
    y = backend.to_tensor(rng.random((batch, 1, size, size)) > 0.5, device)

    def loss_of(net, x, y, precision=amp):
        with backend.autocast(device, precision):
            logits = net(x)
        return F.binary_cross_entropy_with_logits(logits.float(), y)

    if mode == "graph":
        train_graph, predict_graph = oneflow_graph(model, optimizer, loss_of, amp != "off"), backend.compiled(model, amp)
        train_step = lambda: train_graph(x, y).item()  # noqa: E731
        predict = lambda: predict_graph(x).sum().item()  # noqa: E731
    else:
        net = flow.compile(model) if mode == "compile" else model

        def train_step():
            loss = loss_of(net, x, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()

        def predict():
            with flow.no_grad(), backend.autocast(device, amp):
                net(x).float().sum().item()

    def median_seconds(step):
        times = []
        for _ in range(steps + 2):  # two warm-ups: graphs and compiled code are built on the first calls
            begin = time.perf_counter()
            step()
            times.append(time.perf_counter() - begin)
        return float(np.median(times[2:]))
    train_s = median_seconds(train_step)
    model.eval()
    predict_s = median_seconds(predict)
    memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.startswith("cuda") and backend.NAME == "torch":
        memory = flow.cuda.max_memory_allocated() / 2 ** 20
    return dict(train=batch / train_s, predict=batch / predict_s, flops=forward_flops(base, size), memory_mb=memory)


def oneflow_graph(model, optimizer, loss_of, amp):
    """OneFlow's nn.Graph of a training step (returns the loss); `amp`: the graph's own mixed
    precision (OneFlow's eager autocast does not apply inside a graph). The forward pass's graph is
    backend.compiled's."""
    import oneflow as flow

    class TrainStep(flow.nn.Graph):
        def __init__(self):
            super().__init__()
            self.model = model
            self.add_optimizer(optimizer)
            self.config.enable_amp(amp)

        def build(self, x, y):
            loss = loss_of(self.model, x, y, "off")
            loss.backward()
            return loss

    return TrainStep()


def matmul_gflops(n=2048, repeats=3):
    """GFLOP/s of a float32 n x n matrix product on all cores (numpy's BLAS): the machine's limit."""
    import numpy as np
    a = np.random.default_rng(0).random((n, n), np.float32)
    a @ a
    begin = time.perf_counter()
    for _ in range(repeats):
        a @ a
    return 2 * n ** 3 * repeats / (time.perf_counter() - begin) / 1e9


def gpu_matmul_gflops(device, amp, n=8192, repeats=20):
    """GFLOP/s of an n x n matrix product on the GPU in the run's precision: the GPU's limit."""
    from biounet.model import backend
    flow = backend.flow
    a = flow.rand(n, n, device=device, dtype=flow.float32 if amp == "off" else
                  flow.bfloat16 if amp == "bf16" else flow.float16)
    (a @ a).sum().item()
    begin = time.perf_counter()
    for _ in range(repeats):
        b = a @ a
    b.sum().item()
    return 2 * n ** 3 * repeats / (time.perf_counter() - begin) / 1e9


def run_worker(python, backend_name, args):
    """The last line of `python benchmarks/bench.py --worker ARGS` (JSON) in a process of its own."""
    return subprocess.Popen([python, __file__, "--worker", json.dumps(args)],
                            env={**os.environ, "UNET_BACKEND": backend_name}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run_row(python, backend_name, processes, settings):
    """Sum of images/s over `processes` processes measuring at once; the rest from the first
    (a string saying why, when the mode fails)."""
    threads = max(1, len(os.sched_getaffinity(0)) // processes)
    running = [run_worker(python, backend_name, dict(settings, threads=threads)) for _ in range(processes)]
    results = []
    for process in running:
        out, err = process.communicate()
        if process.returncode != 0:
            return "failed: " + (err.strip().splitlines() or ["exit %d" % process.returncode])[-1][:150]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return dict(results[0], train=sum(r["train"] for r in results), predict=sum(r["predict"] for r in results))


MODES = {"oneflow": ("eager", "graph"), "torch": ("eager", "compile")}


def rows_to_run(args, cores):
    """(backend, processes, mode) of each row: every mode asked for that the backend has; OneFlow
    eager also with one process per core on a CPU (as train.sh and test.sh run it)."""
    rows = []
    for name in args.backends:
        for mode in MODES[name]:
            if mode in args.modes:
                rows.append((name, 1, mode))
                if name == "oneflow" and mode == "eager" and cores > 1 and args.device == "cpu":
                    rows.append((name, cores, mode))
    return rows


def pipeline_epochs(python, backend_name, args, workers, extra=()):
    """Seconds of each epoch of a real training run (TrainUnetDataSet.py, from its JSON log)."""
    import tempfile
    with tempfile.TemporaryDirectory() as out:
        command = [python, os.path.join(HERE, "TrainUnetDataSet.py"), "--data-path", args.images, "--label-path",
                   args.labels, "--base", str(args.base), "--crop", "0", "--batch-size", str(args.batch),
                   "--norm", args.norm, "--weight-map", "--aug-elastic", "1", "--aug-affine", "1", "--no-calibrate",
                   "--loader-workers", str(workers), "--epochs", "3", "--val-fraction", "0.2", "--device", args.device,
                   "--checkpoint-dir", out, "--log-file", os.path.join(out, "log.txt"), *extra]
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "UNET_BACKEND": backend_name})
        if result.returncode != 0:
            raise SystemExit(f"error: {' '.join(command)}:\n{result.stderr[-2000:]}")
        with open(os.path.join(out, "log.jsonl")) as f:
            records = [json.loads(line) for line in f]
    return [r["time"] for r in records if "epoch" in r and "event" not in r]


def prediction_seconds(python, backend_name, checkpoint, images, flags, cache):
    """Wall seconds of `predict_unet_test.py` on the image folder `images`, as test.sh runs it
    (torch.compile's cache in the folder `cache`)."""
    import tempfile
    with tempfile.TemporaryDirectory() as out:
        command = [python, os.path.join(HERE, "predict_unet_test.py"), "--checkpoint", checkpoint, "--test-data-path",
                   images, "--save-res-path", out, "--workers", "1", *flags]
        begin = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True,
                                env={**os.environ, "UNET_BACKEND": backend_name, "TORCHINDUCTOR_CACHE_DIR": cache})
        if result.returncode != 0:
            raise SystemExit(f"error: {' '.join(command)}:\n{result.stderr[-2000:]}")
        return time.perf_counter() - begin


def bench_prediction(args, pythons, bare_rates):
    """Start-up and images/s of the real prediction path, eager and compiled, against the bare forward pass."""
    import tempfile

    from biounet.core.files import list_images
    images = list_images(args.test_images)
    print(f"\nprediction: {len(images)} images of {args.test_images}, 8 views, base {args.base}, {args.device}\n")
    print("| backend | mode | first start-up s | start-up s | img/s after start-up | bare forward img/s / 8 | path / bare |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as work:
        first = os.path.join(work, "first")
        os.makedirs(first)
        os.symlink(os.path.abspath(images[0]), os.path.join(first, os.path.basename(images[0])))
        for name in args.backends:
            checkpoint = os.path.join(work, f"{name}.npz")
            subprocess.run([pythons[name], "-c", "import sys, backend, unet, checkpoint; backend.seed_everything(0); "
                            "checkpoint.save_checkpoint(sys.argv[1], unet.UNet(base=int(sys.argv[2]), norm=sys.argv[3]))",
                            checkpoint, str(args.base), args.norm], check=True, capture_output=True,
                           env={**os.environ, "UNET_BACKEND": name})
            for mode, flags in (("eager", ["--device", args.device]), ("compile", ["--device", args.device, "--compile"])):
                cache = os.path.join(work, f"cache-{name}-{mode}")  # empty at first: the first start-up's compiling
                cold = prediction_seconds(pythons[name], name, checkpoint, first, flags, cache)
                one = prediction_seconds(pythons[name], name, checkpoint, first, flags, cache)
                every = prediction_seconds(pythons[name], name, checkpoint, args.test_images, flags, cache)
                rate = (len(images) - 1) / (every - one)
                bare = bare_rates.get(name, float("nan")) / 8
                print(f"| {name} | {mode} | {cold - 1 / rate:.1f} | {one - 1 / rate:.1f} | {rate:.2f} | {bare:.2f} | "
                      f"{rate / bare:.0%} |", flush=True)


def bench_pipeline(args, pythons):
    """The training loop's own rate against the bare step's, and its per-epoch overheads."""
    from biounet.core.files import list_images
    pairs = round(len(list_images(args.images)) * 0.8)
    if not args.prediction_only:
        print(f"pipeline: {pairs} training slices of {args.images}, base {args.base}, batch {args.batch}, "
              f"{args.device}, whole slices, elastic + affine, weight map\n")
        print("| backend | loader workers | epoch s | img/s | vs none | bare step img/s | loop / bare step |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
    overheads, bare_predict = [], {}
    for name in args.backends:
        bare = run_row(pythons[name], name, 1, dict(base=args.base, size=512, steps=args.steps, device=args.device,
                                                     batch=args.batch, norm=args.norm, amp=args.amp, mode="eager"))
        bare_rate = bare["train"] if isinstance(bare, dict) else float("nan")
        if isinstance(bare, dict):
            bare_predict[name] = bare["predict"]
        if args.prediction_only:
            continue
        first = None
        for workers in (0, 1, 2):
            # epochs 1 and 2 of 3 neither validate (--val-every 3) nor draw, and write only last.npz
            seconds = min(pipeline_epochs(pythons[name], name, args, workers, ["--val-every", "3", "--progress", ""])[:2])
            first = first or seconds
            print(f"| {name} | {workers} | {seconds:.2f} | {pairs / seconds:.1f} | {seconds / first:.2f}x | "
                  f"{bare_rate:.1f} | {pairs / seconds / bare_rate:.0%} |", flush=True)
        every = pipeline_epochs(pythons[name], name, args, 0, ["--val-every", "1", "--progress", "progress.png"])
        overheads.append(f"| {name} | {first:.2f} | {min(every[:2]):.2f} | {min(every[:2]) - first:+.2f} |")
    if overheads:
        print("\n| backend | epoch s: train only | with validation, progress.png, last.npz | overhead s |")
        print("| --- | --- | --- | --- |")
        print("\n".join(overheads))
    bench_prediction(args, pythons, bare_predict)


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--sizes", type=ranged(int, 32, 8192), nargs="+", default=[256, 512])
    p.add_argument("--base", type=ranged(int, 1, 1024), default=16)
    p.add_argument("--batch", type=ranged(int, 1, 4096), default=1, help="images per step of a process")
    p.add_argument("--norm", choices=["instance", "batch"], default="instance")
    p.add_argument("--steps", type=ranged(int, 1), default=3, help="timed steps after two warm-ups")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off", help="mixed precision (CUDA)")
    p.add_argument("--backends", nargs="+", default=["oneflow", "torch"], choices=list(MODES))
    p.add_argument("--modes", nargs="+", default=["eager", "graph", "compile"], choices=["eager", "graph", "compile"],
                   help="graph: OneFlow's nn.Graph; compile: torch.compile")
    p.add_argument("--oneflow-python", default=os.path.join(HERE, ".venv", "bin", "python"))
    p.add_argument("--torch-python", default=os.path.join(HERE, ".venv-torch", "bin", "python"))
    p.add_argument("--quick", action="store_true", help="64 pixels, base 4, one step, eager: checks the benchmark runs")
    p.add_argument("--pipeline", action="store_true", help="time the real training loop (see above)")
    p.add_argument("--images", default=os.path.join(HERE, "..", "shared", "data", "isbi2012", "train_image"))
    p.add_argument("--labels", default=os.path.join(HERE, "..", "shared", "data", "isbi2012", "train_label"))
    p.add_argument("--test-images", default=os.path.join(HERE, "..", "shared", "data", "isbi2012", "test_image"),
                   help="--pipeline: the images prediction is timed on")
    p.add_argument("--prediction-only", action="store_true", help="--pipeline: time prediction, not training")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        settings = json.loads(args.worker)
        if settings.pop("limit", False):
            print(json.dumps(gpu_matmul_gflops(settings["device"], settings["amp"])))
        else:
            print(json.dumps(measure(**settings)))
        return
    if args.quick:
        args.sizes, args.base, args.steps, args.modes = [64], 4, 1, ["eager"]
    pythons = {"oneflow": shutil.which(args.oneflow_python) or args.oneflow_python,
               "torch": shutil.which(args.torch_python) or args.torch_python}
    cores = len(os.sched_getaffinity(0))
    if args.pipeline:
        return bench_pipeline(args, pythons)
    if args.device.startswith("cuda"):
        out, err = run_worker(pythons["torch"], "torch", dict(limit=True, device=args.device, amp=args.amp)).communicate()
        limit, where = float(out.strip().splitlines()[-1]), f"{args.amp if args.amp != 'off' else 'float32'} matrix product on {args.device}"
    else:
        limit, where = matmul_gflops(512 if args.quick else 2048), f"float32 matrix product on {cores} cores"
    print(f"limit: {where}: {limit:.1f} GFLOP/s")
    print(f"model: base {args.base}, {args.norm} norm, batch {args.batch} per process, {args.device}, amp {args.amp}\n")
    print("| size | backend | mode | processes | train img/s | predict img/s | peak MB/process | GFLOP/image | "
          "train GFLOP/s | predict GFLOP/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    best = {}
    for size in args.sizes:
        for name, processes, mode in rows_to_run(args, cores):
            row = f"| {size} | {name} | {mode} | {processes} |"
            if not os.path.exists(pythons[name]):
                print(f"{row} not installed ({pythons[name]}) | | | | | |")
                continue
            r = run_row(pythons[name], name, processes, dict(base=args.base, size=size, steps=args.steps,
                                                            device=args.device, batch=args.batch, norm=args.norm,
                                                            amp=args.amp, mode=mode))
            if isinstance(r, str):
                print(f"{row} {r} | | | | | |", flush=True)
                continue
            gflop = r["flops"] / 1e9
            print(f"{row} {r['train']:.2f} | {r['predict']:.2f} | {r['memory_mb']:.0f} | {gflop:.3g} | "
                  f"{3 * gflop * r['train']:.1f} | {gflop * r['predict']:.1f} |", flush=True)
            for kind, value in (("train", r["train"]), ("predict", r["predict"]), ("predict_gflops", gflop * r["predict"])):
                best[(size, name, kind)] = max(best.get((size, name, kind), 0), value)
    size = max(args.sizes)
    if (size, "oneflow", "train") in best and (size, "torch", "train") in best:
        print(f"\nat {size}px, OneFlow's best / PyTorch's best: training "
              f"{best[(size, 'oneflow', 'train')] / best[(size, 'torch', 'train')]:.2f}, "
              f"prediction {best[(size, 'oneflow', 'predict')] / best[(size, 'torch', 'predict')]:.2f}")
    if (size, "torch", "predict_gflops") in best:
        print(f"PyTorch prediction at {size}px: {best[(size, 'torch', 'predict_gflops')] / limit:.0%} of the "
              f"matrix-product limit")


if __name__ == "__main__":
    main()
