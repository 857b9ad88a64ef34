"""What `pyvmm run` does before the guest's first instruction: nothing a boot does not need."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vmm import hostcheck

REPO = Path(__file__).resolve().parents[2]


def test_a_vm_without_a_nic_loads_neither_numpy_nor_io_uring():
    """numpy and io_uring come with virtio-net's batch paths (virtio/backends/tap_batch.py),
    loaded when a --net device is built; the rest of pyvmm does without them, and without the
    socket module (the tap's MTU socket) and calendar (the CMOS clock needs only datetime)."""
    assert loaded_by("vmm.config.parse_net_spec('tap=tap0,queues=2,mtu=9000')",
                     "numpy", "vmm.io_uring", "virtio.net", "virtio.batch", "socket", "calendar") == []


def test_a_direct_boot_without_devices_loads_no_firmware_and_no_device_code():
    """What only a firmware boot needs (vmm/firmware, fw_cfg's tables) and the modules of devices
    the configuration does not have (their limits are loaded when an option names them) stay out
    of a plain `pyvmm run`; so does the socket module, with the backends' errors apart (errors.py)."""
    assert loaded_by("vmm.config.VmConfig()", "vmm.firmware.image", "vmm.firmware.fw_cfg",
                     "kernel.fw_cfg_tables", "virtio.blk", "virtio.backends.raw", "virtio.backends.tap",
                     "virtio.backends.port", "virtio.vsock_packet", "virtio.net_common", "socket",
                     "lzma", "bz2") == []  # (and no decompressor: the kernel comes from the cache)


def loaded_by(statement: str, *modules: str) -> list[str]:
    """Which of `modules` a fresh Python has loaded after importing what `pyvmm run` imports (its
    start path: vmm/cli.py cmd_run) and running `statement`."""
    code = ("import sys, vmm.cli, vmm.config, vmm.early, vmm.machine, vmm.boot, vmm.virtio_devices, vmm.hostcheck\n"
            "import kernel.errors, virtio.backends.errors, vmm.console\n"
            f"{statement}\n"
            f"print(sorted(m for m in {modules!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return eval(out.stdout)  # a list of module names, printed by the child


class Probe:
    def __init__(self, native: bool):
        self.native, self.calls = native, 0

    def __call__(self, kvm):
        self.calls += 1
        return hostcheck.ModeTiming(cpl0_ns=1.0 if self.native else 900.0, cpl3_ns=1.0)


@pytest.fixture
def probe(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(hostcheck, "Kvm", lambda path: type("K", (), {"close": lambda self: None})())
    p = Probe(native=False)
    monkeypatch.setattr(hostcheck, "measure", p)
    hostcheck._cached_native.cache_clear()
    yield p
    hostcheck._cached_native.cache_clear()


def ask() -> bool:
    hostcheck._cached_native.cache_clear()  # (a new process)
    return hostcheck.kernel_mode_native()


def test_the_kvm_mode_is_measured_once_per_host_boot(probe, tmp_path):
    assert ask() is False and probe.calls == 1
    saved = json.loads((tmp_path / "pyvmm" / "kvm-mode.json").read_text())
    assert saved == {"key": hostcheck.host_key("/dev/kvm"), "native": False}
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert saved["key"].startswith(f"{boot_id} /dev/kvm ")
    assert ask() is False and probe.calls == 1


def test_a_new_boot_or_kvm_device_measures_again(probe, monkeypatch):
    ask()
    monkeypatch.setattr(hostcheck, "host_key", lambda path: "another boot")
    probe.native = True
    assert ask() is True and probe.calls == 2
    assert ask() is True and probe.calls == 2


@pytest.mark.parametrize("content", ["", "{not json", '["a list"]', '{"key": "x", "native": "yes"}'])
def test_a_damaged_verdict_is_measured_again(probe, tmp_path, content):
    ask()
    (tmp_path / "pyvmm" / "kvm-mode.json").write_text(content)
    assert ask() is False and probe.calls == 2


def test_without_a_cache_directory_it_measures_every_time(probe, monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    assert ask() is False and ask() is False and probe.calls == 2
