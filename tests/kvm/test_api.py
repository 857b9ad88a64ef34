"""The management API on real VMs: every endpoint, pause that really stops the vCPUs and the
guest's clock, answers while the guest does I/O, two VMs at once through `pyvmm ls` and the verbs,
malformed requests to a running VM under the default seccomp filter.

In-process tests wire an ApiServer to a Machine as `pyvmm run` does (vmm/cli.py: start_api) and
talk to it over its socket; the others run `pyvmm run` itself, with XDG_RUNTIME_DIR in tmp_path so
`pyvmm ls` sees only their VMs."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.kvm.test_pause import MSR_KVM_SYSTEM_TIME_NEW, PVCLOCK, guest_values
from tests.support.driver import blk_bench, blk_init, build_driver, have_gcc, run_driver
from vmm.api import client
from vmm.api.routes import Routes
from vmm.api.server import ApiServer
from vmm.config import VmConfig, parse_disk_spec
from vmm.machine import Machine

pytestmark = pytest.mark.kvm
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def api(path, method, target, body=None):
    return client.call(path, method, target, body, timeout=5)


def api_status(path, method, target, body=None):
    try:
        api(path, method, target, body)
    except client.ApiError as e:
        return e.status
    return 200


@pytest.fixture
def served_clock_vm(tiny, tmp_path):
    """The clock guest (tests/kvm/test_pause.py) with kvm-clock on, its API at tmp_path/vm.sock."""
    m = Machine(VmConfig(program=tiny("clock"), console="none", cpus=2, name="clock"))
    m.vcpus[0].set_msrs({MSR_KVM_SYSTEM_TIME_NEW: PVCLOCK | 1})
    path = str(tmp_path / "vm.sock")
    server = ApiServer(path, Routes(lambda: m, name="clock", api_socket=path))
    server.start()
    m.start()
    deadline = time.monotonic() + 10
    while guest_values(m)[1] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    yield m, path
    m.lifecycle.stop(0)
    for t in m.threads:
        t.join(timeout=5)
    server.close()
    m.close()


def test_pause_through_the_api_stops_the_guest_and_its_clock(served_clock_vm):
    m, path = served_clock_vm
    assert api(path, "PUT", "/vm/pause") == {"state": "paused"}
    count, clock = guest_values(m)
    exits = api(path, "GET", "/vm/counters")["vcpus"]
    time.sleep(0.5)
    assert guest_values(m) == (count, clock)  # the guest's loop did not run once more, its clock stood
    assert api(path, "GET", "/vm/counters")["vcpus"] == exits
    info = api(path, "GET", "/vm")
    assert info["state"] == "paused" and info["paused_s"] >= 0.5
    assert api(path, "PUT", "/vm/resume") == {"state": "running"}
    time.sleep(0.3)
    count2, clock2 = guest_values(m)
    assert count2 > count and clock < clock2 < clock + 450_000_000  # on from where it stood


def test_every_endpoint_answers(served_clock_vm):
    m, path = served_clock_vm
    info = api(path, "GET", "/vm")
    assert (info["name"], info["state"], info["cpus"], info["pid"]) == ("clock", "running", 2, os.getpid())
    assert info["config"]["program"].endswith("clock.elf") and len(info["vcpus"]) == 2
    counters = api(path, "GET", "/vm/counters")
    assert set(counters["vcpus"]) == {"0", "1"} and counters["devices"] == {}
    assert api_status(path, "GET", "/vm/balloon") == 404  # no --balloon
    assert api_status(path, "PUT", "/vm/balloon", {"target": 0}) == 404
    assert api_status(path, "PUT", "/vm/resume") == 409
    assert api_status(path, "PUT", "/vm/shutdown") == 409  # a --program guest has no ACPI power button
    assert api(path, "PUT", "/vm/reboot")["requested"] == "reboot"
    assert m.lifecycle.reset_requested and m.lifecycle.restart  # the CLI boots it again
    for t in m.threads:
        t.join(timeout=5)
    assert api(path, "PUT", "/vm/kill") == {"state": "stopping"}


REQUESTS = 20000


def test_the_api_answers_while_the_guest_does_io(tmp_path):
    """The driver guest keeps a virtio-blk queue busy; the API thread answers meanwhile and the
    device's counters move."""
    if not have_gcc():
        pytest.skip("gcc is needed to build the driver guest")
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (64 << 20))
    m = Machine(VmConfig(program=str(build_driver(tmp_path)), console=f"file:{tmp_path / 'console.log'}",
                         disks=(parse_disk_spec(str(image)),)))
    path = str(tmp_path / "vm.sock")
    server = ApiServer(path, Routes(lambda: m, name="io", api_socket=path))
    server.start()
    latencies, seen, stop = [], [], threading.Event()

    def poll():
        while not stop.is_set():
            started = time.monotonic()
            counters = api(path, "GET", "/vm/counters")
            latencies.append(time.monotonic() - started)
            seen.append(counters["devices"]["blk0"]["requests"])
            time.sleep(0.01)  # a client asking 100 times a second, not a flood holding the GIL

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        try:
            run = run_driver(m, [blk_init(queues=1), blk_bench(REQUESTS, 4096, 0x4000000, random=True)], timeout=120)
        finally:
            stop.set()
            poller.join()
            server.close()
        run.check()
        during = [n for n in seen if 0 < n < REQUESTS]
        assert len(during) >= 5, f"only {len(during)} answers while the guest did I/O ({len(seen)} in all)"
        assert during == sorted(during)  # the count only grows
        blk = m.disks[0].counter_totals()
        assert (blk["requests"], blk["bytes"], blk["errors"]) == (REQUESTS, REQUESTS * 4096, 0)
        # one request in flight at a time: at most a kick and an interrupt each (20000 of each seen)
        assert 0 < blk["notifications"] <= REQUESTS and 0 < blk["interrupts"] <= REQUESTS, blk
        print(f"API answers during I/O: {len(latencies)}, median {sorted(latencies)[len(latencies) // 2] * 1e3:.1f} ms, "
              f"max {max(latencies) * 1e3:.1f} ms")
    finally:
        m.close()  # (its disk's I/O thread with it: a later test counts the virtio-blk threads)


# -- pyvmm run itself ------------------------------------------------------------------------------
def pyvmm(env, *args, timeout=30):
    return subprocess.run([sys.executable, "-m", "vmm.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path), PYTHONPATH=ROOT)
    return e


def start_vm(env, guest, name, *extra):
    proc = subprocess.Popen([sys.executable, "-m", "vmm.cli", "run", "--program", guest, "--console", "none",
                             "--name", name, *extra], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sock = os.path.join(env["XDG_RUNTIME_DIR"], "pyvmm", f"{name}.sock")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if os.path.exists(sock):
            try:
                if api(sock, "GET", "/vm")["state"] == "running":
                    return proc, sock
            except (client.VmNotRunning, client.VmNotAnswering, client.ApiError):
                pass  # not listening yet, or 503: the VM is being made
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"{name}: no API at {sock}")


def exits_of(sock) -> int:
    return sum(v["exits"] for v in api(sock, "GET", "/vm/counters")["vcpus"].values())


def test_two_vms_listed_paused_and_stopped_independently(tiny, env):
    guest = tiny("busy")
    a, a_sock = start_vm(env, guest, "vm-a")
    b, b_sock = start_vm(env, guest, "vm-b", "--cpus", "2")
    try:
        ls = pyvmm(env, "ls")
        assert ls.returncode == 0, ls.stderr
        rows = [line.split() for line in ls.stdout.splitlines()]
        assert rows[0] == ["NAME", "PID", "STATE", "CPUS", "MEMORY", "UPTIME"]
        assert [r[:5] for r in rows[1:]] == [["vm-a", str(a.pid), "running", "1", "512M"],
                                             ["vm-b", str(b.pid), "running", "2", "512M"]]
        assert pyvmm(env, "pause", "vm-a").stdout == "vm-a: paused\n"
        frozen, moving = exits_of(a_sock), exits_of(b_sock)
        time.sleep(0.5)
        assert exits_of(a_sock) == frozen  # vm-a's vCPU exits no more: it does not run
        assert exits_of(b_sock) > moving   # vm-b goes on
        listed = json.loads(pyvmm(env, "ls", "--json").stdout)
        assert [(v["name"], v["state"]) for v in listed] == [("vm-a", "paused"), ("vm-b", "running")]
        info = pyvmm(env, "info", "vm-b")
        assert "state       running" in info.stdout and "vcpu1" in info.stdout
        counters = pyvmm(env, "counters", "vm-b", "--json")
        assert json.loads(counters.stdout)["vcpus"]["0"]["by_kind"]["io-out"] > 0
        assert pyvmm(env, "resume", "vm-a").stdout == "vm-a: running\n"
        time.sleep(0.2)
        assert exits_of(a_sock) > frozen
        assert pyvmm(env, "kill", "vm-a").stdout == "vm-a: stopped\n"
        assert a.wait(timeout=10) == 0
        assert not os.path.exists(a_sock)  # removed at exit
        assert api(b_sock, "GET", "/vm")["state"] == "running"  # vm-b untouched
        ls = pyvmm(env, "ls").stdout.splitlines()
        assert len(ls) == 2 and ls[1].split()[0] == "vm-b"
        stop = pyvmm(env, "stop", "vm-b")  # the graceful request: a --program guest cannot hear the button
        assert stop.returncode == 2 and "power button" in stop.stderr  # (a 4xx: the request cannot be done)
        pyvmm(env, "kill", "vm-b")
        assert b.wait(timeout=10) == 0
        assert pyvmm(env, "ls").stdout == "no VMs running\n"
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_vm_that_died_leaves_a_socket_ls_removes(tiny, env):
    proc, sock = start_vm(env, tiny("busy"), "doomed")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.exists(sock)
    ls = pyvmm(env, "ls")
    assert ls.returncode == 0 and ls.stdout == "no VMs running\n"
    assert not os.path.exists(sock)
    info = pyvmm(env, "info", "doomed")
    assert info.returncode == 2 and info.stderr.count("\n") == 1


def test_a_name_in_use_is_refused(tiny, env):
    proc, sock = start_vm(env, tiny("busy"), "twin")
    try:
        second = pyvmm(env, "run", "--program", tiny("busy"), "--console", "none", "--name", "twin")
        assert second.returncode == 2 and "already listens" in second.stderr and second.stderr.count("\n") == 1
    finally:
        proc.kill()
        proc.wait()


def test_malformed_requests_get_4xx_and_the_vm_goes_on(tiny, env):
    """Against pyvmm run under its default seccomp filter (kill): the server's system calls pass."""
    proc, sock = start_vm(env, tiny("busy"), "target")
    try:
        cases = [(b"GARBAGE\r\n\r\n", 400), (b"GET /" + b"x" * 10000 + b" HTTP/1.1\r\n\r\n", 414),
                 (b"PUT /vm/balloon HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", 413),
                 (b"GET /vm HTTP/1.1\r\n" + b"H: v\r\n" * 200 + b"\r\n", 431),
                 (b"PUT /vm/pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
                 (b"DELETE /vm HTTP/1.1\r\n\r\n", 405), (b"GET /vm/nothing HTTP/1.1\r\n\r\n", 404),
                 (b"PUT /vm/balloon HTTP/1.1\r\nContent-Length: 5\r\n\r\n{bad}", 400)]
        for data, status in cases:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(sock)
            try:
                s.sendall(data)
            except BrokenPipeError:  # it answered and closed before reading all of it
                pass
            answer = s.recv(65536)
            s.close()
            assert answer.startswith(b"HTTP/1.1 %d " % status), (data[:30], answer[:80])
        before = exits_of(sock)
        time.sleep(0.2)
        assert exits_of(sock) > before and proc.poll() is None  # the guest runs on
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, proc.stderr.read()
    assert not os.path.exists(sock)


def test_reboot_through_the_api_boots_the_vm_again(tiny, env):
    proc, sock = start_vm(env, tiny("busy"), "again")
    try:
        time.sleep(1.0)
        first = api(sock, "GET", "/vm")
        assert first["uptime_s"] >= 1.0
        assert api(sock, "PUT", "/vm/reboot")["requested"] == "reboot"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                info = api(sock, "GET", "/vm")
            except client.ApiError:  # 503 between the two boots
                continue
            if info["state"] == "running" and info["uptime_s"] < first["uptime_s"]:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the VM was not booted again")
        assert info["pid"] == proc.pid and proc.poll() is None  # the same pyvmm, a new boot
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    assert "booting it again (a reboot asked through the API)" in proc.stderr.read()


def test_an_unusable_runtime_directory_leaves_the_vm_without_its_api(tiny, tmp_path):
    base = tmp_path / "run"
    (base / "pyvmm").mkdir(parents=True)
    os.chmod(base / "pyvmm", 0o755)  # others may enter: not used
    e = dict(os.environ, XDG_RUNTIME_DIR=str(base), PYTHONPATH=ROOT)
    r = pyvmm(e, "run", "--program", tiny("hello"), "--console", "none")
    assert r.returncode == 0, r.stderr
    assert "running without the management API" in r.stderr and r.stderr.count("\n") == 1
    r = pyvmm(e, "run", "--program", tiny("hello"), "--console", "none", "--api-socket", str(tmp_path / "no" / "s"))
    assert r.returncode == 2 and "--api-socket" in r.stderr and r.stderr.count("\n") == 1
