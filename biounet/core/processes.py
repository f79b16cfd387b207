"""Work done by a pool of worker processes that outlives a worker's death.

A worker killed by the kernel's out-of-memory killer (or by anyone's `kill -9`) takes its task with
it: `multiprocessing.Pool` then waits for that task for ever. `concurrent.futures`' pool notices the
death at once and fails every task in flight (BrokenProcessPool); WatchedPool then starts a new pool
and hands it again the tasks that were lost, so that a task's result, which depends on the task
alone, is the one an undisturbed run gets.
"""
import ctypes
import multiprocessing
import signal
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from itertools import islice

from tqdm import tqdm

MAX_DEATHS = 3  # in one call of WatchedPool.results: a worker that dies this often dies of its task


class WorkersDied(RuntimeError):
    """Workers kept dying; the message says which, how, and what was kept."""


def die_with_parent():
    """Have the kernel kill this process when the one that started it dies (Linux's PR_SET_PDEATHSIG): a
    worker whose parent was killed would otherwise wait for work for ever, holding its memory."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)


def how_it_ended(exitcode):
    """'SIGKILL' for a process killed by that signal, 'exit code 3' for one that exited so."""
    if exitcode is not None and exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


def _start_worker(initializer, *initargs):
    die_with_parent()
    if initializer is not None:
        initializer(*initargs)


class WatchedPool:
    """A ProcessPoolExecutor of `workers` processes started by `context` ("fork" or "spawn"), each
    running `initializer(*initargs)` first and killed with the process that started it; started again
    whenever one of its workers dies. `name` names the workers in what is printed ("loader worker"),
    `flag` the setting of their number."""

    def __init__(self, workers, context, name, flag, initializer=None, initargs=()):
        self.start_pool = partial(ProcessPoolExecutor, workers, mp_context=multiprocessing.get_context(context),
                                  initializer=_start_worker, initargs=(initializer, *initargs))
        self.name, self.flag = name, flag
        self.pool = self.start_pool()

    def results(self, function, tasks, ahead):
        """function(*task) of each of `tasks`, in order, with at most `ahead` tasks in flight. A worker
        that dies is reported in one line and the tasks lost with it run again in a new pool; the
        MAX_DEATHS-th death in one call raises WorkersDied."""
        tasks, pending, deaths = iter(tasks), deque(), 0
        while True:
            pending.extend([task, None] for task in islice(tasks, ahead - len(pending)))
            if not pending:
                return
            try:  # a pool whose worker died while it was idle refuses the next task at once
                for entry in pending:
                    entry[1] = entry[1] or self.pool.submit(function, *entry[0])
                result = pending[0][1].result()
            except BrokenProcessPool:
                deaths += 1
                self._replace_dead_pool(deaths)
                for entry in pending:
                    entry[1] = None
                continue
            pending.popleft()
            yield result

    def _replace_dead_pool(self, deaths):
        # ProcessPoolExecutor keeps its processes in _processes (no public way to ask how they ended);
        # its shutdown waits for its own clean-up, which collects their exit codes.
        processes = list((getattr(self.pool, "_processes", None) or {}).values())
        self.close()
        worker = self._dead_worker(processes)
        if deaths >= MAX_DEATHS:
            raise WorkersDied(f"{self.name}s died {deaths} times ({worker} the last; out of memory?): "
                              f"try a smaller {self.flag}")
        tqdm.write(f"warning: {worker} died; a new {self.name} makes its work again", file=sys.stderr)  # below a bar
        self.pool = self.start_pool()

    def _dead_worker(self, processes):
        """'loader worker 1234 (SIGKILL)': the one of `processes` that died. The pool ends its other
        workers with SIGTERM once it finds one dead, so the dead one is the one that did not end so."""
        ended = [p for p in processes if p.exitcode not in (None, -signal.SIGTERM)] or processes
        if not ended:
            return f"a {self.name}"
        return f"{self.name} {ended[0].pid} ({how_it_ended(ended[0].exitcode)})"

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)
