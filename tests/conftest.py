"""Hooks for the whole suite: tests marked `native` or `debian12` may run in the nested KVM
(tests/support/relay.py says when and how)."""

from tests.support.relay import (  # noqa: F401  (pytest finds hooks by name here)
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_runtest_logreport,
    pytest_runtest_protocol,
    pytest_terminal_summary,
)
