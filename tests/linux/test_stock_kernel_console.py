"""virtio-console with the stock kernel's own driver (virtio_console), in ONE boot: a shell on hvc0
through the pty path (--console-device virtio, --console stdio on a pseudo-terminal), and a named
port on a Unix socket carrying 16 MiB each way, guest to host then host to guest on a second
connection, sha256 equal on both sides; a second port's output appended to a file; under the
default seccomp filter.

The guest runs the kit's kernel and modules with this checkout's /init (scripts/guestkit.py's
INIT_SCRIPT, which links /dev/virtio-ports/NAME) appended to the kit's initramfs, so the test
holds whether or not the kit was rebuilt since /init changed."""

import hashlib
import os
import re
import socket
import threading
import time

import pytest

from tests.support import scriptload
from tests.support.ptyguest import PtyGuest
from tests.support.stock import BOOT_TIMEOUT
from vmm import kit

pytestmark = [pytest.mark.linux, pytest.mark.slow, pytest.mark.native]
SIZE = 16 << 20
TRANSFER_TIMEOUT = 300  # 16 MiB through the nested KVM


def initrd_with_this_init(tmp_path):
    guestkit = scriptload.load("guestkit")
    overlay, _ = guestkit.newc_gz([guestkit.regular_file("init", guestkit.INIT_SCRIPT.encode(), 0o755)])
    path = tmp_path / "initramfs.cpio.gz"
    path.write_bytes(kit.kit_initrd().read_bytes() + overlay)
    return str(path)


def recv_exactly(sock, size, timeout):
    sock.settimeout(timeout)
    chunks, got = [], 0
    while got < size:
        chunk = sock.recv(min(1 << 20, size - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def test_shell_on_hvc0_and_16_mib_each_way_through_a_named_port(tmp_path):
    path, log = str(tmp_path / "data.sock"), tmp_path / "log.txt"
    guest = PtyGuest.start(["--console-device", "virtio", "--port", f"name=data,socket={path}",
                            "--port", f"name=log,file={log}",
                            "--initrd", initrd_with_this_init(tmp_path), "--append", "quiet"])
    try:
        guest.expect(b"PYVMM-READY", BOOT_TIMEOUT)
        guest.expect(b"interactive shell", 60)
        time.sleep(1)
        guest.type("echo T''TY=$(tty) N''AME=$(cat /sys/class/virtio-ports/vport*p1/name) "
                   "L''INK=$(readlink /dev/virtio-ports/data)")
        m = guest.expect_re(rb"TTY=(\S+) NAME=(\S*) LINK=(\S*)", 60)
        assert m.group(1) == b"/dev/hvc0", guest.output[-3000:]
        assert m.group(2) == b"data"
        assert re.fullmatch(rb"\.\./vport\d+p1", m.group(3)), m.group(3)
        guest.type("echo to-the-file > /dev/virtio-ports/log; echo L''OGGED=$?")
        guest.expect(b"LOGGED=0", 60)
        deadline = time.monotonic() + 30  # (the write returned once the line was in the ring)
        while log.read_bytes() != b"to-the-file\n" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert log.read_bytes() == b"to-the-file\n"

        # guest to host
        guest.type("dd if=/dev/urandom of=/tmp/g bs=1M count=16 2>/dev/null; echo G''SUM=$(sha256sum < /tmp/g)")
        guest_sum = guest.expect_re(rb"GSUM=([0-9a-f]{64})", 120).group(1).decode()
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)
        guest.type("cat /tmp/g > /dev/virtio-ports/data; echo G''SENT=$?")
        start = time.monotonic()
        received = recv_exactly(client, SIZE, TRANSFER_TIMEOUT)
        print(f"guest to host: 16 MiB in {time.monotonic() - start:.1f} s")
        assert len(received) == SIZE
        assert hashlib.sha256(received).hexdigest() == guest_sum
        guest.expect(b"GSENT=0", 60)
        client.close()

        # host to guest, on a second connection (a reconnect); the guest reads to the EOF that
        # closing it gives (PORT_OPEN 0)
        data = os.urandom(SIZE)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)
        sender = threading.Thread(target=lambda: (client.sendall(data), client.close()), daemon=True)
        sender.start()
        time.sleep(2)  # the driver hears of the connection before the reader opens the port
        guest.type("cat /dev/virtio-ports/data > /tmp/h; echo H''SUM=$(sha256sum < /tmp/h) H''SIZE=$(wc -c < /tmp/h)")
        start = time.monotonic()
        m = guest.expect_re(rb"HSUM=([0-9a-f]{64})\s+-?\s*HSIZE=\s*(\d+)", TRANSFER_TIMEOUT)
        print(f"host to guest: 16 MiB and its sha256 in the guest in {time.monotonic() - start:.1f} s")
        assert int(m.group(2)) == SIZE
        assert m.group(1).decode() == hashlib.sha256(data).hexdigest()
        sender.join(10)

        guest.type("poweroff -f")
        assert guest.wait(60) == 0
        assert b"without a syscall filter" not in guest.output  # the default filter (kill) was on
        complaints = re.findall(rb"pyvmm: virtio-console.*", guest.output)
        assert not complaints, complaints  # the driver sent nothing the device had to refuse
    finally:
        guest.kill()
