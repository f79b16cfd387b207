"""The one place where the deep-learning framework is chosen: OneFlow (default) or PyTorch.

    UNET_BACKEND=oneflow   OneFlow 0.9 (CPython 3.8-3.10)
    UNET_BACKEND=torch     PyTorch
    unset                  OneFlow when it imports, else PyTorch

OneFlow mirrors PyTorch's API, so the rest of the code writes `flow.cat`, `nn.Conv2d`, `F.pad`
against whichever module was imported here, plus the few helpers below where the two differ.
"""
import contextlib
import importlib
import importlib.util
import os
import random

import numpy as np

# Measured on our CPUs: OneFlow's oneDNN path is 1.5-2.5x slower than its own kernels.
os.environ.setdefault("ONEFLOW_ENABLE_ONEDNN_OPTS", "0")
# OneFlow's CUDA build logs warnings about the missing GPU driver and InfiniBand at every start.
os.environ.setdefault("GLOG_minloglevel", "2")

INSTALL = {"oneflow": "pip install 'biounet[oneflow]' (CPython 3.9-3.10)", "torch": "pip install 'biounet[torch]'"}


def _framework(name, chosen):
    """The framework's module; without it, one line saying which extra installs it (`chosen`: by UNET_BACKEND)."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        if getattr(err, "name", None) != name:
            raise  # the framework is there but broken: its own message says why
        wanted = f"UNET_BACKEND={name} needs {name}: {INSTALL[name]}" if chosen else (
            f"no deep-learning framework installed: {INSTALL['torch']}, or {INSTALL['oneflow']}")
        raise SystemExit(f"error: {wanted}") from None


NAME = os.environ.get("UNET_BACKEND", "").strip().lower()
if NAME not in ("", "oneflow", "torch"):
    raise SystemExit(f"error: UNET_BACKEND must be 'oneflow' or 'torch', not {NAME!r}")
_CHOSEN = bool(NAME)
if not NAME:
    NAME = "oneflow" if importlib.util.find_spec("oneflow") else "torch"
flow = _framework(NAME, _CHOSEN)

nn = flow.nn
F = flow.nn.functional


def default_device():
    # Checked first on purpose: any CUDA call on a GPU-less machine aborts OneFlow (exit 134).
    return "cuda" if flow.cuda.is_available() else "cpu"


def resolve_device(name="auto"):
    if name == "auto":
        return local_device(default_device())
    if name.startswith("cuda") and not flow.cuda.is_available():
        raise SystemExit(f"error: --device {name} asked for, but {NAME} sees no CUDA GPU")
    return local_device(name)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    flow.manual_seed(seed)


def to_tensor(array, device="cpu", dtype=np.float32):
    """A tensor copy of a numpy array (dtype=None keeps the array's own; 0-d stays 0-d)."""
    return flow.from_numpy(np.array(array, dtype=dtype, order="C")).to(device)


def to_numpy(tensor):
    return tensor.detach().cpu().numpy()


# ---- mixed precision (--amp) ----

PRECISIONS = ("off", "bf16", "fp16")


def precision_problem(precision, device, framework=NAME):
    """Why --amp `precision` cannot run on `device` with `framework`, or None when it can."""
    if precision == "off":
        return None
    if framework == "oneflow" and not device.startswith("cuda"):
        return "--amp: OneFlow 0.9 has no mixed precision on a CPU (it stays float32); leave --amp off"
    if precision == "fp16" and not device.startswith("cuda"):
        return "--amp fp16 needs a CUDA GPU; on a CPU use --amp bf16 (PyTorch)"
    if precision == "fp16" and framework == "oneflow":
        return "--amp fp16 needs loss scaling, which OneFlow 0.9 has only for nn.Graph: use --amp bf16"
    return None


def autocast(device, precision):
    """The forward pass in `precision` ('bf16', 'fp16') where it pays, float32 elsewhere; 'off': all float32."""
    if precision == "off":
        return contextlib.nullcontext()
    dtype = flow.bfloat16 if precision == "bf16" else flow.float16
    return flow.autocast(device_type=device.split(":")[0], dtype=dtype)


def grad_scaler(precision):
    """fp16 gradients underflow without loss scaling (bf16 has float32's range): a GradScaler, or None."""
    return flow.amp.GradScaler("cuda") if precision == "fp16" else None


# ---- compiled forward passes (prediction's --compile) ----

def compiled(model, precision="off"):
    """`model` with a compiled forward pass for inference (its attributes as before): torch.compile,
    or OneFlow's nn.Graph, one per input shape, built at its first call (OneFlow's autocast does not
    reach into a graph: `precision` is the graph's own)."""
    if NAME == "torch":
        return flow.compile(model, dynamic=False)
    return _GraphForward(model, precision)


class _GraphForward:
    def __init__(self, model, precision):
        self.model, self.precision, self.graphs = model, precision, {}

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, x):
        key = tuple(x.shape)
        if key not in self.graphs:
            self.graphs[key] = _forward_graph(self.model, self.precision)
        return self.graphs[key](x)


def _forward_graph(model, precision):
    class Forward(flow.nn.Graph):
        def __init__(self):
            super().__init__()
            self.model = model
            if precision != "off":
                self.config.enable_amp(True, dtype=flow.bfloat16 if precision == "bf16" else flow.float16)

        def build(self, x):
            return self.model(x)
    return Forward()


# ---- data-parallel runs (launched by `python3 -m oneflow.distributed.launch` or `torchrun`) ----

def distributed():
    """(rank, world size) of this process: a launcher's WORLD_SIZE > 1 joins the process group
    (gloo on CPU, NCCL on CUDA for PyTorch; OneFlow joins by itself); (0, 1) when run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if NAME == "torch":
        if not flow.distributed.is_initialized():
            flow.distributed.init_process_group("nccl" if flow.cuda.is_available() else "gloo")
        return flow.distributed.get_rank(), flow.distributed.get_world_size()
    return flow.env.get_rank(), flow.env.get_world_size()


def local_device(device):
    """The device of this process: a launched process on CUDA takes the GPU of its LOCAL_RANK."""
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        wanted, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), flow.cuda.device_count()
        if wanted > gpus:  # every process finds this, so rank 0 can speak for all
            raise SystemExit(f"error: {wanted} data-parallel processes on this machine need a GPU each, and it has "
                             f"{gpus}: set NPROC_PER_NODE={gpus} (or --device cpu)")
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def data_parallel(model, device):
    """`model` whose gradients are averaged over the processes after each backward pass."""
    if NAME == "torch":
        ids = [flow.device(device).index] if device.startswith("cuda") else None
        return flow.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return flow.nn.parallel.DistributedDataParallel(model)


def all_sum(values, device, world):
    """The element-wise sum of a list of floats over the processes (the list itself when alone)."""
    if world <= 1:
        return list(values)
    total = to_tensor(values, device)
    if NAME == "torch":
        flow.distributed.all_reduce(total)
    else:
        flow.comm.all_reduce(total)
    return to_numpy(total).tolist()


def wait_for_all(device, world):
    """Return once every process has come here. OneFlow aborts a process whose peer has left
    ("Machine 1 lost"), so the processes of a run leave together, after the last of them is done."""
    all_sum([0.0], device, world)


def cores():
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0))


def default_processes():
    """Data-parallel processes that make the most of this machine by default: OneFlow 0.9 computes
    on one core per process, so on a CPU one process per core; otherwise one (PyTorch uses threads)."""
    if NAME == "oneflow" and default_device() == "cpu":
        return cores()
    return 1


def default_workers(tasks):
    """Processes that share out `tasks` (images, blocks) by default: OneFlow computes on one core per
    process, so on a CPU one per core, each with at least 4 tasks (a process takes seconds to
    start); PyTorch uses all cores from one process."""
    return max(1, min(default_processes(), tasks // 4))


def cpu_speed_note(device, command, faster):
    """The line a OneFlow run on a CPU starts with: what the other framework would cost here."""
    if NAME != "oneflow" or not device.startswith("cpu"):
        return None
    return (f"note: OneFlow 0.9 convolves at 6-25 GFLOP/s on one CPU core, PyTorch at 77-190 on two here "
            f"(BENCHMARKS.md): `UNET_BACKEND=torch {command}` {faster} on this machine")


def before_processes_share_the_cores():
    """Called before starting processes that share the cores: OneFlow computes on their main thread
    (measured: its second busy thread per process cost ~10% of a two-process training run)."""
    os.environ.setdefault("ONEFLOW_VM_COMPUTE_ON_WORKER_THREAD", "0")


def set_threads(count):
    """At most `count` compute threads in this process (so processes x threads never exceeds the
    cores). OneFlow 0.9 computes on one core whatever is set."""
    if NAME == "torch":
        flow.set_num_threads(max(1, count))
