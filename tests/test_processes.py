"""A pool of worker processes that outlives a worker killed as the out-of-memory killer kills one."""
import os
import signal

import pytest

from biounet.core.processes import WatchedPool, WorkersDied, how_it_ended


def square_dying_once(number, marker):
    """number squared; the first call for 3 kills its own process instead (marker: a file that says it did)."""
    if number == 3 and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return number * number


def square_dying_always(number):
    if number == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return number * number


def watched_pool(workers=2):
    return WatchedPool(workers, "fork", name="test worker", flag="--workers")


def test_a_worker_killed_midway_is_replaced_and_its_task_runs_again_so_the_results_are_whole(tmp_path, capsys):
    pool = watched_pool()
    try:
        results = list(pool.results(square_dying_once, [(n, str(tmp_path / "died")) for n in range(8)], ahead=4))
    finally:
        pool.close()
    assert results == [n * n for n in range(8)]
    warning = capsys.readouterr().err.strip()
    assert warning.startswith("warning: test worker ") and "(SIGKILL) died" in warning
    assert len(warning.splitlines()) == 1


def test_a_worker_that_dies_of_its_task_every_time_stops_the_work_with_one_line_after_three_deaths(capsys):
    pool = watched_pool()
    try:
        with pytest.raises(WorkersDied, match=r"test workers died 3 times \(test worker \d+ \(SIGKILL\) the last; "
                                              r"out of memory\?\): try a smaller --workers"):
            list(pool.results(square_dying_always, [(n,) for n in range(8)], ahead=4))
    finally:
        pool.close()
    assert capsys.readouterr().err.count("warning: test worker") == 2


def test_a_worker_killed_while_the_pool_is_idle_is_replaced_at_the_next_task(capsys):
    pool = watched_pool(workers=1)
    try:
        assert list(pool.results(pow, [(2, 3)], ahead=1)) == [8]
        for process in pool.pool._processes.values():
            os.kill(process.pid, signal.SIGKILL)
            process.join()
        assert list(pool.results(pow, [(2, 4), (3, 2)], ahead=2)) == [16, 9]
    finally:
        pool.close()
    assert "(SIGKILL) died" in capsys.readouterr().err


def test_a_task_that_raises_is_an_error_of_the_task_not_a_death():
    pool = watched_pool()
    try:
        with pytest.raises(ZeroDivisionError):
            list(pool.results(divmod, [(1, 0)], ahead=1))
    finally:
        pool.close()


def test_how_a_process_ended_is_said_by_its_signal_or_exit_code():
    assert how_it_ended(-signal.SIGKILL) == "SIGKILL"
    assert how_it_ended(-signal.SIGSEGV) == "SIGSEGV"
    assert how_it_ended(3) == "exit code 3"
