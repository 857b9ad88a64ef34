import os

import pytest

from vmm import kit


def pytest_collection_modifyitems(config, items):
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
