"""pyvmm's command line.  The only place that prints user errors and picks exit codes:
0 the guest powered off (or was stopped on request), 1 the guest or pyvmm failed,
2 bad input from the user (one line on stderr, never a traceback)."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import signal
import sys
import time

from . import config, kit
from .config.console import CONSOLE_DEVICES
from .config.vm import CONSOLE_SYNTAX, DEFAULT_CMDLINE, ENTRIES, ON_REBOOT

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line, status 2
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="pyvmm", description="A KVM virtual machine monitor with paravirtual virtio devices.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging on stderr (-vv for debug)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="boot a guest", description=(
        "Boot a Linux kernel (bzImage or vmlinux) with an initrd, a freestanding program in guest user mode, "
        "or (--firmware) a PC BIOS that boots the --disk images or a NIC's option ROM. "
        "With no --kernel, boots the default guest kit (scripts/guestkit.py build). "
        "On the serial console, Ctrl-A x quits."))
    run.add_argument("--kernel", help=f"bzImage or vmlinux ELF (default: {kit.kit_kernel()})")
    run.add_argument("--initrd", help=f"initial ramdisk (default with the kit kernel: {kit.kit_initrd()})")
    run.add_argument("--cmdline", help=f"kernel command line (default: {DEFAULT_CMDLINE})")
    run.add_argument("--append", help="added to the end of --cmdline")
    run.add_argument("--mem", help="guest RAM, e.g. 512M, 4G (default: 512M)")
    run.add_argument("--cpus", type=int, help="number of vCPUs (default: 1)")
    run.add_argument("--console", help=f"{CONSOLE_SYNTAX} (default: stdio)")
    run.add_argument("--console-device", choices=CONSOLE_DEVICES, help=(
        "the guest's console: the serial port ttyS0 (default), or virtio: hvc0, port 0 of a virtio-console "
        "device (the default command line then says console=ttyS0 console=hvc0); --console says where it goes"))
    run.add_argument("--port", action="append", metavar="SPEC", help=(
        "a named virtio-console port: name=NAME,socket=PATH (pyvmm listens on the Unix socket PATH, one client "
        "at a time) or name=NAME,file=PATH (the guest's output appended); the guest sees "
        "/dev/virtio-ports/NAME (repeatable)"))
    run.add_argument("--entry", choices=ENTRIES, help=(
        "vmlinux: decompress the bzImage on the host and enter the kernel's 64-bit entry directly (default, faster); "
        "bzimage: enter the bzImage's own 64-bit entry and let it decompress itself"))
    run.add_argument("--cpuid-mask", metavar="FEATURES", help=(
        "comma-separated CPU features hidden from the guest (e.g. cx16,xsave), 'none', or 'auto' (default): "
        "hide what the host's KVM cannot run when it emulates guest kernel mode"))
    run.add_argument("--on-reboot", choices=ON_REBOOT,
                     help="when the guest reboots: end pyvmm with status 0 (default) or start it again")
    run.add_argument("--disk", action="append", metavar="SPEC", help=(
        "a virtio-blk disk: PATH[,readonly=on][,serial=ID][,cache=writeback|none][,queues=N] (repeatable; "
        "a raw image file or block device, locked so no other VM can write it; queues default to one per vCPU)"))
    run.add_argument("--net", action="append", metavar="SPEC", help=(
        "a virtio-net NIC on a host tap device: tap=NAME[,mac=MAC][,queues=N][,mtu=N][,rom=PATH|off] (repeatable; the "
        "tap is created if it does not exist, which needs CAP_NET_ADMIN; the default MAC is derived from --name "
        "and the tap name; queue pairs default to one per vCPU; rom: the NIC's PCI expansion ROM, by default "
        "with --firmware iPXE's /usr/lib/ipxe/qemu/pxe-virtio.rom when installed)"))
    run.add_argument("--rng", nargs="?", const="", metavar="SPEC", help=(
        "a virtio-rng device giving the guest entropy from the host's getrandom: [rate=BYTES/S] limits it "
        "to that many bytes a second on average (e.g. rate=64K)"))
    run.add_argument("--balloon", nargs="?", const="", metavar="SPEC", help=(
        "a virtio-balloon device: [size=SIZE][,stats=SECONDS][,free-page-reporting=on][,deflate-on-oom=on]; "
        "size: RAM the guest gives back at boot (0 by default; the API's PUT /vm/balloon changes it); stats: "
        "ask for the guest's memory statistics every SECONDS; free-page-reporting: the guest's free memory "
        "goes back to the host; deflate-on-oom: the guest may take ballooned memory back rather than run out"))
    run.add_argument("--vsock", metavar="SPEC", help=(
        "a virtio-vsock device: cid=N,socket=PATH (N >= 3: the guest's CID); host programs reach a guest "
        "listener on port P by connecting to the Unix socket PATH and sending 'CONNECT P\\n' (answered "
        "'OK <host port>\\n'), and the guest reaches a host program listening on PATH_P by connecting to "
        "CID 2, port P (Firecracker's hybrid vsock)"))
    run.add_argument("--name", help="the VM's name (default MAC addresses and the API socket's name derive from it)")
    run.add_argument("--api-socket", metavar="PATH", help=(
        "the management API's Unix socket (HTTP/1.1 and JSON: curl --unix-socket PATH http://vm/vm): PATH, or off; "
        "default: NAME.sock after --name (pyvmm-PID.sock without one) in the user's runtime directory, "
        "$XDG_RUNTIME_DIR/pyvmm, where `pyvmm ls` finds it"))
    run.add_argument("--program", metavar="ELF", help=(
        "run a freestanding x86-64 ELF in guest user mode instead of Linux (the driver guest used by tests "
        "and benchmarks); it starts with RDI = vCPU index, RSI = vCPU count, IOPL 3, interrupts off"))

    run.add_argument("--stats", nargs="?", const="", metavar="PATH", help=(
        "profile the vCPUs' exits: at the end of each boot (one table per boot with --on-reboot restart), on "
        "stderr, per vCPU: kind, where (device, port or address), count, time in pyvmm, and the time in KVM_RUN; "
        "with =PATH also write them as JSON to PATH, with the wall times of the process's start and of each "
        "vCPU's first KVM_RUN"))

    run.add_argument("--seccomp", metavar="MODE", help=(
        "the syscall filter installed once the VM is set up, which denies what a running VMM never needs "
        "(execve, fork, ptrace, mount, kexec, module loading, bpf, network sockets...; vmm/seccomp/policy.py): "
        "kill (default: a denied call ends pyvmm with SIGSYS), errno (it fails with EPERM), log (it is allowed "
        "and the kernel logs it), off (no filter)"))

    run.add_argument("--firmware", nargs="?", const="", metavar="PATH", help=(
        "boot a PC BIOS image from the reset vector instead of a kernel: it boots the --disk images (or a NIC's "
        "option ROM); PATH defaults to Debian's SeaBIOS, /usr/share/seabios/bios-256k.bin (package seabios)"))
    run.add_argument("--boot", metavar="ORDER", help=(
        "with --firmware: the boot order, a comma-separated list of disk, net, diskN, netN (N counts the "
        "--disk or --net options from 0; disk or net alone: all of them in order); default: disk,net"))
    run.add_argument("--firmware-log", metavar="PATH", help=(
        "with --firmware: append the firmware's debug output (SeaBIOS's port 0x402) to PATH; "
        "with -v and no PATH it goes to stderr"))

    sub.add_parser("check", help="what this host's KVM supports, and whether guest kernel mode is native")

    ls = sub.add_parser("ls", help="the running VMs of this user: name, pid, state, vCPUs, memory, uptime")
    ls.add_argument("--json", action="store_true", help="as JSON")
    for verb, what in (("info", "a VM's state, uptime, configuration, vCPUs and devices"),
                       ("pause", "stop a VM's vCPUs (and its clock) until resume"),
                       ("resume", "let a paused VM run again"),
                       ("stop", "ask the guest to power off (the ACPI power button)"),
                       ("kill", "stop a VM now, whatever the guest is doing"),
                       ("counters", "per virtio device requests, bytes, errors, notifications, interrupts; "
                                    "per vCPU exits by kind")):
        verb_parser = sub.add_parser(verb, help=what)
        verb_parser.add_argument("name", metavar="NAME", help="the VM's --name (as `pyvmm ls` shows), or its API socket's path")
        verb_parser.add_argument("--json", action="store_true", help="the API's answer as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    main_start_wall = time.time()  # for --stats=PATH
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)],
                            format="pyvmm: %(message)s")
        if args.command == "check":
            return cmd_check()
        if args.command == "run":
            return cmd_run(args, main_start_wall)
        if args.command in ("ls", "info", "pause", "resume", "stop", "kill", "counters"):
            return cmd_verb(args)
        build_parser().print_help()
        return EXIT_USAGE
    except (UsageError, config.ConfigError) as e:
        print(f"pyvmm: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_FAILURE


def cmd_verb(args) -> int:
    """`pyvmm ls` and the verbs on one VM, through its API socket."""
    from .api import verbs

    try:
        if args.command == "ls":
            print(verbs.ls(args.json))
        else:
            print(verbs.vm_verb(args.command, args.name, args.json))
    except verbs.VerbError as e:
        print(f"pyvmm: error: {e}", file=sys.stderr)
        return e.code
    return EXIT_OK


def open_kvm():
    from .kvm import Kvm

    path = os.environ.get("PYVMM_KVM", "/dev/kvm")
    try:
        return Kvm(path)
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist: this host has no KVM (load kvm-intel or kvm-amd)") from None
    except PermissionError:
        raise UsageError(f"no permission to open {path} (add yourself to the kvm group or run as root)") from None


def cmd_check() -> int:
    from .hostcheck import report

    kvm = open_kvm()
    print(report(kvm))
    return EXIT_OK


def cmd_run(args, main_start_wall: float | None = None) -> int:
    from .hostcheck import kernel_mode_native

    cfg = config.from_args(args)
    kvm = open_kvm()
    config.check_cpus(cfg, kvm.max_vcpus())
    if not cfg.program:
        cfg = dataclasses.replace(cfg, kernel_mode_native=kernel_mode_native(kvm))
    current: list = [None]  # the Machine of this boot, for the API (None between boots)
    api = start_api(cfg, lambda: current[0])
    try:
        return run_boots(args, cfg, kvm, current, main_start_wall)
    finally:
        if api is not None:
            api.close()


def start_api(cfg, current):
    """The management API's server (vmm/api) on its socket, or None with --api-socket off."""
    from .api.routes import Routes
    from .api.server import ApiServer, ApiSocketBusy
    from .config.api import DEFAULT_NAME, api_socket_path

    try:
        path = api_socket_path(cfg.api_socket, cfg.name, os.getpid())
    except config.ConfigError as e:
        if cfg.api_socket is not None:
            raise
        # the default place cannot serve (an unusable runtime directory, a --name no file can
        # have): the VM runs all the same, without its API
        print(f"pyvmm: note: running without the management API: {e}", file=sys.stderr)
        return None
    if path is None:
        return None
    name = cfg.name if cfg.name != DEFAULT_NAME else f"{DEFAULT_NAME}-{os.getpid()}"
    try:
        server = ApiServer(path, Routes(current, name=name, api_socket=path))
    except ApiSocketBusy as e:
        raise UsageError(f"--api-socket: {e}") from None
    except OSError as e:
        raise UsageError(f"--api-socket {path}: {e.strerror or e}") from None
    server.start()
    return server


def run_boots(args, cfg, kvm, current: list, main_start_wall: float | None) -> int:
    """Boot the VM (again after a reset with --on-reboot restart); its exit status."""
    from kernel.errors import KernelImageError
    from virtio.backends.port import PortError
    from virtio.backends.raw import ImageError
    from virtio.backends.tap import TapError
    from .firmware.image import FirmwareError
    from .console import stdin_fd
    from .hostcheck import EMULATED_WARNING
    from .machine import Machine

    first = True
    console_in = stdin_fd() if cfg.console == "stdio" else None
    stopped: list[int] = []  # a signal between two boots (--on-reboot restart) ends the loop
    profiles: list[list] = []  # --stats: each boot's exit profiles, one per vCPU
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: stopped.append(signum))
    while not stopped:
        try:
            machine = Machine(cfg, kvm=kvm, console_in=console_in)
        except (KernelImageError, ImageError, TapError, FirmwareError, PortError) as e:
            raise UsageError(str(e)) from None
        except OSError as e:
            # A stop signal while a VM is being made (between two boots, --on-reboot restart) can
            # interrupt one of its ioctls (KVM_CREATE_VM: EINTR): the stop asked for, not an error.
            if e.errno == errno.EINTR and stopped:
                break
            raise
        if first:
            if cfg.kernel_mode_native is False:
                print(f"pyvmm: note: this host's KVM emulates guest kernel mode: {EMULATED_WARNING}", file=sys.stderr)
            for note in machine.notes:
                print(f"pyvmm: note: {note}", file=sys.stderr)
            lock_down(cfg.seccomp)  # set-up done, the vCPUs not yet started; a restart's VM is made under it
            first = False
        current[0] = machine
        try:
            status = machine.run()
            message, reset = machine.lifecycle.message, machine.lifecycle.reset_requested
        finally:
            current[0] = None
            machine.close()
        if cfg.stats:
            profiles.append(machine.exit_stats)
            report_exit_stats(cfg, profiles, main_start_wall)
        if reset and (cfg.on_reboot == "restart" or machine.lifecycle.restart):
            why = "--on-reboot restart" if cfg.on_reboot == "restart" else "a reboot asked through the API"
            print(f"\npyvmm: guest reset; booting it again ({why})", file=sys.stderr)
            continue
        if message and (status != 0 or args.verbose or reset):  # a poweroff ends quietly
            print(f"\npyvmm: {message}", file=sys.stderr)
        return status
    return EXIT_OK


def lock_down(mode: str) -> None:
    """Install the --seccomp filter on the whole process, for the rest of its life; where the kernel
    cannot, or falls back, say so in one line on stderr and go on (a VMM that refused to start
    there would only push users to --seccomp off everywhere; with off, nothing is said)."""
    from . import seccomp

    try:
        note = seccomp.install(mode)
    except seccomp.SeccompUnavailable as e:
        note = f"running without a syscall filter: {e}"
    if note:
        print(f"pyvmm: note: {note}", file=sys.stderr)


def report_exit_stats(cfg, profiles: list[list], main_start_wall: float | None) -> None:
    """The last boot's exit profile on stderr; every boot's in the --stats=PATH file."""
    from . import exit_stats

    boot = f" of boot {len(profiles)}" if cfg.on_reboot == "restart" else ""
    tables = "\n".join(exit_stats.render_table(s) for s in profiles[-1])
    print(f"\npyvmm: exit profile{boot} (time in pyvmm: from KVM_RUN's return to the next KVM_RUN)\n{tables}",
          file=sys.stderr)
    if cfg.stats_json is not None:
        report = exit_stats.report_json(profiles, process_start_wall=exit_stats.process_start_wall(),
                                        main_start_wall=main_start_wall)
        try:
            exit_stats.write_report(cfg.stats_json, report)
        except OSError as e:
            raise UsageError(f"--stats: cannot write {cfg.stats_json}: {e.strerror}") from None


if __name__ == "__main__":
    sys.exit(main())
