"""Write the seed corpora: tests/fuzz/corpus/<target>/, a handful of small files per target.

    python -m tests.fuzz.seeds

The targets decode their input with atheris.FuzzedDataProvider, so any bytes are a valid
input; the seeds are an empty one, zeros and ones (the smallest and the largest choices: a
ring of one entry, of sixteen) and a few of fixed pseudo-random bytes, the same every run.
libFuzzer finds its way from there; the campaign's corpora stay under its --workdir.
"""

from __future__ import annotations

import random
from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "corpus"
LENGTHS = (48, 160, 480)


def seeds(target: str) -> dict[str, bytes]:
    rng = random.Random(target)
    out = {"empty": b"", "zeros": bytes(256), "ones": b"\xff" * 256}
    out.update({f"random-{n}": rng.randbytes(n) for n in LENGTHS})
    return out


def main() -> None:
    for module in sorted(Path(__file__).resolve().parent.glob("fuzz_*.py")):
        folder = CORPUS / module.stem
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in seeds(module.stem).items():
            (folder / name).write_bytes(data)


if __name__ == "__main__":
    main()
