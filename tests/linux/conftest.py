import os

import pytest

from tests.support import scriptload
from vmm import kit

DEBROOT_TESTS = "tests/linux/test_debian_root.py"


def _build_debian_root(items) -> None:
    """Build the Debian root image of test_debian_root.py here, before a relay to the nested KVM
    (which sees the host's cache read-only); quick when it is current, a few minutes otherwise,
    and only as root (those tests skip, saying how to build it, where it is missing)."""
    if os.environ.get("PYVMM_IN_NESTED") or os.geteuid() != 0:
        return
    if not any(DEBROOT_TESTS in str(item.fspath) for item in items):
        return
    debroot = scriptload.load("debroot")
    try:
        if not debroot.is_current():
            debroot.build()
        _cache_decompressed(debroot.debroot_dir() / debroot.VMLINUZ)
    except Exception as error:  # the tests then skip, saying the image is missing
        print(f"\ndebroot: cannot build the Debian root image: {error}")


def _cache_decompressed(vmlinuz) -> None:
    """Put the kernel's decompressed vmlinux in pyvmm's kernel cache (kernel/cache.py) here: L1
    reads the cache but cannot write it, and decompresses at the speed of TCG (~30 s a boot)."""
    from kernel.bzimage import parse_bzimage
    from kernel.cache import KernelCache
    from kernel.decompress import decompress_payload

    data = vmlinuz.read_bytes()
    image = parse_bzimage(data)
    entry = KernelCache(kit.kernel_cache_dir()).vmlinux(str(vmlinuz), data, lambda: decompress_payload(image.payload))
    if hasattr(entry, "close"):
        entry.close()


def pytest_collection_modifyitems(config, items):
    _build_debian_root(items)
    reason = None
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        reason = "no usable /dev/kvm on this host"
    elif not kit.kit_kernel().exists() or not kit.kit_initrd().exists():
        reason = f"no guest kit at {kit.kit_dir()}: build it with 'python3 scripts/guestkit.py build'"
    if reason:
        for item in items:
            if "tests/linux/" in str(item.fspath):
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def kernel_mode_native():
    from vmm.hostcheck import kernel_mode_native

    return kernel_mode_native()
