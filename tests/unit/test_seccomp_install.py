"""Installing the filter (vmm/seccomp/installer.py) on this host's kernel, each time in a child
Python (a filter is for the life of a process): what denied and allowed calls get in each mode, on
a thread that was already running; and a kernel without seccomp, faked, in this process."""

import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from vmm import seccomp
from vmm.seccomp import abi
from vmm.seccomp import installer as inst

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HAVE_SECCOMP = "Seccomp:" in open("/proc/self/status").read()


def needs_seccomp(test):
    """A test on this host's own seccomp (debian12: what a filter may do is the kernel's)."""
    return pytest.mark.debian12(pytest.mark.skipif(not HAVE_SECCOMP, reason="this kernel has no seccomp")(test))

# The child: a thread started before the filter waits for it, then tries each call and prints what it got.
CHILD = textwrap.dedent("""
    import resource, sys, threading
    from tests.support.denied import attempt, raw
    from vmm import seccomp
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a SIGSYS dumps no core

    def calls():
        print("seccomp", open(f"/proc/self/task/{threading.get_native_id()}/status").read()
              .split("Seccomp:")[1].split()[0], flush=True)
        attempt("unix")
        t = threading.Thread(target=lambda: None); t.start(); t.join(); print("thread ok", flush=True)
        print("clone3", raw(435, 0, 0), flush=True)
        for name in sys.argv[2:]:
            attempt(name)

    go = threading.Event()
    worker = threading.Thread(target=lambda: (go.wait(), calls()), name="worker")
    worker.start()                     # running before the filter: TSYNC must give it the filter too
    print("note", seccomp.install(sys.argv[1]), flush=True)
    print("again", seccomp.install(sys.argv[1]), flush=True)   # a second install does nothing
    print("filters", open("/proc/self/status").read().split("Seccomp_filters:")[1].split()[0], flush=True)
    go.set()
    worker.join()
""")



def child(mode, *calls):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", CHILD, mode, *calls], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def lines(r):
    return dict(line.split(" ", 1) for line in r.stdout.splitlines() if not line.startswith("trying"))


@needs_seccomp
def test_errno_mode_fails_denied_calls_with_eperm_on_every_thread():
    r = child("errno", "execve", "fork", "inet", "netlink", "ptrace", "unshare")
    assert r.returncode == 0, r.stderr
    out = lines(r)
    assert out["note"] == "None" and out["again"] == "None" and out["filters"] == "1"
    assert out["seccomp"] == str(abi.SECCOMP_MODE_FILTER)  # the thread that was running before has it
    assert out["unix"] == "ok" and out["thread"] == "ok" and out["clone3"] == "ENOSYS"
    for name in ("execve", "fork", "inet", "netlink", "ptrace", "unshare"):
        assert out[name] == "EPERM", (name, r.stdout)


@needs_seccomp
@pytest.mark.parametrize("call", ["execve", "inet", "fork"])
def test_kill_mode_kills_the_process_with_sigsys(call):
    r = child("kill", call, "inet")
    assert r.returncode == -signal.SIGSYS, (r.stdout, r.stderr)
    out = r.stdout.splitlines()
    assert out[-1] == f"trying {call}"  # nothing after the denied call: not even another thread
    assert "thread ok" in out and "unix ok" in out


@needs_seccomp
def test_log_mode_allows_and_off_installs_nothing():
    r = child("log", "inet")
    assert r.returncode == 0 and lines(r)["inet"] == "ok" and lines(r)["filters"] == "1", r.stderr
    r = child("off", "inet", "fork", "ptrace")
    out = lines(r)
    assert r.returncode == 0, r.stderr
    assert out["seccomp"] == str(abi.SECCOMP_MODE_DISABLED) and out["filters"] == "0"
    assert out["inet"] == "ok" and out["fork"] == "ok" and out["ptrace"] == "ESRCH" and out["clone3"] != "ENOSYS"


def fake_kernel(monkeypatch, *, get_seccomp=(0, 0), avail=(0, 0), set_filter=(0, 0)):
    """install() against a kernel that answers as told (nothing reaches the real one)."""
    calls = []

    def prctl(option, arg):
        calls.append(("prctl", option))
        return get_seccomp if option == abi.PR_GET_SECCOMP else (0, 0)

    def sc(op, flags, arg):
        calls.append(("seccomp", op))
        return avail if op == abi.SECCOMP_GET_ACTION_AVAIL else set_filter

    monkeypatch.setattr(inst, "_prctl", prctl)
    monkeypatch.setattr(inst, "_seccomp", sc)
    monkeypatch.setattr(inst, "_installed", None)
    return calls


@pytest.mark.parametrize("answers, words", [
    (dict(get_seccomp=(-1, errno.EINVAL)), "built without seccomp (CONFIG_SECCOMP)"),
    (dict(avail=(-1, errno.ENOSYS)), "no seccomp(2) system call"),
    (dict(set_filter=(-1, errno.EINVAL)), "built without CONFIG_SECCOMP_FILTER"),
    (dict(set_filter=(-1, errno.EPERM)), "failed: Operation not permitted"),
    (dict(set_filter=(1234, 0)), "thread 1234"),
])
def test_a_kernel_without_seccomp_says_why(monkeypatch, answers, words):
    fake_kernel(monkeypatch, **answers)
    with pytest.raises(seccomp.SeccompUnavailable, match=words.replace("(", r"\(").replace(")", r"\)")):
        seccomp.install("kill")
    assert seccomp.installed() is None


def test_an_old_kernel_kills_the_thread_and_cannot_log(monkeypatch):
    calls = fake_kernel(monkeypatch, avail=(-1, errno.EINVAL))  # Linux < 4.14: no SECCOMP_GET_ACTION_AVAIL
    assert "ends only the thread" in seccomp.install("kill")
    assert seccomp.installed() == "kill" and ("seccomp", abi.SECCOMP_SET_MODE_FILTER) in calls
    fake_kernel(monkeypatch, avail=(-1, errno.EOPNOTSUPP))
    with pytest.raises(seccomp.SeccompUnavailable, match="SECCOMP_RET_LOG"):
        seccomp.install("log")


def test_off_asks_nothing_of_the_kernel(monkeypatch):
    calls = fake_kernel(monkeypatch)
    assert seccomp.install("off") is None and calls == [] and seccomp.installed() is None
