"""--rng and --balloon on the command line: a VM with both runs to its end; bad specs are one line
on stderr and exit status 2."""

from __future__ import annotations

import pytest

from tests.kvm.test_cli import one_line_error, pyvmm


@pytest.mark.parametrize("args, words", [
    (["--rng", "rate=0"], ["--rng", "rate"]),
    (["--rng", "speed=1"], ["--rng", "speed"]),
    (["--balloon", "size=1000"], ["--balloon", "4 KiB"]),
    (["--balloon", "size=1G"], ["--balloon", "more than the guest's RAM"]),
    (["--balloon", "stats=0"], ["--balloon", "stats"]),
    (["--balloon", "free-page-reporting=perhaps"], ["--balloon", "free-page-reporting"]),
])
def test_bad_rng_and_balloon_specs_exit_2(args, words):
    one_line_error(pyvmm("run", "--program", "/bin/true", "--mem", "256M", *args), *words)


def test_a_vm_with_rng_and_balloon_runs_to_its_end(tiny):
    r = pyvmm("run", "--program", tiny("hello"), "--console", "none", "--rng", "rate=1M",
              "--balloon", "size=16M,stats=1,free-page-reporting=on,deflate-on-oom=on")
    assert r.returncode == 0, r.stderr
