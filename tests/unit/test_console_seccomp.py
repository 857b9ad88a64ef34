"""virtio-console's socket port under the default syscall filter (vmm/seccomp, kill mode): in a
child Python that installs it, the device's I/O thread accepts a client, moves bytes both ways,
lets it go and takes the next, with no call the filter kills."""

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HAVE_SECCOMP = "Seccomp:" in open("/proc/self/status").read()

CHILD = textwrap.dedent("""
    import os, socket, sys, time
    from tests.support.consoledriver import ConsoleDriver
    from virtio.backends.port import SocketPort
    from virtio.console import VirtioConsole, receiveq
    from virtio.console_control import VIRTIO_CONSOLE_DEVICE_READY, VIRTIO_CONSOLE_PORT_OPEN, VIRTIO_CONSOLE_PORT_READY
    from vmm import seccomp
    from vmm.memory import MiB, GuestMemory

    def wait_for(predicate):
        deadline = time.monotonic() + 10
        while not predicate():
            assert time.monotonic() < deadline
            time.sleep(0.005)

    path = sys.argv[1]
    mem = GuestMemory(32 * MiB)
    dev = VirtioConsole(mem, named=[("data", SocketPort.listen(path))], queue_size=64)
    drv = ConsoleDriver(mem, dev).start()          # the I/O thread runs before the filter, as in pyvmm
    print("note", seccomp.install("kill"), flush=True)
    drv.control_buffers(16)
    drv.send(0xFFFFFFFF, VIRTIO_CONSOLE_DEVICE_READY, 1)
    drv.send(1, VIRTIO_CONSOLE_PORT_READY, 1)
    drv.send(1, VIRTIO_CONSOLE_PORT_OPEN, 1)
    for round in range(2):                         # a client, then a reconnect
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        client.sendall(b"in%d" % round)
        drv.rx_buffers(1, 1)
        drv.kick(receiveq(1))
        wait_for(lambda: drv.mq[receiveq(1)].used_idx != drv.mq[receiveq(1)].last_used)
        assert drv.rx_data(1) == b"in%d" % round
        drv.write(1, b"out%d" % round)
        drv.kick(receiveq(1) + 1)
        assert client.recv(10) == b"out%d" % round
        client.close()
        wait_for(lambda: not dev.ports[1].backend.connected)
    dev.close()
    print("done", flush=True)
""")


@pytest.mark.skipif(not HAVE_SECCOMP, reason="this kernel has no seccomp")
def test_socket_port_runs_under_the_kill_filter(tmp_path):
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "p.sock")], cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr[-3000:])
    assert "note None" in r.stdout and "done" in r.stdout, r.stdout
