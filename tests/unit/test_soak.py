"""scripts/soak.py's verdicts (the soak itself runs for most of an hour in the nested KVM: not CI)."""

import importlib.util
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))  # soak imports bench_boot from beside it
spec = importlib.util.spec_from_file_location("soak", SCRIPTS / "soak.py")
soak = importlib.util.module_from_spec(spec)
spec.loader.exec_module(soak)


def samples(*rows):
    return [{"t": i, "fds": fds, "threads": threads, "rest_kib": rss} for i, (fds, threads, rss) in enumerate(rows)]


def test_flat_wants_the_same_descriptors_and_threads_and_rss_within_the_slack():
    assert soak.flat(samples((43, 7, 50_000), (43, 7, 50_100), (43, 7, 50_000 + soak.RSS_SLACK_KIB - 1)))["ok"]
    assert not soak.flat(samples((43, 7, 50_000), (44, 7, 50_000)))["ok"]  # a descriptor leaked
    assert not soak.flat(samples((43, 7, 50_000), (43, 8, 50_000)))["ok"]  # a thread left behind
    assert not soak.flat(samples((43, 7, 50_000), (43, 7, 50_000 + soak.RSS_SLACK_KIB)))["ok"]  # memory grows
    assert not soak.flat(samples((43, 7, 50_000)))["ok"]  # one sample shows nothing
    assert soak.flat(samples((43, 7, 1), (43, 7, 2)))["fds"] == [43]


def test_a_vm_is_up_from_its_first_result_line_and_results_are_counted():
    vm = {"counts": {}, "up_at": None}
    soak.count_results(vm, "booting...\n")
    assert vm["up_at"] is None
    soak.count_results(vm, "FIO-OK\n")
    first = vm["up_at"]
    soak.count_results(vm, "IPERF-BAD\n")
    assert vm["counts"] == {"FIO-OK": 1, "IPERF-BAD": 1} and vm["up_at"] == first


def test_the_cycle_command_reboots_until_the_last_cycle():
    command = soak.cycle_command(100)
    assert "[ $n -ge 100 ] || reboot -f" in command and "echo CYCLE=$n" in command
