"""The fuzzing campaign: every target of tests/fuzz (or those named), one after another.

    python scripts/fuzz.py [--runs N [--max-minutes M] | --minutes M] [--timeout S] [--json PATH] [--merge]
                           [--max-len B] [--workdir DIR] [--max-crashes K] [TARGET ...]

Each target runs as a subprocess (`python -m tests.fuzz.<target>`) under libFuzzer with
-runs=N (default 1000000; --max-minutes caps its time too) or -max_total_time, -timeout=S (default 10 s: a longer input is a
hang), -max_len=B (default 1024), its seed corpus (tests/fuzz/corpus/<target>, read only),
and a working corpus, the crash / timeout artifacts and its log under --workdir (default
/tmp/pyvmm-fuzz, never the repository).  A
crash or hang ends that libFuzzer run: it is counted, and the target starts again with what
is left of its budget, at most --max-crashes times.  At the end a table (executions,
coverage, features, corpus, crashes, hangs, exec/s per target) is printed and, with --json,
written as JSON (--merge: into what PATH already holds, target by target).

Not for CI (tests/unit/test_fuzz_smoke.py runs each target briefly).  Bad arguments: one
line on stderr, exit 2.  Exit 1 when a target crashed or hung, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FUZZ_DIR = ROOT / "tests" / "fuzz"

_STATUS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/", re.M)
_DONE = re.compile(r"^Done (\d+) runs in (\d+) second", re.M)
_ARTIFACT = re.compile(r"Test unit written to (\S+)")


@dataclass
class Result:
    target: str
    executions: int = 0
    coverage: int = 0  # libFuzzer's cov: edges of pyvmm's instrumented code
    features: int = 0  # libFuzzer's ft
    corpus: int = 0
    crashes: int = 0
    hangs: int = 0
    seconds: float = 0.0
    artifacts: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.executions / self.seconds if self.seconds else 0.0


def targets() -> list[str]:
    return sorted(p.stem for p in FUZZ_DIR.glob("fuzz_*.py"))


def parse(output: str, result: Result) -> int:
    """Fold one libFuzzer run's output into `result`; the executions it did."""
    done = _DONE.search(output)
    status = _STATUS.findall(output)
    runs = int(done.group(1)) if done else (int(status[-1][0]) if status else 0)
    if status:
        _, cov, ft, corp = status[-1]
        result.coverage, result.features, result.corpus = int(cov), int(ft), int(corp)
    for artifact in _ARTIFACT.findall(output):
        result.artifacts.append(artifact)
        if os.path.basename(artifact).startswith("timeout-") or "ALARM: working on the last Unit" in output:
            result.hangs += 1
        else:
            result.crashes += 1
    return runs


def run_target(name: str, args: argparse.Namespace) -> Result:
    result = Result(name)
    corpus = Path(args.workdir) / "corpus" / name
    artifacts = Path(args.workdir) / "artifacts" / name
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    seeds = FUZZ_DIR / "corpus" / name
    start = time.monotonic()
    for _ in range(args.max_crashes + 1):
        flags = [f"-timeout={args.timeout}", f"-max_len={args.max_len}", f"-artifact_prefix={artifacts}/",
                 "-print_final_stats=1"]
        if args.minutes is not None:
            left = args.minutes * 60 - (time.monotonic() - start)
            if left < 1:
                break
            flags.append(f"-max_total_time={int(left)}")
        else:
            left = args.runs - result.executions
            if left <= 0:
                break
            flags.append(f"-runs={left}")
            if args.max_minutes is not None:  # whichever comes first
                seconds = args.max_minutes * 60 - (time.monotonic() - start)
                if seconds < 1:
                    break
                flags.append(f"-max_total_time={int(seconds)}")
        dirs = [str(corpus)] + ([str(seeds)] if seeds.is_dir() else [])
        proc = subprocess.run([sys.executable, "-m", f"tests.fuzz.{name}", *flags, *dirs], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        result.executions += parse(proc.stdout, result)
        (Path(args.workdir) / f"{name}.log").write_text(proc.stdout)
        if proc.returncode == 0:
            break
        if not _ARTIFACT.search(proc.stdout):  # it failed before fuzzing: say so, stop
            print(proc.stdout[-2000:], file=sys.stderr)
            result.crashes += 1
            break
    result.seconds = round(time.monotonic() - start, 1)
    return result


def table(results: list[Result]) -> str:
    head = ("target", "executions", "cov", "ft", "corpus", "crashes", "hangs", "seconds", "exec/s")
    rows = [head] + [(r.target, str(r.executions), str(r.coverage), str(r.features), str(r.corpus), str(r.crashes),
                      str(r.hangs), f"{r.seconds:.0f}", f"{r.rate:.0f}") for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"fuzz.py: {message}\n")  # one line, not argparse's usage and error


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = _Parser(description=__doc__.split("\n\n")[0])
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--runs", type=int, default=1_000_000, help="executions per target")
    budget.add_argument("--minutes", type=float, help="minutes per target instead")
    p.add_argument("--max-minutes", type=float, help="with --runs: stop a target after this long all the same")
    p.add_argument("--timeout", type=int, default=10, help="seconds after which an input is a hang")
    p.add_argument("--max-len", type=int, default=1024, help="the longest input (bytes; a whole ring needs ~600)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--merge", action="store_true", help="keep the other targets' results already in --json")
    p.add_argument("--workdir", default="/tmp/pyvmm-fuzz", help="working corpora, artifacts, logs")
    p.add_argument("--max-crashes", type=int, default=3, help="restarts of a target after a crash or hang")
    p.add_argument("targets", nargs="*", help="targets (default: all)")
    args = p.parse_args(argv)
    known = targets()
    unknown = [t for t in args.targets if t not in known]
    if unknown:
        p.exit(2, f"fuzz.py: no such target: {', '.join(unknown)} (targets: {', '.join(known)})\n")
    if args.runs <= 0 or (args.minutes is not None and args.minutes <= 0) or args.timeout <= 0 or args.max_len <= 0 \
            or args.max_crashes < 0:
        p.exit(2, "fuzz.py: --runs, --minutes, --timeout and --max-len must be positive, --max-crashes not negative\n")
    if args.max_minutes is not None and (args.max_minutes <= 0 or args.minutes is not None):
        p.exit(2, "fuzz.py: --max-minutes must be positive, and goes with --runs, not --minutes\n")
    if args.merge and not args.json:
        p.exit(2, "fuzz.py: --merge needs --json\n")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    results = []
    for name in args.targets or targets():
        results.append(run_target(name, args))
        print(f"{name}: {results[-1].executions} executions, {results[-1].crashes} crashes, "
              f"{results[-1].hangs} hangs", file=sys.stderr, flush=True)
    print(table(results))
    if args.json:
        out = {r.target: {**asdict(r), "exec_per_s": round(r.rate)} for r in results}
        path = Path(args.json)
        if args.merge and path.exists():
            out = {**json.loads(path.read_text()), **out}
        path.write_text(json.dumps(out, indent=2) + "\n")
    return 1 if any(r.crashes or r.hangs for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
