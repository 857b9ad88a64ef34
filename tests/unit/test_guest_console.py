"""The Python API's console (vmm/guest_console.py): output kept and waited on, input fed at the
pace the device takes it, errors with the console's tail."""

import threading
import time

import pytest

from vmm import guest_console
from vmm.guest_console import GuestConsole, VmError, VmStopped, VmTimeout


def test_output_goes_on_to_the_sink_and_is_kept():
    seen = []
    c = GuestConsole(seen.append)
    c(b"hello ")
    c(b"world\n")
    assert seen == [b"hello ", b"world\n"] and c.offset == 12
    assert c.read() == "hello world\n" and c.read() == ""
    c(b"more")
    assert c.read() == "more" and c.text() == "hello world\nmore" and c.between(6, 11) == "world"


def test_only_the_last_bytes_are_kept(monkeypatch):
    monkeypatch.setattr(guest_console, "KEEP", 10)
    c = GuestConsole(lambda data: None)
    c(b"0123456789abcdef")
    assert c.offset == 16 and c.text() == "6789abcdef" and c.text(start=12) == "cdef"
    assert c.wait_for("ef", timeout=0) == 16


def test_wait_for_a_text_written_later_from_another_thread():
    c = GuestConsole(lambda data: None)
    c(b"PYVMM-READY\n")
    threading.Timer(0.1, lambda: c(b"login: ")).start()
    assert c.wait_for("login:", timeout=5) == 12 + len("login:")
    with pytest.raises(VmTimeout) as e:
        c.wait_for("PYVMM-READY", timeout=0.1, start=1)  # only what came from offset 1 counts
    assert "PYVMM-READY" in e.value.tail


def test_a_stop_ends_the_wait_with_the_exit_status():
    c = GuestConsole(lambda data: None)
    c(b"Kernel panic\n")
    with pytest.raises(VmStopped) as e:
        c.wait_for("login:", timeout=5, stopped=lambda: 1)
    assert e.value.exit_code == 1 and "Kernel panic" in str(e.value)


def test_write_feeds_as_the_device_takes_it():
    c = GuestConsole(lambda data: None)
    with pytest.raises(VmError, match="no input"):
        c.write("x")
    fifo = bytearray()

    def feed(data):  # a 16-byte FIFO the guest empties now and then
        n = min(len(data), 16 - len(fifo))
        fifo.extend(data[:n])
        return n

    got = bytearray()

    def guest():
        while len(got) < 100:
            got.extend(fifo)
            fifo.clear()
            time.sleep(0.005)

    c.connect_input(feed)
    reader = threading.Thread(target=guest)
    reader.start()
    c.write(b"y" * 100, timeout=10)
    reader.join(timeout=10)
    assert bytes(got) == b"y" * 100
    fifo.extend(b"z" * 16)  # full, and nobody reads
    with pytest.raises(VmTimeout):
        c.write("w", timeout=0.1)
