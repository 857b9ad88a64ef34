"""The fuzz targets of tests/fuzz, each run briefly (the CI smoke test), and the campaign
script's parsing and arguments (scripts/fuzz.py).

Each target runs in a subprocess for 2000 inputs or 2 s, from its seed corpus into
a temporary one; a crash or broken invariant fails with libFuzzer's output.  The long runs
are the campaign's (README: Fuzzing).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import fuzz as campaign  # noqa: E402  (scripts/fuzz.py)

TARGETS = campaign.targets()


def test_every_target_has_seeds():
    assert len(TARGETS) >= 13
    for target in TARGETS:
        seeds = list((ROOT / "tests" / "fuzz" / "corpus" / target).iterdir())
        assert 3 <= len(seeds) <= 12 and all(s.stat().st_size <= 1024 for s in seeds), target


@pytest.mark.parametrize("target", TARGETS)
def test_target_runs_clean(target, tmp_path):
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", f"tests.fuzz.{target}", "-runs=2000", "-max_total_time=2", "-max_len=1024",
         "-timeout=10", f"-artifact_prefix={tmp_path}/", str(corpus), str(ROOT / "tests" / "fuzz" / "corpus" / target)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert "Done " in proc.stdout, proc.stdout[-2000:]


LIBFUZZER_OUTPUT = """\
#2\tINITED cov: 40 ft: 41 corp: 1/1b exec/s: 0 rss: 60Mb
#512\tpulse  cov: 97 ft: 180 corp: 20/900b lim: 21 exec/s: 256 rss: 61Mb
#1000\tDONE   cov: 101 ft: 230 corp: 25/1024b lim: 30 exec/s: 500 rss: 62Mb
Done 1000 runs in 2 second(s)
"""


def test_parse_counts_executions_and_coverage():
    result = campaign.Result("fuzz_x")
    assert campaign.parse(LIBFUZZER_OUTPUT, result) == 1000
    assert (result.coverage, result.features, result.corpus, result.crashes, result.hangs) == (101, 230, 25, 0, 0)


def test_parse_counts_crashes_and_hangs():
    result = campaign.Result("fuzz_x")
    crash = "#300\tNEW    cov: 9 ft: 9 corp: 3/3b\n==1== ERROR: libFuzzer: fuzz target exited\n" \
            "artifact_prefix='/tmp/a/'; Test unit written to /tmp/a/crash-abc\n"
    hang = "ALARM: working on the last Unit for 11 seconds\nTest unit written to /tmp/a/timeout-def\n"
    assert campaign.parse(crash, result) == 300
    campaign.parse(hang, result)
    assert (result.crashes, result.hangs) == (1, 1)
    assert result.artifacts == ["/tmp/a/crash-abc", "/tmp/a/timeout-def"]


def test_table_has_a_row_per_target():
    rows = campaign.table([campaign.Result("fuzz_a", executions=10, seconds=2.0), campaign.Result("fuzz_b")]).splitlines()
    assert rows[0].split()[:2] == ["target", "executions"] and rows[1].split()[-1] == "5" and len(rows) == 3


@pytest.mark.parametrize("argv", [["no_such_target"], ["--runs", "0"], ["--merge"], ["--runs", "x"],
                                  ["--runs", "5", "--minutes", "1"]])
def test_bad_arguments_exit_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        campaign.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("fuzz.py: ")
