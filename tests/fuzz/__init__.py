"""Coverage-guided fuzz targets (atheris) for every parser a guest can reach.

Each `fuzz_*.py` module is one target over pure code (a test GuestMemory, fake backends,
no KVM), runnable as `python -m tests.fuzz.fuzz_queue [libFuzzer args] [corpus dirs]`.
`scripts/fuzz.py` runs them all as a campaign; tests/unit/test_fuzz_smoke.py runs each
briefly.  Seed inputs live in `corpus/<target>/` (scripts: `python -m tests.fuzz.seeds`).
"""
