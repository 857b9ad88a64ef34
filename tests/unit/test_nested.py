"""scripts/nested.py (the nested-KVM test host) and tests/support/relay.py (running tests there),
without QEMU: a stand-in for qemu-system-x86_64 and for L1's pytest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.support import relay as relay_mod

nested = relay_mod._load_nested()


# -- the L1 kit and the command line ------------------------------------------------------------

def test_newest_generic_kernel_package_is_chosen():
    names = ["linux-image-6.1.0-9-amd64-unsigned", "linux-image-6.1.0-57-amd64-unsigned",
             "linux-image-6.1.0-60-cloud-amd64-unsigned", "linux-image-6.1.0-57-amd64", "linux-image-6.12.1-amd64"]
    assert nested.newest_kernel(names) == "linux-image-6.1.0-57-amd64-unsigned"
    assert nested.newest_kernel(["linux-image-6.1.0-x-amd64-unsigned"]) is None


def test_the_script_l1_runs_sets_the_environment_quotes_the_command_and_keeps_its_status(tmp_path):
    opts = nested.Options(cwd="/some dir", env={"A": "x y"})
    script = nested.run_script(["echo", "it's", "$HOME"], opts, tmp_path)
    assert "export A='x y'" in script and "export PYVMM_IN_NESTED=1" in script
    assert "cd '/some dir' || exit 125" in script
    assert """echo 'it'"'"'s' '$HOME' </dev/null""" in script
    assert f"echo $status > {tmp_path / nested.STATUS_FILE}" in script


def test_qemu_command_offers_svm_shares_the_host_read_only_and_gives_a_scratch_disk(tmp_path):
    cmd = nested.qemu_command(Path("/kit"), tmp_path / "share", tmp_path / "s.img",
                              nested.Options(cpus=2, mem="4G", cwd="/tmp/ci/main"))
    assert "nested.keep=/tmp/ci/main" in cmd[cmd.index("-append") + 1]  # shown over the scratch /tmp
    assert "/tmp/*) mkdir -p /keep && mount -o bind" in nested.L1_INIT
    assert cmd[cmd.index("-cpu") + 1] == "max" and cmd[cmd.index("-accel") + 1].startswith("tcg")
    virtfs = [cmd[i + 1] for i, word in enumerate(cmd) if word == "-virtfs"]
    assert any("path=/," in v and "readonly=on" in v for v in virtfs)
    assert any(f"path={tmp_path / 'share'}," in v and "readonly" not in v for v in virtfs)
    assert f"nested.share={tmp_path / 'share'}" in cmd[cmd.index("-append") + 1]
    assert any(f"file={tmp_path / 's.img'}" in word for word in cmd)


@pytest.mark.parametrize("argv,message", [
    ([], "give the command"), (["--cpus", "0", "--", "true"], "must be positive"),
    (["--env", "NOEQUALS", "--", "true"], "NAME=VALUE")])
def test_bad_command_lines_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        nested.parse_args(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_sizes():
    assert nested._bytes("8G") == 8 << 30 and nested._bytes("512m") == 512 << 20 and nested._bytes("4096") == 4096
    with pytest.raises(nested.NestedError):
        nested._bytes("lots")


def test_a_missing_qemu_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(nested, "QEMU", "no-such-qemu-binary")
    assert nested.main(["--", "true"]) == 2
    assert capsys.readouterr().err.strip() == "nested: error: no-such-qemu-binary is not installed (apt-get install qemu-system-x86)"


# -- running: a stand-in QEMU --------------------------------------------------------------------

FAKE_QEMU = textwrap.dedent("""\
    #!{python}
    import os, sys, time
    args = sys.argv[1:]
    share = [w for w in args[args.index("-append") + 1].split() if w.startswith("nested.share=")][0].split("=", 1)[1]
    mode = os.environ["FAKE_MODE"]
    print("NESTED-READY", flush=True)
    if mode == "exit":
        open(os.path.join(share, ".nested-status"), "w").write("7\\n")
        print("NESTED-EXIT=7", flush=True)
    elif mode == "frozen":  # beats once, then no more (while printing, so the console is not silent)
        open(os.path.join(share, ".nested-heartbeat"), "w").write("1")
        for _ in range(600):
            print("still printing", flush=True)
            time.sleep(1)
    elif mode == "silent":
        open(os.path.join(share, "pid"), "w").write(str(os.getpid()))
        time.sleep(600)
    """)


@pytest.fixture
def fake_qemu(tmp_path, monkeypatch):
    qemu = tmp_path / "fake-qemu"
    qemu.write_text(FAKE_QEMU.format(python=sys.executable))
    qemu.chmod(0o755)
    monkeypatch.setattr(nested, "QEMU", str(qemu))
    monkeypatch.setattr(nested, "build", lambda force=False: tmp_path)
    monkeypatch.setattr(nested, "make_scratch", lambda path, size: path.write_bytes(b""))
    return qemu


def test_the_commands_exit_status_comes_back(fake_qemu, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "exit")
    lines = []
    assert nested.run(["true"], nested.Options(), share=tmp_path / "share", on_line=lines.append) == 7
    assert lines[0] == "NESTED-READY"


def test_l1_that_stops_without_a_status_is_125(fake_qemu, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "crash")
    lines = []
    assert nested.run(["true"], nested.Options(), share=tmp_path / "share", on_line=lines.append) == nested.NO_STATUS
    assert "without the command's exit status" in lines[-1]


def test_a_silent_l1_is_stopped_and_killed(fake_qemu, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "silent")
    lines = []
    started = time.monotonic()
    status = nested.run(["true"], nested.Options(idle_timeout=1), share=tmp_path / "share", on_line=lines.append)
    assert status == nested.TIMEOUT_STATUS and time.monotonic() - started < 30
    assert "was silent for" in lines[-1]
    pid = int((tmp_path / "share" / "pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def _dead(pid: int, within: float) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _start_nested_with_silent_l1(fake_qemu, tmp_path) -> tuple[subprocess.Popen, int]:
    """scripts/nested.py in its own process with the stand-in QEMU (silent); (that process, QEMU's pid)."""
    code = textwrap.dedent(f"""
        import sys; from pathlib import Path
        sys.argv = ["nested.py"]
        from tests.support import relay
        nested = relay._load_nested()
        nested.QEMU = {str(fake_qemu)!r}
        nested.build = lambda force=False: Path({str(tmp_path)!r})
        nested.make_scratch = lambda path, size: path.write_bytes(b"")
        sys.exit(nested.main(["--share", {str(tmp_path / "share")!r}, "--", "true"]))
        """)
    (tmp_path / "share").mkdir()
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=relay_mod.ROOT, env={**os.environ, "FAKE_MODE": "silent"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    pid_file, end = tmp_path / "share" / "pid", time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < end:
        time.sleep(0.1)
    return proc, int(pid_file.read_text())


def test_sigterm_to_nested_stops_l1(fake_qemu, tmp_path):
    proc, qemu_pid = _start_nested_with_silent_l1(fake_qemu, tmp_path)
    proc.terminate()
    assert proc.wait(timeout=60) == 128 + 15
    assert _dead(qemu_pid, within=10)


def test_l1_dies_with_a_killed_nested(fake_qemu, tmp_path):
    proc, qemu_pid = _start_nested_with_silent_l1(fake_qemu, tmp_path)
    proc.kill()  # no finally runs: L1's parent-death signal stops it
    proc.wait(timeout=10)
    assert _dead(qemu_pid, within=10)


def test_a_frozen_l1_is_told_by_its_heartbeat(fake_qemu, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "frozen")
    lines = []
    status = nested.run(["true"], nested.Options(stall_timeout=2), share=tmp_path / "share", on_line=lines.append)
    assert status == nested.TIMEOUT_STATUS and "no heartbeat for" in lines[-1]


def test_the_overall_timeout_holds(fake_qemu, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "silent")
    lines = []
    status = nested.run(["true"], nested.Options(timeout=1), share=tmp_path / "share", on_line=lines.append)
    assert status == nested.TIMEOUT_STATUS and "ran past 1 s" in lines[-1]


# -- the relay: a stand-in for L1's pytest --------------------------------------------------------

class FakeNested:
    """nested.run stand-in: each call plays the next scenario, a list of (node id, phases reached);
    a scenario ending in 'stall' returns as a silent L1 does."""

    TIMEOUT_STATUS, NO_STATUS, Options = nested.TIMEOUT_STATUS, nested.NO_STATUS, nested.Options

    def __init__(self, config, scenarios):
        self.config, self.scenarios, self.calls = config, list(scenarios), []

    def run(self, command, opts, *, share, on_line):
        nodeids = [w for w in command if "::" in w]
        self.calls.append(nodeids)
        scenario = self.scenarios.pop(0)
        with open(opts.env[relay_mod.RESULTS_ENV], "a") as f:
            for nodeid, phases in scenario:
                for phase in phases:  # "when" (passed) or (when, outcome, longrepr)
                    when, outcome, longrepr = (phase, "passed", None) if isinstance(phase, str) else phase
                    report = pytest.TestReport(nodeid, ("x.py", 0, nodeid), {}, outcome, longrepr, when)
                    f.write(json.dumps(self.config.hook.pytest_report_to_serializable(config=self.config,
                                                                                      report=report)) + "\n")
        if scenario and len(scenario[-1][1]) != 3:
            on_line("nested: L1 stopped responding (no heartbeat for 125 s) and was stopped")
            return nested.TIMEOUT_STATUS
        return 0


ALL = ("setup", "call", "teardown")


def relay_with(pytestconfig, monkeypatch, scenarios, nodeids=("t.py::a", "t.py::b", "t.py::c")):
    fake = FakeNested(pytestconfig, scenarios)
    monkeypatch.setattr(relay_mod, "_load_nested", lambda: fake)
    relay = relay_mod.Relay(pytestconfig)
    for nodeid in nodeids:
        relay.take(nodeid, object())
    relay.run()
    return relay, fake


def test_relay_reads_every_report(pytestconfig, monkeypatch):
    relay, fake = relay_with(pytestconfig, monkeypatch, [[("t.py::a", ALL), ("t.py::b", ALL), ("t.py::c", ALL)]])
    assert fake.calls == [["t.py::a", "t.py::b", "t.py::c"]]
    assert {n: [r.when for r in reps] for n, reps in relay.reports.items()} == {n: list(ALL) for n in relay.items}
    assert not relay.notes and not relay.failure


def test_relay_runs_what_is_left_in_a_fresh_l1_after_a_stall(pytestconfig, monkeypatch):
    relay, fake = relay_with(pytestconfig, monkeypatch, [
        [("t.py::a", ALL), ("t.py::b", ("setup",))],  # L1 stops during b
        [("t.py::b", ALL), ("t.py::c", ALL)]])
    assert fake.calls == [["t.py::a", "t.py::b", "t.py::c"], ["t.py::b", "t.py::c"]]
    assert [r.when for r in relay.reports["t.py::b"]] == list(ALL)
    assert "stopped responding during this test (1 time(s))" in relay.notes["t.py::b"]


def test_a_test_during_which_l1_keeps_stopping_is_not_run_again(pytestconfig, monkeypatch):
    relay, fake = relay_with(pytestconfig, monkeypatch, [
        [("t.py::a", ALL), ("t.py::b", ("setup",))],
        [("t.py::b", ("setup",))],
        [("t.py::b", ("setup",))],
        [("t.py::c", ALL)]])
    assert relay_mod.L1_STOPS_PER_TEST == 3
    assert fake.calls[1] == fake.calls[2] == ["t.py::b", "t.py::c"] and fake.calls[3] == ["t.py::c"]
    assert "(3 time(s))" in relay.notes["t.py::b"]
    assert [r.when for r in relay.reports["t.py::b"]] == ["setup"]  # reported failed, with the note


TRIPLE = ("setup", ("call", "failed", "AssertionError: PYVMM-READY\npyvmm: vcpu1: triple fault "
                                       "(KVM_EXIT_SHUTDOWN): Shutdown()\n  RIP=000000000000fff0"), "teardown")
OTHER = ("setup", ("call", "failed", "AssertionError: FIO-OK not found"), "teardown")


def test_a_test_whose_guest_triple_faulted_in_l1_runs_again_in_a_fresh_l1(pytestconfig, monkeypatch):
    relay, fake = relay_with(pytestconfig, monkeypatch, [
        [("t.py::a", TRIPLE), ("t.py::b", OTHER), ("t.py::c", ALL)],
        [("t.py::a", ALL)]])
    assert fake.calls == [["t.py::a", "t.py::b", "t.py::c"], ["t.py::a"]]  # b failed otherwise: not rerun
    assert [r.outcome for r in relay.reports["t.py::a"]] == ["passed"] * 3  # the rerun's reports stand
    assert [r.outcome for r in relay.reports["t.py::b"]] == ["passed", "failed", "passed"]
    assert list(relay.reruns) == ["t.py::a"] and "triple fault (KVM_EXIT_SHUTDOWN)" in relay.reruns["t.py::a"][0]


def test_a_guest_kernel_that_died_of_a_cpu_fault_in_l1_runs_again(pytestconfig, monkeypatch):
    panic = ("setup", ("call", "failed", "AssertionError: the guest did not finish within 540 s; its console "
                                         "ended:\n RIP: 0010:account_process_tick+0x16/0xf0\n Kernel panic - "
                                         "not syncing: Fatal exception in interrupt"), "teardown")
    relay, fake = relay_with(pytestconfig, monkeypatch, [
        [("t.py::a", panic), ("t.py::b", OTHER), ("t.py::c", ALL)],
        [("t.py::a", ALL)]])
    assert fake.calls == [["t.py::a", "t.py::b", "t.py::c"], ["t.py::a"]]
    assert list(relay.reruns) == ["t.py::a"] and "Fatal exception" in relay.reruns["t.py::a"][0]


def test_a_test_that_keeps_triple_faulting_fails_after_its_reruns(pytestconfig, monkeypatch):
    relay, fake = relay_with(pytestconfig, monkeypatch, [
        [("t.py::a", TRIPLE), ("t.py::b", ALL), ("t.py::c", ALL)],
        [("t.py::a", TRIPLE)],
        [("t.py::a", TRIPLE)]])
    assert relay_mod.L2_TRIPLE_FAULT_RERUNS == 2
    assert fake.calls[1:] == [["t.py::a"], ["t.py::a"]] and not fake.scenarios
    assert relay.reports["t.py::a"][1].failed and len(relay.reruns["t.py::a"]) == 2


def test_no_rerun_starts_that_the_nested_timeout_leaves_no_time_for(pytestconfig, monkeypatch):
    monkeypatch.setenv("PYVMM_NESTED_TIMEOUT", "100")  # enough for one L1, not for a second
    relay, fake = relay_with(pytestconfig, monkeypatch, [
        [("t.py::a", TRIPLE), ("t.py::b", ALL), ("t.py::c", ALL)],
        [("t.py::a", ALL)]])
    assert relay_mod.L1_START_S > 100
    assert len(fake.calls) == 1 and not relay.reruns  # no L1 started that would stop at the deadline
    assert relay.reports["t.py::a"][1].failed  # the triple fault stands...
    assert "not run again in a fresh L1" in relay.no_rerun["t.py::a"]  # ...saying why


def test_a_rerun_that_l1_stops_during_fails_with_the_note(pytestconfig, monkeypatch):
    relay, fake = relay_with(pytestconfig, monkeypatch, [
        [("t.py::a", TRIPLE), ("t.py::b", ALL), ("t.py::c", ALL)],
        [("t.py::a", ("setup",))], [("t.py::a", ("setup",))], [("t.py::a", ("setup",))]])
    assert len(fake.calls) == 4 and [r.when for r in relay.reports["t.py::a"]] == ["setup"]
    assert "(3 time(s))" in relay.notes["t.py::a"]


def test_relay_markers_are_declared(pytestconfig):
    declared = "\n".join(pytestconfig.getini("markers"))
    assert "native:" in declared and "debian12:" in declared


def test_inside_l1_each_report_is_written_at_once(tmp_path, monkeypatch, pytestconfig):
    monkeypatch.setenv("PYVMM_IN_NESTED", "1")
    monkeypatch.setenv(relay_mod.RESULTS_ENV, str(tmp_path / "r.jsonl"))
    report = pytest.TestReport("t.py::a", ("t.py", 0, "a"), {}, "failed", "boom", "call")
    relay_mod.pytest_runtest_logreport(report)
    data = json.loads((tmp_path / "r.jsonl").read_text())
    back = pytestconfig.hook.pytest_report_from_serializable(config=pytestconfig, data=data)
    assert (back.nodeid, back.outcome, back.when) == ("t.py::a", "failed", "call")



def test_a_skip_in_l1_comes_back_as_pytest_reports_it(pytestconfig, monkeypatch):
    """A skipped report's longrepr is a (path, line, reason) tuple; JSON turns it into a list, which
    pytest's summary of skips cannot fold (an INTERNALERROR at the end of a run)."""
    class SkippingL1(FakeNested):
        def run(self, command, opts, *, share, on_line):
            report = pytest.TestReport("t.py::a", ("t.py", 0, "a"), {}, "skipped", ("t.py", 3, "Skipped: why"), "setup")
            data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
            with open(opts.env[relay_mod.RESULTS_ENV], "a") as f:
                f.write(json.dumps(data) + "\n")
            return 0

    fake = SkippingL1(pytestconfig, [])
    monkeypatch.setattr(relay_mod, "_load_nested", lambda: fake)
    relay = relay_mod.Relay(pytestconfig)
    relay.take("t.py::a", object())
    relay.run()
    (back,) = relay.reports["t.py::a"]
    assert back.skipped and back.longrepr == ("t.py", 3, "Skipped: why") and isinstance(back.longrepr, tuple)
