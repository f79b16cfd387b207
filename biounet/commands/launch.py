"""Start a data-parallel training run through the framework's own launcher: OneFlow's
`oneflow.distributed.launch`, or PyTorch's `torchrun`. train.sh calls it when NPROC_PER_NODE > 1.

    python -m biounet.commands.launch --nproc-per-node 2 TrainUnetDataSet.py ARGS...
    python -m biounet.commands.launch --nproc-per-node 4 --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 \\
        TrainUnetDataSet.py ARGS...

When a process fails, the launcher stops the others; the processes have said why, so the launcher's
own traceback is left out and the exit status is 1.
"""
import runpy
import socket
import sys

from biounet.core.cli import ArgumentParser, ranged
from biounet.model import backend


def launcher_argv(args):
    """The launcher's command line for `args` (ours, in one spelling for both frameworks). The
    launchers would take the script's --log for an abbreviation of their own --log-dir: it is
    passed on as --log-file, the same flag."""
    script_args = ["--log-file" if a == "--log" else "--log-file=" + a[6:] if a.startswith("--log=") else a
                   for a in args.script_args]
    if backend.NAME == "torch":
        return ["torchrun", "--nproc-per-node", str(args.nproc_per_node), "--nnodes", str(args.nnodes),
                "--node-rank", str(args.node_rank), "--master-addr", args.master_addr,
                "--master-port", str(args.master_port), args.script, *script_args]
    return ["launch", "--nproc_per_node", str(args.nproc_per_node), "--nnodes", str(args.nnodes),
            "--node_rank", str(args.node_rank), "--master_addr", args.master_addr,
            "--master_port", str(args.master_port), args.script, *script_args]


def is_this_host(address):
    """Whether `address` (a name or an IP) is this machine."""
    try:
        ip = socket.gethostbyname(address)
        return ip.startswith("127.") or ip == socket.gethostbyname(socket.gethostname())
    except OSError:
        return False


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--nproc-per-node", type=ranged(int, 1, 1024), default=1, help="processes on this machine")
    p.add_argument("--nnodes", type=ranged(int, 1, 4096), default=1, help="machines")
    p.add_argument("--node-rank", type=ranged(int, 0), default=0, help="this machine's number, 0..nnodes-1")
    p.add_argument("--master-addr", default="127.0.0.1", help="address of machine 0")
    p.add_argument("--master-port", type=ranged(int, 1, 65535), default=29500, help="free port on machine 0")
    p.add_argument("script", help="the training script, TrainUnetDataSet.py")
    p.add_argument("script_args", nargs="...", help="its arguments")
    args = p.parse_args(argv)
    if backend.NAME == "oneflow" and args.node_rank > 0 and is_this_host(args.master_addr):
        # OneFlow 0.9 aborts both nodes about 20 s later ("Machine 1 lost"): say so at once.
        p.error(f"--master-addr {args.master_addr} is this machine: OneFlow 0.9 runs one node per machine; "
                f"on one machine use --nproc-per-node (NPROC_PER_NODE) for its processes")
    if args.nproc_per_node > 1:
        backend.before_processes_share_the_cores()
    sys.argv = launcher_argv(args)
    module = "torch.distributed.run" if backend.NAME == "torch" else "oneflow.distributed.launch"
    try:
        runpy.run_module(module, run_name="__main__")
    except SystemExit:
        raise
    except Exception:  # a process failed; it printed its error, the launcher stopped the rest
        sys.exit(1)


if __name__ == "__main__":
    main()
