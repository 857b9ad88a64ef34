"""Bad input from the user: one clear line on stderr, exit status 2, never a traceback."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pyvmm(*args, env=None):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "vmm.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=e, stdin=subprocess.DEVNULL)


def one_line_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("pyvmm: error: "), r.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture
def not_a_kernel(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello\n" * 1000)
    return str(p)


def test_missing_kernel():
    one_line_error(pyvmm("run", "--kernel", "/nonexistent/bzImage"), "does not exist")


def test_kernel_is_a_directory(tmp_path):
    one_line_error(pyvmm("run", "--kernel", str(tmp_path)), "not a file")


def test_not_a_bzimage_or_elf(not_a_kernel):
    one_line_error(pyvmm("run", "--kernel", not_a_kernel), "neither a bzImage nor an ELF")


def test_old_boot_protocol(tmp_path):
    img = bytearray(8192)
    img[0x1F1] = 4  # setup_sects
    img[0x1FE:0x200] = b"\x55\xaa"
    img[0x200:0x202] = b"\xeb\x26"  # jmp over the header, as real setup code starts
    img[0x202:0x206] = b"HdrS"
    img[0x206:0x208] = (0x0204).to_bytes(2, "little")
    p = tmp_path / "old"
    p.write_bytes(img)
    one_line_error(pyvmm("run", "--kernel", str(p)), "older than 2.06")


@pytest.mark.parametrize("mem", ["0", "1M", "abc"])
def test_bad_mem(not_a_kernel, mem):
    one_line_error(pyvmm("run", "--kernel", not_a_kernel, "--mem", mem), "mem")


@pytest.mark.parametrize("cpus", ["0", "100000"])
def test_bad_cpus(not_a_kernel, cpus):
    one_line_error(pyvmm("run", "--kernel", not_a_kernel, "--cpus", cpus), "--cpus")


def test_no_kvm_device(not_a_kernel):
    one_line_error(pyvmm("run", "--kernel", not_a_kernel, env={"PYVMM_KVM": "/nonexistent/kvm"}), "no KVM")


def test_unreadable_initrd(not_a_kernel, tmp_path):
    one_line_error(pyvmm("run", "--kernel", not_a_kernel, "--initrd", str(tmp_path / "nope")), "initrd")


def test_bad_cpuid_mask(not_a_kernel):
    one_line_error(pyvmm("run", "--kernel", not_a_kernel, "--cpuid-mask", "cx16,bogus"), "bogus")


def test_missing_kit(tmp_path):
    one_line_error(pyvmm("run", env={"PYVMM_KIT_DIR": str(tmp_path / "none")}), "guest kit")


def test_unknown_option():
    one_line_error(pyvmm("run", "--frobnicate"), "frobnicate")


def test_check_reports_the_host():
    r = pyvmm("check")
    assert r.returncode == 0, r.stderr
    assert "KVM API version:   12" in r.stdout
    assert "KVM_CAP_IRQFD" in r.stdout and "KVM_CAP_IOEVENTFD" in r.stdout
    assert "guest kernel mode:" in r.stdout
    assert ("native" in r.stdout) or ("EMULATED" in r.stdout)


def test_net_spec_errors(tmp_path):
    one_line_error(pyvmm("run", "--program", "/bin/true", "--net", "tap=x,colour=blue"), "colour")
    one_line_error(pyvmm("run", "--program", "/bin/true", "--net", "tap=x,mac=zz:00"), "mac")


def test_a_tap_that_cannot_be_used_exits_2(tiny):
    import time

    from tests.support.netns import namespace

    with namespace() as ns:
        def in_ns(*args, **kw):
            return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "vmm.cli", *args], cwd=ROOT,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, **kw)

        first = in_ns("run", "--program", tiny("spin"), "--console", "none", "--net", "tap=tap0")
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:  # until the first VM holds tap0
                if subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "show", "tap0"],
                                  capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)
            second = in_ns("run", "--program", tiny("spin"), "--console", "none", "--net", "tap=tap0")
            out, err = second.communicate(timeout=60)
            r = subprocess.CompletedProcess(second.args, second.returncode, out, err)
            one_line_error(r, "tap0")
        finally:
            first.terminate()
            first.communicate(timeout=60)
        assert first.returncode == 0


@pytest.mark.parametrize("args, words", [
    (["--console", "file:/proc/no-such-file"], ["--console", "/proc/no-such-file"]),  # passes the checks, open fails
    (["--console", "none", "--disk", "/dev/null"], ["/dev/null", "not a regular file or a block device"]),
])
def test_bad_files_found_when_the_machine_is_built_exit_2(args, words):
    one_line_error(pyvmm("run", "--program", "/bin/true", *args), *words)


def test_a_stop_signal_that_interrupts_a_restarts_vm_ends_it_quietly(tiny):
    """--on-reboot restart makes a new VM after each reset; SIGTERM landing while one is being made can
    interrupt its KVM_CREATE_VM (EINTR: seen in the nested KVM).  That is the stop asked for: exit 0, no
    traceback.  (Here the second VM's making gets the signal and then the EINTR, both for real.)"""
    import textwrap

    script = textwrap.dedent(f"""
        import errno, os, signal, sys
        from vmm import cli, machine
        from vmm.kvm.ioctl import IoctlError
        real, made = machine.Machine, []
        def making(*args, **kwargs):
            made.append(1)
            if len(made) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
                raise IoctlError("KVM_CREATE_VM", errno.EINTR)
            return real(*args, **kwargs)
        machine.Machine = making
        sys.exit(cli.main(["run", "--program", {tiny("reboot")!r}, "--on-reboot", "restart", "--seccomp", "off"]))
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=ROOT), stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "booting it again" in r.stderr, r.stderr
