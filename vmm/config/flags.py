"""Every option of `pyvmm run`, once: its flag, its help, and the shape its value takes on the
command line and in a config file (vmm/config/file.py).

The keys are OPTIONS (vmm/config/vm.py), in that order: the flag is `--` and the key with '-' for
'_', and the config file's key is the flag without its dashes (`cpuid-mask`).  `add_run_options`
puts them on an argparse parser; a key missing here, or one here that OPTIONS lacks, fails at import.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import kit
from .console import CONSOLE_DEVICES
from .vm import CONSOLE_SYNTAX, DEFAULT_CMDLINE, ENTRIES, ON_REBOOT, OPTIONS

# What a value is (argparse's handling; in a config file, the TOML types it takes):
TEXT = "text"          # one string
INT = "int"            # one integer (type=int)
CHOICE = "choice"      # one of `choices`
LIST = "list"          # repeatable (action="append"); in a file an array
OPTIONAL = "optional"  # the flag alone or with a value (nargs="?", const=""); in a file true or a string
SECONDS = "seconds"    # a number of seconds; in a file an integer or a float


@dataclass(frozen=True)
class Flag:
    key: str
    kind: str
    help: str
    metavar: str | None = None
    choices: tuple[str, ...] = ()
    table: bool = False  # the config file may also give the value as a table of its keys (a disk's path, ...)

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def file_key(self) -> str:
        return self.key.replace("_", "-")


_FLAGS = (
    Flag("kernel", TEXT, f"bzImage or vmlinux ELF (default: {kit.kit_kernel()})"),
    Flag("initrd", TEXT, f"initial ramdisk (default with the kit kernel: {kit.kit_initrd()})"),
    Flag("cmdline", TEXT, f"kernel command line (default: {DEFAULT_CMDLINE})"),
    Flag("append", TEXT, "added to the end of --cmdline"),
    Flag("mem", TEXT, "guest RAM, e.g. 512M, 4G (default: 512M)"),
    Flag("cpus", INT, "number of vCPUs (default: 1)"),
    Flag("console", TEXT, f"{CONSOLE_SYNTAX} (default: stdio)"),
    Flag("entry", CHOICE, (
        "vmlinux: decompress the bzImage on the host and enter the kernel's 64-bit entry directly (default, "
        "faster); bzimage: enter the bzImage's own 64-bit entry and let it decompress itself"), choices=ENTRIES),
    Flag("cpuid_mask", TEXT, (
        "comma-separated CPU features hidden from the guest (e.g. cx16,xsave), 'none', or 'auto' (default): "
        "hide what the host's KVM cannot run when it emulates guest kernel mode"), metavar="FEATURES"),
    Flag("on_reboot", CHOICE, "when the guest reboots: end pyvmm with status 0 (default) or start it again",
         choices=ON_REBOOT),
    Flag("disk", LIST, (
        "a virtio-blk disk: PATH[,readonly=on][,serial=ID][,cache=writeback|none][,queues=N] (repeatable; "
        "a raw image file or block device, locked so no other VM can write it; queues default to one per vCPU)"),
         metavar="SPEC", table=True),
    Flag("net", LIST, (
        "a virtio-net NIC on a host tap device: tap=NAME[,mac=MAC][,queues=N][,mtu=N][,rom=PATH|off] (repeatable; "
        "the tap is created if it does not exist, which needs CAP_NET_ADMIN; the default MAC is derived from "
        "--name and the tap name; queue pairs default to one per vCPU; rom: the NIC's PCI expansion ROM, by "
        "default with --firmware iPXE's /usr/lib/ipxe/qemu/pxe-virtio.rom when installed)"), metavar="SPEC",
         table=True),
    Flag("name", TEXT, "the VM's name (default MAC addresses and the API socket's name derive from it)"),
    Flag("program", TEXT, (
        "run a freestanding x86-64 ELF in guest user mode instead of Linux (the driver guest used by tests "
        "and benchmarks); it starts with RDI = vCPU index, RSI = vCPU count, IOPL 3, interrupts off"), metavar="ELF"),
    Flag("firmware", OPTIONAL, (
        "boot a PC BIOS image from the reset vector instead of a kernel: it boots the --disk images (or a NIC's "
        "option ROM); PATH defaults to Debian's SeaBIOS, /usr/share/seabios/bios-256k.bin (package seabios)"),
         metavar="PATH"),
    Flag("boot", TEXT, (
        "with --firmware: the boot order, a comma-separated list of disk, net, diskN, netN (N counts the "
        "--disk or --net options from 0; disk or net alone: all of them in order); default: disk,net"),
         metavar="ORDER"),
    Flag("firmware_log", TEXT, (
        "with --firmware: append the firmware's debug output (SeaBIOS's port 0x402) to PATH; "
        "with -v and no PATH it goes to stderr"), metavar="PATH"),
    Flag("stats", OPTIONAL, (
        "profile the vCPUs' exits: at the end of each boot (one table per boot with --on-reboot restart), on "
        "stderr, per vCPU: kind, where (device, port or address), count, time in pyvmm, and the time in KVM_RUN; "
        "with =PATH also write them as JSON to PATH, with the wall times of the process's start and of each "
        "vCPU's first KVM_RUN"), metavar="PATH"),
    Flag("seccomp", TEXT, (
        "the syscall filter installed once the VM is set up, which denies what a running VMM never needs "
        "(execve, fork, ptrace, mount, kexec, module loading, bpf, network sockets...; vmm/seccomp/policy.py): "
        "kill (default: a denied call ends pyvmm with SIGSYS), errno (it fails with EPERM), log (it is allowed "
        "and the kernel logs it), off (no filter)"), metavar="MODE"),
    Flag("console_device", CHOICE, (
        "the guest's console: the serial port ttyS0 (default), or virtio: hvc0, port 0 of a virtio-console "
        "device (the default command line then says console=ttyS0 console=hvc0); --console says where it goes"),
         choices=CONSOLE_DEVICES),
    Flag("port", LIST, (
        "a named virtio-console port: name=NAME,socket=PATH (pyvmm listens on the Unix socket PATH, one client "
        "at a time) or name=NAME,file=PATH (the guest's output appended); the guest sees "
        "/dev/virtio-ports/NAME (repeatable)"), metavar="SPEC", table=True),
    Flag("rng", OPTIONAL, (
        "a virtio-rng device giving the guest entropy from the host's getrandom: [rate=BYTES/S] limits it "
        "to that many bytes a second on average (e.g. rate=64K)"), metavar="SPEC", table=True),
    Flag("balloon", OPTIONAL, (
        "a virtio-balloon device: [size=SIZE][,stats=SECONDS][,free-page-reporting=on][,deflate-on-oom=on]; "
        "size: RAM the guest gives back at boot (0 by default; Machine.set_balloon_target changes it); stats: "
        "ask for the guest's memory statistics every SECONDS; free-page-reporting: the guest's free memory "
        "goes back to the host; deflate-on-oom: the guest may take ballooned memory back rather than run out"),
         metavar="SPEC", table=True),
    Flag("vsock", TEXT, (
        "a virtio-vsock device: cid=N,socket=PATH (N >= 3: the guest's CID); host programs reach a guest "
        "listener on port P by connecting to the Unix socket PATH and sending 'CONNECT P\\n' (answered "
        "'OK <host port>\\n'), and the guest reaches a host program listening on PATH_P by connecting to "
        "CID 2, port P (Firecracker's hybrid vsock)"), metavar="SPEC", table=True),
    Flag("shutdown_timeout", SECONDS, (
        "on SIGTERM, press the guest's ACPI power button and give it SECONDS to power off before stopping "
        "it hard (a second SIGTERM stops at once); 0 (default): stop at once"), metavar="SECONDS"),
    Flag("api_socket", TEXT, (
        "the management API's Unix socket (HTTP/1.1 and JSON: curl --unix-socket PATH http://vm/vm): PATH, or off; "
        "default: NAME.sock after --name (pyvmm-PID.sock without one) in the user's runtime directory, "
        "$XDG_RUNTIME_DIR/pyvmm, where `pyvmm ls` finds it"), metavar="PATH"),
)

FLAGS: dict[str, Flag] = {f.key: f for f in _FLAGS}
if tuple(FLAGS) != OPTIONS:  # one list of options: VmConfig's keys, the flags and the file's keys
    raise ImportError(f"vmm/config/flags.py and OPTIONS differ: {sorted(set(FLAGS) ^ set(OPTIONS))}")


def add_run_options(parser) -> None:
    """Every option of `pyvmm run` on an argparse parser; each defaults to None (not given)."""
    for f in _FLAGS:
        kw: dict = {"help": f.help}
        if f.metavar:
            kw["metavar"] = f.metavar
        if f.kind == INT:
            kw["type"] = int
        elif f.kind == CHOICE:
            kw["choices"] = f.choices
        elif f.kind == LIST:
            kw["action"] = "append"
        elif f.kind == OPTIONAL:
            kw.update(nargs="?", const="")
        parser.add_argument(f.flag, **kw)
