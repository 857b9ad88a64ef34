"""kernel/loads.py: loads into guest RAM in threads, waited for before the guest runs."""

import threading
import time

import pytest

from kernel.loads import BackgroundLoads


def test_loads_run_side_by_side_and_wait_joins_them(tmp_path):
    started, release = threading.Barrier(3), threading.Event()
    done = []

    def load(n):
        started.wait(timeout=5)  # both loads running at once, beside this thread
        release.wait(timeout=5)
        done.append(n)

    loads = BackgroundLoads()
    loads.run(lambda: load(1))
    loads.run(lambda: load(2))
    started.wait(timeout=5)
    assert done == []
    release.set()
    loads.wait()
    assert sorted(done) == [1, 2]


def test_wait_closes_the_files_the_loads_read(tmp_path):
    f = open(tmp_path / "initrd", "wb")
    loads = BackgroundLoads()
    loads.close_when_done(f)
    loads.run(lambda: time.sleep(0.01))
    assert not f.closed
    loads.wait()
    assert f.closed


def test_the_first_failure_is_raised_after_every_load_ended():
    ended = []

    def slow():
        time.sleep(0.1)
        ended.append("slow")

    def failing():
        raise OSError(5, "Input/output error")

    loads = BackgroundLoads()
    loads.run(failing)
    loads.run(slow)
    with pytest.raises(OSError, match="Input/output"):
        loads.wait()
    assert ended == ["slow"]
    loads.wait()  # raised once


def test_on_the_way_out_of_another_error_wait_only_joins():
    loads = BackgroundLoads()
    loads.run(lambda: 1 / 0)
    loads.wait(raise_errors=False)
    assert not [t for t in threading.enumerate() if t.name == "pyvmm-load"]
