"""Running the tests that need guest kernel mode inside the nested KVM (scripts/nested.py), and
reporting them with the rest.

Two markers (pyproject.toml) say where a test must run:
- `native`: it boots a stock kernel to userspace, so guest kernel mode must run natively.  On a host
  with VT-x/AMD-V it runs here; where this host's KVM emulates kernel mode (or there is no /dev/kvm)
  it runs inside L1, a Linux guest of QEMU's software CPU whose /dev/kvm is native.
- `debian12`: it depends on what the host kernel offers (taps, io_uring, O_DIRECT, fallocate).  It
  runs here as usual, and where this host's kernel is not Debian 12's 6.1 (the one pyvmm promises)
  it runs a second time in L1, which runs that kernel, as `<name>@debian12`.

All relayed tests go to one L1 in one pytest run, after the host's own tests.  L1's pytest writes
each report as a JSON line to the share; here every relayed item gets its reports (setup, call,
teardown) as if it had run here: passed, failed with L1's traceback, or skipped with L1's reason.
L1's console is echoed live, prefixed `L1| `.  An item that L1 never reported on (L1 timed out or
crashed) fails, saying why, with the end of L1's console.

A relayed test that failed because a stock guest died of a triple fault in L1 (pyvmm's
"triple fault (KVM_EXIT_SHUTDOWN)"), or of a CPU fault in its kernel ("Kernel panic - not syncing:
Fatal exception": seen once, a vCPU executing from inside an instruction another had just patched), runs again in a fresh L1, at most L2_TRIPLE_FAULT_RERUNS times.  In L1 a stock SMP guest now and then
dies so, at random points (booting, in fio), one in a few dozen boots: seen only in the nested KVM,
where QEMU's TCG emulates SVM with one host thread per L1 vCPU; whether pyvmm or the emulated SVM is at
fault is still open (the VMCB is reset on a shutdown intercept, so no state survives to show).  Each
rerun is reported: a line in L1's log, the failure as a section of the test's report, and a list at the
end of the session.  A rerun starts only where PYVMM_NESTED_TIMEOUT leaves time for a fresh L1
(L1_START_S) and the tests' own time in the first run; else the failure stands, saying so.  On a host
with VT-x/AMD-V these tests run here, once, with no rerun.

PYVMM_NESTED=off keeps everything on this host (native tests then skip where kernel mode is
emulated, saying so); PYVMM_NESTED_TIMEOUT (seconds, default 3000) bounds the L1 run;
PYVMM_NESTED_MEM (default 8G) is L1's memory.  Inside L1 (PYVMM_IN_NESTED=1) nothing is relayed.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS_ENV = "PYVMM_RELAY_RESULTS"
L1_SUFFIX = "@debian12"
LOG_TAIL = 60
L1_RUNS = 6  # L1 started at most this often for one session's relayed tests
L1_STOPS_PER_TEST = 3  # a test during which L1 stops this often fails
L1_TEST_TIMEOUT = 600  # pytest-timeout's bound on one test in L1; L1 silent 2 minutes longer is stopped
HOST_TEST_TIMEOUT = 600  # pytest-timeout's bound on one test run on this host (not relayed)
L1_STALL_TIMEOUT = 60  # L1 whose heartbeat (every 5 s) is this old (seconds) has frozen: stopped
L2_TRIPLE_FAULT = "triple fault (KVM_EXIT_SHUTDOWN)"  # what pyvmm prints when a vCPU shuts down
# What a stock guest prints when its CPU faults inside the kernel (an oops in an interrupt).  Seen in L1
# once: a 2-vCPU guest executing from the middle of a static-branch jump just patched (text_poke) on
# another vCPU - an instruction fetch no CPU can make, the emulated SVM's as the triple faults are.
L2_KERNEL_FAULT = "Kernel panic - not syncing: Fatal exception"
L2_DEATHS = (L2_TRIPLE_FAULT, L2_KERNEL_FAULT)
L2_TRIPLE_FAULT_RERUNS = 2  # a test failing with it runs again in a fresh L1 at most this often
L1_START_S = 120  # a fresh L1 up to its pytest's first test (measured ~60 s; CI's machine is slower)


def _load_nested():
    spec = importlib.util.spec_from_file_location("pyvmm_nested", ROOT / "scripts" / "nested.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def host_kernel_mode_native() -> bool:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    from vmm.hostcheck import kernel_mode_native

    return kernel_mode_native()


def host_runs_debian12_kernel() -> bool:
    """Whether this host's kernel is Debian 12's 6.1 (release 6.1.0-N-...)."""
    release = platform.release()
    return release.startswith("6.1.0-") and "amd64" in release


class RelayedItem(pytest.Item):
    """A test's second run, in L1 on Debian 12's kernel; its outcome comes from there."""

    def __init__(self, *, target: pytest.Item, **kw):
        super().__init__(**kw)
        self.target = target
        self.own_markers = list(target.own_markers)
        self.keywords.update(target.keywords)

    def runtest(self):  # pragma: no cover - the relay reports these; they never run here
        raise RuntimeError("a relayed item runs in L1")

    def reportinfo(self):
        path, line, _ = self.target.reportinfo()
        return path, line, self.name


class Relay:
    """The tests sent to L1 and, once run, their reports."""

    def __init__(self, config):
        self.config = config
        self.items: dict[str, pytest.Item] = {}  # L1 node id -> the item here that reports it
        self.reports: dict[str, list] | None = None
        self.failure = ""  # why tests without reports have none
        self.notes: dict[str, str] = {}  # node id -> L1 stopped during it
        self.reruns: dict[str, list[str]] = collections.defaultdict(list)  # node id -> the failures rerun
        self.no_rerun: dict[str, str] = {}  # node id -> why its L2 death was not run again

    def take(self, target_nodeid: str, item: pytest.Item) -> None:
        self.items[target_nodeid] = item

    def owns(self, item: pytest.Item) -> bool:
        return any(item is mine for mine in self.items.values())

    # -- running L1 -----------------------------------------------------------------
    def _echo(self, line: str) -> None:
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"L1| {line}")
        self._tail.append(line)

    def run(self) -> None:
        """Run every relayed test in L1, then once more in a fresh L1 each test that failed of an L2
        triple fault (at most L2_TRIPLE_FAULT_RERUNS times)."""
        nested = _load_nested()
        self._tail = collections.deque(maxlen=LOG_TAIL)
        self.reports = {}
        deadline = time.monotonic() + float(os.environ.get("PYVMM_NESTED_TIMEOUT", "3000"))
        self._run_all(nested, sorted(self.items), deadline)
        for _ in range(L2_TRIPLE_FAULT_RERUNS):
            again = [nodeid for nodeid in sorted(self.items) if self._triple_fault(nodeid)]
            if not again:
                return
            left, needed = deadline - time.monotonic(), L1_START_S + sum(map(self._duration, again))
            if left < needed:  # a fresh L1 that cannot finish them would only stop at the deadline
                for nodeid in again:
                    self.no_rerun[nodeid] = (f"not run again in a fresh L1: {left:.0f} s were left under "
                                             f"PYVMM_NESTED_TIMEOUT, ~{needed:.0f} s needed")
                    self._echo(f"{nodeid}: its guest died in L1; {self.no_rerun[nodeid]}")
                return
            for nodeid in again:
                self.reruns[nodeid].append(self._triple_fault(nodeid))
                self._echo(f"{nodeid}: its guest died of a triple fault or a kernel CPU fault in L1; running it again "
                           "in a fresh L1")
                del self.reports[nodeid]  # the rerun's reports stand for it
            self._run_all(nested, again, deadline)

    def _triple_fault(self, nodeid: str) -> str:
        """The failure text of `nodeid` where its guest died of a triple fault (or of a CPU fault in
        its kernel, L2_KERNEL_FAULT), else ''."""
        for report in self.reports.get(nodeid, []):
            text = str(report.longrepr) if report.failed else ""
            if any(death in text for death in L2_DEATHS):
                return text
        return ""

    def _duration(self, nodeid: str) -> float:
        """Seconds `nodeid` took in L1 (all its phases)."""
        return sum(report.duration for report in self.reports.get(nodeid, []))

    def _run_all(self, nested, pending: list[str], deadline: float) -> None:
        """Run `pending` in L1; where L1 stops before the end (a stall: its console silent past the
        bound, or its heartbeat stopped; or its timeout), run the tests left in a fresh L1, the one in
        progress too: a test during which L1 stops L1_STOPS_PER_TEST times fails, saying so."""
        stopped = collections.Counter()
        for attempt in range(1, L1_RUNS + 1):
            left = deadline - time.monotonic()
            if left < 60:
                self.failure = "no time was left under PYVMM_NESTED_TIMEOUT to run it in L1"
                return
            status, why = self._run_once(nested, pending, left)
            finished = {nodeid for nodeid, reports in self.reports.items()
                        if any(r.when == "teardown" for r in reports)}
            unfinished = [nodeid for nodeid in pending if nodeid not in finished]
            if why is None or not unfinished:
                if status not in (0, 1) and unfinished:
                    self.failure = f"L1's pytest exited with status {status}"
                return
            current = next((nodeid for nodeid in unfinished if nodeid in self.reports), unfinished[0])
            stopped[current] += 1
            self.notes[current] = f"L1 {why} during this test ({stopped[current]} time(s))"
            pending = [nodeid for nodeid in unfinished if stopped[nodeid] < L1_STOPS_PER_TEST]
            if not pending:
                return
            self._echo(f"L1 {why} during {current}; {len(pending)} tests left for a fresh L1 "
                       f"(run {attempt + 1} of at most {L1_RUNS})")
        self.failure = f"L1 stopped early {L1_RUNS} times"

    def _run_once(self, nested, nodeids: list[str], timeout: float) -> tuple[int | None, str | None]:
        """One L1 with one pytest run over `nodeids`; its reports go into self.reports.  Returns
        (L1's exit status, why L1 stopped early or None)."""
        with tempfile.TemporaryDirectory(prefix="pyvmm-relay-") as share:
            results = Path(share) / "reports.jsonl"
            command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rA", "--color=no",
                       f"--timeout={L1_TEST_TIMEOUT}", *nodeids]
            opts = nested.Options(
                cpus=min(os.cpu_count() or 1, 4), mem=os.environ.get("PYVMM_NESTED_MEM", "8G"), timeout=timeout,
                idle_timeout=L1_TEST_TIMEOUT + 120, stall_timeout=L1_STALL_TIMEOUT, cwd=str(ROOT),
                env={RESULTS_ENV: str(results), "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1",
                     "HYPOTHESIS_STORAGE_DIRECTORY": "/tmp/hypothesis"})
            self._echo(f"running {len(nodeids)} tests in the nested KVM (L1: Debian 12's kernel, QEMU TCG)")
            try:
                status = nested.run(command, opts, share=Path(share), on_line=self._echo)
            except Exception as error:  # a missing qemu, a kit that cannot be built: every relayed test fails
                self.failure = f"the nested KVM could not run: {error}"
                return None, None
            fresh: dict[str, list] = collections.defaultdict(list)
            if results.exists():
                for line in results.read_text().splitlines():
                    try:
                        data = json.loads(line)
                    except ValueError:
                        continue  # a line cut short when L1 stopped
                    report = self.config.hook.pytest_report_from_serializable(config=self.config, data=data)
                    if report.skipped and isinstance(report.longrepr, list):  # JSON made the tuple a list
                        report.longrepr = tuple(report.longrepr)  # (the summary folds skips by it)
                    fresh[report.nodeid].append(report)
            self.reports.update(fresh)
        if status == nested.TIMEOUT_STATUS:
            return status, "ran out of time" if "ran past" in "\n".join(self._tail) else "stopped responding"
        if status == nested.NO_STATUS:
            return status, "stopped without finishing its pytest run"
        return status, None

    # -- reporting --------------------------------------------------------------------
    def report(self, item: pytest.Item) -> None:
        if self.reports is None:
            self.run()
        target = next(nodeid for nodeid, mine in self.items.items() if mine is item)
        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        reports = self.reports.get(target, [])
        if not any(r.when == "call" or r.outcome != "passed" for r in reports):
            why = self.notes.get(target) or self.failure or "L1's pytest gave no result for it"
            reports = [pytest.TestReport(item.nodeid, item.location, dict(item.keywords), "failed",
                                         f"{why}\nthe end of L1's console:\n" + "\n".join(self._tail), "call")]
        for report in reports:
            report.nodeid, report.location = item.nodeid, item.location
            if report.when == "call":
                for n, text in enumerate(self.reruns.get(target, []), 1):
                    report.sections.append((f"run {n} in L1, failed of a triple fault and run again", text))
                if target in self.no_rerun:
                    report.sections.append(("its guest died in L1", self.no_rerun[target]))
            ihook.pytest_runtest_logreport(report=report)
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)


# -- hooks (registered by tests/conftest.py) --------------------------------------------------
_relay_key = pytest.StashKey[Relay]()


def pytest_collection_modifyitems(session, config, items):
    if os.environ.get("PYVMM_IN_NESTED"):
        return  # (L1's pytest bounds each test with --timeout=L1_TEST_TIMEOUT)
    _relay_tests(config, items)
    relay = config.stash.get(_relay_key, None)
    for item in items:  # a test run here that hangs fails after HOST_TEST_TIMEOUT instead of stalling the suite
        if (relay is None or not relay.owns(item)) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(HOST_TEST_TIMEOUT))


def _relay_tests(config, items) -> None:
    native = [item for item in items if item.get_closest_marker("native")]
    kernel = [item for item in items if item.get_closest_marker("debian12") and item not in native]
    off = os.environ.get("PYVMM_NESTED", "auto") == "off"
    relay_native = bool(native) and not host_kernel_mode_native()
    if off:
        if relay_native:
            skip = pytest.mark.skip(reason="this host's KVM emulates guest kernel mode (no VT-x/AMD-V) and "
                                           "PYVMM_NESTED=off keeps the test out of the nested KVM")
            for item in native:
                item.add_marker(skip)
        return
    relay = Relay(config)
    if relay_native:
        for item in native:
            relay.take(item.nodeid, item)
    if kernel and not host_runs_debian12_kernel():
        for item in kernel:
            twin = RelayedItem.from_parent(item.parent, name=item.name + L1_SUFFIX, target=item)
            relay.take(item.nodeid, twin)
    if relay.items:
        config.stash[_relay_key] = relay
        mine = list(relay.items.values())
        items[:] = [item for item in items if not relay.owns(item)] + mine


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    relay = item.config.stash.get(_relay_key, None)
    if relay is None or not relay.owns(item):
        return None
    relay.report(item)
    return True


def pytest_runtest_logreport(report):
    """Inside L1: each report as a JSON line in the share, flushed at once (L1 may be stopped)."""
    path = os.environ.get(RESULTS_ENV)
    if not path or not os.environ.get("PYVMM_IN_NESTED"):
        return
    config = _config[0]
    data = config.hook.pytest_report_to_serializable(config=config, report=report)
    with open(path, "a") as f:
        f.write(json.dumps(data) + "\n")
        f.flush()
        os.fsync(f.fileno())


def pytest_terminal_summary(terminalreporter):
    relay = terminalreporter.config.stash.get(_relay_key, None)
    if relay is None or not relay.reruns:
        return
    terminalreporter.section("tests run again after their guest died in the nested KVM (triple fault, kernel CPU fault)")
    for nodeid, failures in sorted(relay.reruns.items()):
        terminalreporter.write_line(f"{nodeid}: {len(failures)} rerun(s)")


_config: list = [None]


def pytest_configure(config):
    _config[0] = config
