"""`pyvmm run --config FILE` and `--print-config` (vmm/config/file.py, vmm/config/flags.py): every
option has a key, what --print-config writes reads back to the same VmConfig, flags win over the
file, and a bad file is one line and exit 2."""

from __future__ import annotations

import tomllib

import pytest

from vmm import cli, config
from vmm.config import OPTIONS
from vmm.config.file import load, to_toml
from vmm.config.flags import FLAGS

# Three sets of flags (a kernel, firmware and a program boot exclude each other) that together
# give every option of `pyvmm run` a value, repeatable ones twice.
KERNEL_BOOT = [
    "--kernel", "/boot/vmlinuz", "--initrd", "/boot/initrd.img", "--cmdline", "console=ttyS0 root=/dev/vda",
    "--append", 'quiet pyvmm.cmd="x y"', "--mem", "1G", "--cpus", "3", "--console", "file:/tmp/con.log",
    "--entry", "bzimage", "--cpuid-mask", "cx16,xsave", "--on-reboot", "restart",
    "--disk", "/tmp/a.img,readonly=on,serial=A1", "--disk", "/tmp/b.img,cache=none,queues=2",
    "--net", "tap=tap0,mac=52:54:00:12:34:56,mtu=9000", "--net", "tap=tap1,queues=2",
    "--name", "vm \"one\"\\ü", "--stats=/tmp/stats.json", "--seccomp", "log", "--console-device", "virtio",
    "--port", "name=org.agent,socket=/tmp/agent.sock", "--port", "name=log,file=/tmp/port.log",
    "--rng", "rate=64K", "--balloon", "size=64M,stats=1,free-page-reporting=on", "--vsock", "cid=3,socket=/tmp/v.sock",
    "--shutdown-timeout", "2.5", "--api-socket", "/tmp/one.sock",
]
FIRMWARE_BOOT = ["--firmware", "--boot", "net0,disk0", "--firmware-log", "/tmp/fw.log", "--disk", "/tmp/a.img",
                 "--net", "tap=tap0", "--stats", "--rng", "--balloon"]
PROGRAM_BOOT = ["--program", "/tmp/driver.elf", "--cpus", "2", "--shutdown-timeout", "0", "--api-socket", "off"]
EVERY_SET = [KERNEL_BOOT, FIRMWARE_BOOT, PROGRAM_BOOT]


def run_args(*argv: str):
    return cli.build_parser().parse_args(["run", *argv])


def options_and_config(*argv: str):
    return config.checked_options(run_args(*argv))


def test_every_run_option_has_a_key_and_a_flag():
    run = next(a for a in cli.build_parser()._actions if a.dest == "command").choices["run"]
    dests = {a.dest for a in run._actions} - {"help", "config", "print_config"}
    assert dests == set(OPTIONS) == set(FLAGS)
    for key, flag in FLAGS.items():
        assert flag.flag == "--" + flag.file_key and flag.file_key.replace("-", "_") == key


def test_the_sample_flags_give_every_option():
    given = set()
    for argv in EVERY_SET:
        given |= set(options_and_config(*argv)[0])
    assert given == set(OPTIONS)


@pytest.mark.parametrize("argv", EVERY_SET, ids=["kernel", "firmware", "program"])
def test_print_config_reads_back_to_the_same_vmconfig(tmp_path, capsys, argv):
    options, want = options_and_config(*argv)
    assert cli.main(["run", *argv, "--print-config"]) == 0
    text = capsys.readouterr().out
    assert text == to_toml(options)
    path = tmp_path / "vm.toml"
    path.write_text(text)
    options_back, got = options_and_config("--config", str(path))
    assert got == want
    assert load(str(path)) == options_back and set(options_back) == set(options)
    assert {k: v for k, v in options_back.items() if k != "shutdown_timeout"} == \
        {k: v for k, v in options.items() if k != "shutdown_timeout"}  # seconds: the flag's text, a number here
    assert options_back.get("shutdown_timeout") == (float(options["shutdown_timeout"]) if "shutdown_timeout" in options
                                                    else None)
    assert cli.main(["run", "--config", str(path), "--print-config"]) == 0  # and prints the same again
    assert capsys.readouterr().out == text


def test_what_the_file_says(tmp_path):
    path = tmp_path / "vm.toml"
    path.write_text('cpus = 2\nmem = "1G"\ncpuid-mask = "none"\nrng = true\nstats = false\nshutdown-timeout = 30\n'
                    'disk = ["/tmp/a.img", { path = "/tmp/b.img", readonly = true, serial = "B" }]\n'
                    'balloon = { size = "64M", deflate-on-oom = true }\n')
    _, c = options_and_config("--config", str(path))
    assert (c.cpus, c.mem_size, c.cpuid_mask, c.stats, c.shutdown_timeout) == (2, 1 << 30, (), False, 30.0)
    assert c.rng == config.RngSpec() and c.balloon.size == 64 << 20 and c.balloon.deflate_on_oom
    assert [(d.path, d.read_only, d.serial) for d in c.disks] == [("/tmp/a.img", False, ""), ("/tmp/b.img", True, "B")]


def test_flags_win_over_the_file_and_a_repeated_flag_replaces_its_array(tmp_path):
    path = tmp_path / "vm.toml"
    path.write_text('cpus = 2\nname = "file"\ndisk = ["/tmp/a.img", "/tmp/b.img"]\nshutdown-timeout = 30\n')
    options, c = options_and_config("--config", str(path), "--cpus", "4", "--disk", "/tmp/c.img")
    assert c.cpus == 4 and c.name == "file" and [d.path for d in c.disks] == ["/tmp/c.img"]
    assert c.shutdown_timeout == 30
    assert options == {"cpus": 4, "name": "file", "disk": ["/tmp/c.img"], "shutdown_timeout": 30}


def test_toml_strings_are_escaped():
    tricky = 'a "quoted" back\\slash\ttab\nnewline \x7f ü'
    text = to_toml({"name": tricky, "append": "", "cmdline": "x=1"})
    assert text.count("\n") == 3  # one line each, the newline escaped
    assert tomllib.loads(text) == {"cmdline": "x=1", "append": "", "name": tricky}


# ---------------------------------------------------------------- bad files: one line, exit 2


def one_line_error(capsys, argv, *words):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pyvmm: error: "), captured.err
    for word in words:
        assert word in lines[0], lines[0]
    assert captured.out == ""


@pytest.mark.parametrize("text, words", [
    ("cpu = 2\n", ["unknown key 'cpu'", "known: kernel"]),
    ('cpuid_mask = "none"\n', ["unknown key 'cpuid_mask'", "with dashes: cpuid-mask"]),
    ('cpus = "2"\n', ['cpus = "2": expected an integer']),
    ("cpus = 0\n", ["--cpus 0", "at least 1 vCPU"]),
    ('mem = "lots"\n', ["--mem", "not a size"]),
    ("mem = 536870912\n", ["mem = 536870912: expected a string"]),
    ('entry = "elf"\n', ['entry = "elf": use vmlinux or bzimage']),
    ('disk = "/tmp/a.img"\n', ["disk = \"/tmp/a.img\": expected an array of strings or tables"]),
    ('disk = [{ path = "/tmp/a.img", speed = 9 }]\n', ["--disk", "unknown option 'speed'"]),
    ('net = ["tap=tap0,mtu=5"]\n', ["--net", "mtu"]),
    ("rng = 3\n", ["rng = 3: expected true or a string"]),
    ("shutdown-timeout = -1\n", ["--shutdown-timeout -1", "0 or more"]),
    ('shutdown-timeout = "soon"\n', ['shutdown-timeout = "soon": expected a number of seconds']),
    ("shutdown-timeout = nan\n", ["--shutdown-timeout nan"]),
    ('boot = "disk"\n', ["--boot needs --firmware"]),
    ("cpus = \n", ["not TOML", "line 1"]),
    ("[section]\ncpus = 2\n", ["unknown key 'section'"]),
])
def test_a_bad_file_is_one_line_naming_the_file_and_the_key(tmp_path, capsys, text, words):
    path = tmp_path / "vm.toml"
    path.write_text(text)
    one_line_error(capsys, ["run", "--config", str(path)], str(path), *words)
    one_line_error(capsys, ["run", "--config", str(path), "--print-config"], str(path), *words)


def test_a_missing_file(tmp_path, capsys):
    one_line_error(capsys, ["run", "--config", str(tmp_path / "none.toml")], "--config", "No such file")


def test_a_bad_flag_over_a_good_file_is_the_flags_error(tmp_path, capsys):
    path = tmp_path / "vm.toml"
    path.write_text("cpus = 2\n")
    assert cli.main(["run", "--config", str(path), "--mem", "1M"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyvmm: error: --mem") and str(path) not in err  # the flag's, as without a file


def test_a_flag_fixes_what_the_file_alone_gets_wrong(tmp_path):
    """Checks run on the merged options: the file's --boot is fine once the flag adds --firmware."""
    path = tmp_path / "vm.toml"
    path.write_text('boot = "disk"\ndisk = ["/tmp/a.img"]\n')
    _, c = options_and_config("--config", str(path), "--firmware")
    assert c.firmware == "" and c.boot_order is not None


def test_a_host_check_about_a_key_from_the_file_names_the_file(tmp_path, capsys):
    path = tmp_path / "vm.toml"
    path.write_text(f'kernel = "{tmp_path / "no-such-kernel"}"\n')
    one_line_error(capsys, ["run", "--config", str(path)], f"{path}: ", "no-such-kernel")
    one_line_error(capsys, ["run", "--config", str(path), "--kernel", str(tmp_path / "other")], "other")
    assert str(path) not in capsys.readouterr().err
