"""The syscall filter (--seccomp, vmm/seccomp) on a running VMM: `pyvmm run` gives it to every
thread once the VM is set up (or none with --seccomp off), and a device's I/O thread that makes a
denied call is stopped as configured: the process killed by SIGSYS, or the call failed with EPERM
and the device going on."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.kvm.test_net_driver import netns, run_in_netns  # noqa: F401 (netns: a fixture)
from tests.support import driver as D

# debian12 (most tests): what a filter may do (actions, clone3 and glibc's fallback) is the host kernel's
pytestmark = [pytest.mark.kvm,
              pytest.mark.skipif("Seccomp:" not in Path("/proc/self/status").read_text(),
                                 reason="this kernel has no seccomp")]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def threads_of(pid: int) -> dict[str, str]:
    """{thread name: its Seccomp mode} for each thread of `pid` (0 none, 2 a filter)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        out[fields["Name"].strip()] = fields["Seccomp"].strip()
    return out


@pytest.mark.debian12
@pytest.mark.parametrize("args, mode", [([], "2"), (["--seccomp", "errno"], "2"), (["--seccomp", "off"], "0")])
def test_pyvmm_run_filters_every_thread_unless_off(tiny, args, mode):
    p = subprocess.Popen([sys.executable, "-m", "vmm.cli", "run", "--program", tiny("spin"), "--cpus", "2",
                          "--console", "none", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        deadline = time.monotonic() + 120  # (in the nested KVM, QEMU's emulation: Python starts slowly)
        while time.monotonic() < deadline and not {"vcpu0", "vcpu1"} <= set(threads_of(p.pid)):
            assert p.poll() is None, p.communicate()
            time.sleep(0.05)
        threads = threads_of(p.pid)
    finally:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    assert {"vcpu0", "vcpu1"} <= set(threads), threads
    assert set(threads.values()) == {mode}, threads  # the main thread and both vCPUs alike
    assert p.returncode == 0 and err == "", err  # the way out (SIGTERM, teardown) passes the filter


def test_a_restarted_vm_is_made_under_the_filter(tiny, tmp_path):
    """--on-reboot restart builds each new VM (KVM, guest memory, the disk's image and lock, threads)
    after the filter is in place: none of that is denied.  (Not debian12: on Linux 6.1 a SIGTERM
    that lands in a restart's KVM_CREATE_VM fails it with EINTR, a traceback, filter or not.)"""
    log, image = tmp_path / "console.log", tmp_path / "d.img"
    image.write_bytes(bytes(1 << 20))
    p = subprocess.Popen([sys.executable, "-m", "vmm.cli", "run", "--program", tiny("reboot"), "--on-reboot",
                          "restart", "--console", f"file:{log}", "--disk", str(image), "--seccomp", "kill"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60  # (each VM's teardown waits on the host kernel: slow when it is busy)
        while time.monotonic() < deadline and (not log.exists() or log.read_text().count("boot") < 3):
            assert p.poll() is None, p.communicate()
            time.sleep(0.1)
        assert log.read_text().count("boot") >= 3, log.read_text()
        assert set(threads_of(p.pid).values()) == {"2"}
    finally:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err


# A VMM as `pyvmm run` makes it (set-up, the filter, the vCPUs) in a child, whose disk's flush - run
# on the device's I/O thread when the guest's driver sends a FLUSH - first tries denied calls.
CHILD = textwrap.dedent("""
    import resource, sys, threading
    from tests.support import driver as D
    from tests.support.denied import attempt
    from virtio.backends.raw import RawImage
    from vmm import cli
    from vmm.config import DiskSpec, VmConfig
    from vmm.machine import Machine

    driver, image, mode = sys.argv[1:4]
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a SIGSYS dumps no core
    real_flush = RawImage.flush

    def flush(self):
        print("flush on", threading.current_thread().name, flush=True)
        for name in ("execve", "inet", "fork"):
            attempt(name)
        real_flush(self)

    RawImage.flush = flush
    cfg = VmConfig(program=driver, console="none", mem_size=128 << 20, disks=[DiskSpec(image)], seccomp=mode)
    m = Machine(cfg)
    cli.lock_down(cfg.seccomp)
    job = D.run_driver(m, [D.blk_init(), D.blk_flush(), D.report(0)])
    m.close()
    job.check()
    print("job ok", flush=True)
""")


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    if not D.have_gcc():
        pytest.skip("gcc is needed to build the driver guest")
    return str(D.build_driver(tmp_path_factory.mktemp("driver")))


def run_child(driver, tmp_path, mode):
    image = tmp_path / "d.img"
    image.write_bytes(bytes(1 << 20))
    return subprocess.run([sys.executable, "-c", CHILD, driver, str(image), mode], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT), stdin=subprocess.DEVNULL)


@pytest.mark.debian12
def test_a_denied_call_on_an_io_thread_kills_pyvmm(driver, tmp_path):
    r = run_child(driver, tmp_path, "kill")
    assert r.returncode == -signal.SIGSYS, (r.returncode, r.stdout, r.stderr)
    out = r.stdout.splitlines()
    assert out[0].startswith("flush on virtio-blk"), out  # the device's I/O thread
    assert out[-1] == "trying execve", out  # nothing ran after it, on any thread


@pytest.mark.debian12
def test_a_denied_call_on_an_io_thread_fails_with_eperm(driver, tmp_path):
    r = run_child(driver, tmp_path, "errno")
    assert r.returncode == 0, (r.stdout, r.stderr)
    out = [line for line in r.stdout.splitlines() if not line.startswith("trying")]
    assert out[0].startswith("flush on virtio-blk"), out
    assert out[1:] == ["execve EPERM", "inet EPERM", "fork EPERM", "job ok"], out  # and the flush completed


@pytest.mark.debian12
@pytest.mark.parametrize("answer, note", [
    ("get_seccomp", "this kernel was built without seccomp (CONFIG_SECCOMP)"),
    ("set_filter", "this kernel refused the filter (EINVAL): it was built without CONFIG_SECCOMP_FILTER"),
])
def test_a_kernel_without_seccomp_is_one_note_and_the_vm_runs(tiny, answer, note):
    """`pyvmm run` where the kernel has no seccomp (faked: its answers to prctl and seccomp(2) are
    replaced in the child): one line says so, and the guest runs to its power-off."""
    script = textwrap.dedent(f"""
        import errno, sys
        from vmm import cli
        from vmm.seccomp import abi, installer
        real_prctl, real_seccomp = installer._prctl, installer._seccomp
        if {answer!r} == "get_seccomp":
            installer._prctl = lambda op, arg: (-1, errno.EINVAL) if op == abi.PR_GET_SECCOMP else real_prctl(op, arg)
        else:
            installer._seccomp = lambda op, flags, arg: ((-1, errno.EINVAL) if op == abi.SECCOMP_SET_MODE_FILTER
                                                         else real_seccomp(op, flags, arg))
        sys.exit(cli.main(["run", "--program", {tiny("hello")!r}]))
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=ROOT), stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hello from a guest in user mode\n"
    assert r.stderr.splitlines() == [f"pyvmm: note: running without a syscall filter: {note}"], r.stderr


@pytest.mark.debian12
@pytest.mark.parametrize("scenario, args", [("tx", dict(length=1514, count=200, depth=32)),
                                            ("rx", dict(sizes=[1514] * 200, init=dict(mrg_rxbuf=True)))])
def test_a_nic_moves_frames_under_the_filter(netns, driver, tmp_path, scenario, args):
    """virtio-net under the kill filter: its queues, io_uring (set up when the guest's driver starts
    the device, after the filter) and the tap, frames byte for byte (test_net_driver's scenarios)."""
    run_in_netns(netns, driver, tmp_path, scenario, seccomp="kill", **args)
