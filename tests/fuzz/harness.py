"""What every fuzz target shares: instrumentation, the entry point, the typed failure.

A target module imports the code it fuzzes inside `instrumented()` (so atheris adds coverage
feedback to pyvmm's own modules, nothing else), defines `one_input(data: bytes)` and ends with

    if __name__ == "__main__":
        main(one_input)

`python -m tests.fuzz.fuzz_x -runs=1000 corpus/fuzz_x` then runs libFuzzer on it.  A broken
invariant raises `InvariantError` (an AssertionError: libFuzzer reports it as a crash, with
the input saved); so does any exception a target does not expect.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator

import atheris

INSTRUMENTED_PACKAGES = ["vmm", "virtio", "kernel"]


class InvariantError(AssertionError):
    """Something that must hold for every guest input did not."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise InvariantError(message)


@contextlib.contextmanager
def instrumented() -> Iterator[None]:
    """Imports inside this block get coverage instrumentation (pyvmm's packages only)."""
    with atheris.instrument_imports(include=INSTRUMENTED_PACKAGES):
        yield


def main(one_input: Callable[[bytes], None], argv: list[str] | None = None) -> None:
    """Run libFuzzer on `one_input` with the command line's libFuzzer flags and corpus dirs."""
    logging.disable(logging.CRITICAL)  # what a guest may trigger at will: rate-limited lines, no invariant
    atheris.Setup(sys.argv if argv is None else argv, one_input)
    atheris.Fuzz()
