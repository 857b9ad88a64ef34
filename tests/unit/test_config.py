"""vmm/config: a VmConfig from a dict, and bad input on the command line: one line on stderr, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vmm import cli, config
from vmm.config import ConfigError, DiskSpec, NetSpec, VmConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAC = bytes.fromhex("525400123456")


@pytest.fixture
def kernel(tmp_path):
    p = tmp_path / "vmlinuz"
    p.write_bytes(b"\0" * 4096)
    return str(p)


def test_from_dict():
    c = VmConfig.from_dict({"mem": "1G", "cpus": 2, "kernel": "k", "append": "quiet", "cpuid_mask": ["cx16"],
                            "disk": ["a.img,readonly=on", {"path": "b.img", "queues": 2, "serial": "S"}],
                            "net": [{"tap": "tap0", "mac": "52:54:00:12:34:56"}, "tap=tap1,queues=2"]})
    assert c.mem_size == 1 << 30 and c.cpus == 2 and c.kernel == "k"
    assert c.cmdline == "console=ttyS0 quiet" and c.cpuid_mask == ("cx16",)
    assert c.disks == (DiskSpec("a.img", read_only=True), DiskSpec("b.img", serial="S", queues=2))
    assert c.nets == (NetSpec("tap0", MAC), NetSpec("tap1", queues=2))
    assert VmConfig.from_dict({}) == VmConfig()
    assert VmConfig.from_dict({"firmware": "", "boot": "net,disk"}).boot_order == config.parse_boot_order("net,disk")


def test_from_dict_matches_the_command_line(kernel):
    argv = ["run", "--kernel", kernel, "--mem", "256M", "--cpus", "2", "--disk", f"{kernel},serial=X",
            "--net", "tap=t0", "--console", "none", "--cpuid-mask", "none"]
    from_cli = config.from_args(cli.build_parser().parse_args(argv))
    from_dict = config.check_host(VmConfig.from_dict({"kernel": kernel, "mem": 256 << 20, "cpus": 2,
                                                      "disk": [{"path": kernel, "serial": "X"}],
                                                      "net": [{"tap": "t0"}], "console": "none",
                                                      "cpuid_mask": "none"}))
    assert from_cli == from_dict


@pytest.mark.parametrize("options, message", [
    ({"mem": "lots"}, "--mem: not a size"),
    ({"cpus": 0}, "--cpus 0"),
    ({"console": "tty"}, "--console 'tty'"),
    ({"entry": "elf"}, "--entry 'elf'"),
    ({"disk": [{"path": "a", "format": "qcow2"}]}, "unknown option 'format'"),
    ({"disk": [{"queues": 2}]}, "no image path"),
    ({"net": [{"tap": "t0", "queues": 0}]}, "queues=0 is not a number from 1 to 64"),
    ({"net": [{"mac": "52:54:00:12:34:56"}]}, "no tap=NAME"),
    ({"net": [{"tap": "t0", "mtu": 70000}]}, "mtu=70000 is not a number from 68 to 65535"),
    ({"boot": "disk"}, "--boot needs --firmware"),
    ({"memory": "1G"}, "unknown option 'memory'"),
])
def test_from_dict_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        VmConfig.from_dict(options)


def test_stats_option(kernel):
    assert (VmConfig.from_dict({}).stats, VmConfig.from_dict({}).stats_json) == (False, None)
    for value, json_path in ((True, None), ("", None), ("out.json", "out.json")):
        c = VmConfig.from_dict({"stats": value})
        assert (c.stats, c.stats_json) == (True, json_path)
    c = config.from_args(cli.build_parser().parse_args(["run", "--program", kernel, "--stats"]))
    assert (c.stats, c.stats_json) == (True, None)
    with pytest.raises(ConfigError, match="--stats 3"):
        VmConfig.from_dict({"stats": 3})


def test_seccomp_option(kernel):
    assert VmConfig().seccomp == VmConfig.from_dict({}).seccomp == "kill"
    for mode in ("kill", "errno", "log", "off"):
        assert VmConfig.from_dict({"seccomp": mode}).seccomp == mode
        c = config.from_args(cli.build_parser().parse_args(["run", "--program", kernel, "--seccomp", mode]))
        assert c.seccomp == mode
    with pytest.raises(ConfigError, match="--seccomp 'KILL': use kill or errno or log or off"):
        VmConfig.from_dict({"seccomp": "KILL"})


def test_config_is_frozen():
    c = VmConfig(disks=[DiskSpec("a.img")])
    assert c.disks == (DiskSpec("a.img"),)
    with pytest.raises(AttributeError):
        c.cpus = 2


# -- bad input on the command line: each one line on stderr and exit 2, before KVM is opened --------


def run_main(capsys, *args):
    status = cli.main(["run", *args])
    return status, capsys.readouterr().err


def one_line_error(status, err, *words):
    assert status == cli.EXIT_USAGE, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pyvmm: error: "), err
    for w in words:
        assert w in lines[0], lines[0]


def test_console_file_in_a_missing_directory_exits_2():
    """The defect of issue 14, through the real entry point: a traceback and exit 1 before."""
    r = subprocess.run([sys.executable, "-m", "vmm.cli", "run", "--console", "file:/no/such/dir/x"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                       env=dict(os.environ, PYVMM_KVM="/nonexistent/kvm"))
    one_line_error(r.returncode, r.stderr, "--console", "/no/such/dir", "does not exist")


@pytest.mark.parametrize("args, words", [
    (["--console", "file:/no/such/dir/x"], ["--console", "does not exist"]),
    (["--console", "file:{tmp}"], ["--console", "is a directory"]),
    (["--console", "tty0"], ["--console", "file:PATH"]),
    (["--kernel", "/no/such/bzImage"], ["kernel", "does not exist"]),
    (["--kernel", "{tmp}"], ["kernel", "not a file"]),
    (["--initrd", "/no/such/initrd"], ["initrd", "does not exist"]),
    (["--program", "/no/such/elf"], ["program", "does not exist"]),
    (["--disk", "/no/such/disk.img"], ["--disk", "does not exist"]),
    (["--disk", "{tmp}"], ["--disk", "is a directory"]),
    (["--disk", "{kernel},queues=0"], ["--disk", "queues"]),
    (["--disk", "{kernel},cache=unsafe"], ["--disk", "cache"]),
    (["--net", "tap=a/b"], ["--net", "not a valid interface name"]),
    (["--net", "tap=a-very-long-tap-name"], ["--net", "too long"]),
    (["--net", "tap="], ["--net", "no tap=NAME"]),
    (["--net", "tap=t0,mac=01:00:5e:00:00:01"], ["--net", "multicast"]),
    (["--net", "tap=t0,mtu=9"], ["--net", "mtu='9' is not a number from 68 to 65535"]),
    (["--mem", "lots"], ["--mem", "not a size"]),
    (["--mem=-1G"], ["--mem", "not a size"]),
    (["--mem", "1M"], ["--mem", "too small"]),
    (["--mem", "17000001"], ["--mem", "multiple of 4 KiB"]),
    (["--cpus", "0"], ["--cpus"]),
    (["--cpus", "two"], ["--cpus"]),
    (["--cpuid-mask", "cx16,bogus"], ["bogus"]),
    (["--boot", "disk"], ["--boot needs --firmware"]),
    (["--firmware", "/no/such/bios.bin"], ["--firmware", "does not exist"]),
    (["--firmware", "{bios}", "--firmware-log", "/no/such/dir/log"], ["--firmware-log", "does not exist"]),
    (["--firmware", "{bios}", "--net", "tap=t0,rom=/no/such.rom"], ["rom", "/no/such.rom"]),
    (["--stats=/no/such/dir/stats.json"], ["--stats", "/no/such/dir", "does not exist"]),
    (["--stats={tmp}"], ["--stats", "is a directory"]),
    (["--seccomp", "strict"], ["--seccomp 'strict'", "kill or errno or log or off"]),
    (["--seccomp="], ["--seccomp ''"]),
])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, kernel, args, words):
    bios = tmp_path / "bios.bin"
    bios.write_bytes(b"\0" * (64 << 10))
    args = [a.format(tmp=tmp_path, kernel=kernel, bios=bios) for a in args]
    if not {"--kernel", "--program", "--firmware"} & set(args):
        args = ["--kernel", kernel, *args]
    one_line_error(*run_main(capsys, *args), *words)


def test_stats_file_that_cannot_be_written_is_one_line_and_exit_2(capsys, monkeypatch, tmp_path, kernel):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode))
    one_line_error(*run_main(capsys, "--kernel", kernel, f"--stats={tmp_path}/stats.json"), "--stats",
                   f"{tmp_path}/stats.json", "not writable")


@pytest.mark.parametrize("option", ["--kernel", "--initrd", "--disk"])
def test_unreadable_file_is_one_line_and_exit_2(capsys, monkeypatch, tmp_path, kernel, option):
    unreadable = tmp_path / "secret"
    unreadable.write_bytes(b"\0" * 4096)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(unreadable) else real_access(p, mode))
    args = ["--kernel", str(unreadable)] if option == "--kernel" else ["--kernel", kernel, option, str(unreadable)]
    one_line_error(*run_main(capsys, *args), str(unreadable), "not readable")
