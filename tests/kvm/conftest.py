import os

import pytest

from tests.support.guests import build_tiny, have_gcc


def pytest_collection_modifyitems(config, items):
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        skip = pytest.mark.skip(reason="no usable /dev/kvm on this host")
        for item in items:
            if "tests/kvm/" in str(item.fspath):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny("hello") -> path of the built tests/guest/tiny/hello.S guest."""
    if not have_gcc():
        pytest.skip("gcc is needed to build the test guests")
    out = tmp_path_factory.mktemp("guests")
    return lambda name: str(build_tiny(name, out))
