"""VmConfig: the whole VM as plain data, and `from_dict`, which checks a dict of options into one.

The dict's keys are the long options of `pyvmm run` with '_' for '-' (mem, cpus, disk, net, ...);
values are what the command line takes (text) or already typed (ints, bools, lists, and for a
disk or NIC a dict of its keys).  Files are not looked at here: vmm/config/host.py does that."""

from __future__ import annotations

from dataclasses import dataclass

from .api import parse_api_socket
from .console import PortSpec, check_ports, default_cmdline, parse_console_device, parse_port_spec, port_from_dict
from .boot import DEFAULT_BOOT_ORDER, BootItem, boot_slots, parse_boot_order
from .disk import DiskSpec, disk_from_dict, parse_disk_spec
from .net import NetSpec, net_from_dict, parse_net_spec
from .balloon import BalloonSpec, balloon_from_dict, check_balloon_size, parse_balloon_spec
from .rng import RngSpec, parse_rng_spec, rng_from_dict
from .options import MiB, ConfigError, parse_size
from .vsock import VsockSpec, parse_vsock_spec, vsock_from_dict
from ..seccomp import MODES as SECCOMP_MODES

PAGE_SIZE = 4096
MIN_MEM = 16 * MiB
DEFAULT_MEM = 512 * MiB
DEFAULT_CMDLINE = "console=ttyS0"
CONSOLE_SYNTAX = "stdio, file:PATH or none"
ENTRIES = ("vmlinux", "bzimage")  # vmlinux: decompress on the host; bzimage: the kernel's own entry
ON_REBOOT = ("exit", "restart")
OPTIONS = ("kernel", "initrd", "cmdline", "append", "mem", "cpus", "console", "entry", "cpuid_mask", "on_reboot",
           "disk", "net", "name", "program", "firmware", "boot", "firmware_log", "stats", "seccomp",
           "console_device", "port", "rng", "balloon", "vsock", "shutdown_timeout", "api_socket")


@dataclass(frozen=True)
class VmConfig:
    """One VM as the options describe it, validated (vmm/config: the one place options are parsed)."""

    mem_size: int = DEFAULT_MEM
    cpus: int = 1
    kernel: str | None = None          # bzImage or vmlinux ELF (Linux boot)
    initrd: str | None = None
    cmdline: str = DEFAULT_CMDLINE
    entry: str = "vmlinux"             # one of ENTRIES
    program: str | None = None         # a freestanding ELF run in guest user mode instead of Linux
    console: str = "stdio"             # "stdio", "file:PATH", "none"
    cpuid_mask: tuple[str, ...] | None = None  # None: automatic (what the host's KVM cannot run)
    on_reboot: str = "exit"            # one of ON_REBOOT
    kernel_mode_native: bool | None = None  # None: measure
    disks: tuple[DiskSpec, ...] = ()   # one virtio-blk-pci device each
    nets: tuple[NetSpec, ...] = ()     # one virtio-net-pci device each
    name: str = "pyvmm"                # the VM's name: default MAC addresses derive from it
    firmware: str | None = None        # a BIOS image to boot instead of a kernel ("": the default one)
    boot_order: tuple[BootItem, ...] | None = None  # firmware boot order; None: disks, then NICs
    firmware_log: str | None = None    # where the firmware's debug port (0x402) output goes
    stats: bool = False                # profile the vCPUs' exits (vmm/exit_stats.py), a table on stderr
    stats_json: str | None = None      # and the same as JSON in this file
    seccomp: str = SECCOMP_MODES[0]    # the syscall filter `pyvmm run` installs once set up (vmm/seccomp)
    console_device: str = "serial"     # where the guest's console is: the serial port or virtio-console's hvc0
    ports: tuple[PortSpec, ...] = ()   # virtio-console's named ports
    rng: RngSpec | None = None         # a virtio-rng device
    balloon: BalloonSpec | None = None  # a virtio-balloon device
    vsock: VsockSpec | None = None     # a virtio-vsock-pci device (vmm/config/vsock.py)
    shutdown_timeout: float = 0.0      # SIGTERM: seconds the guest has to power off once asked (0: stop at once)
    api_socket: str | None = None      # the management API's socket: a path, "off", None: the default (config/api.py)

    def __post_init__(self):
        object.__setattr__(self, "disks", tuple(self.disks))
        object.__setattr__(self, "nets", tuple(self.nets))
        object.__setattr__(self, "ports", tuple(self.ports))

    @classmethod
    def from_dict(cls, options: dict) -> "VmConfig":
        return from_dict(options)


def from_dict(d: dict) -> VmConfig:
    """The VmConfig a dict of options describes (an option set to None counts as not given);
    ConfigError says what is wrong with it."""
    d = {k: v for k, v in d.items() if v is not None}
    unknown = sorted(set(d) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]!r} (known: {', '.join(OPTIONS)})")
    common = dict(mem_size=_mem(d.get("mem", DEFAULT_MEM)), cpus=_cpus(d.get("cpus", 1)),
                  console=_console(d.get("console", "stdio")), cpuid_mask=_cpuid_mask(d.get("cpuid_mask", "auto")),
                  on_reboot=_choice(d, "on_reboot", ON_REBOOT), name=str(d.get("name", "pyvmm")),
                  seccomp=_choice(d, "seccomp", SECCOMP_MODES),
                  **_stats(d.get("stats", False)),
                  disks=tuple(_each(d, "disk", parse_disk_spec, disk_from_dict)),
                  nets=tuple(_each(d, "net", parse_net_spec, net_from_dict)),
                  console_device=parse_console_device(d.get("console_device", "serial")),
                  ports=check_ports(_each(d, "port", parse_port_spec, port_from_dict)),
                  vsock=_vsock(d.get("vsock")), shutdown_timeout=_seconds(d, "shutdown_timeout"),
                  api_socket=parse_api_socket(d.get("api_socket")))
    common.update(rng=_one(d, "rng", parse_rng_spec, rng_from_dict, RngSpec),
                  balloon=_one(d, "balloon", parse_balloon_spec, balloon_from_dict, BalloonSpec))
    check_balloon_size(common["balloon"], common["mem_size"])
    if "firmware" in d:
        return _firmware_config(d, common)
    for option in ("boot", "firmware_log"):
        if option in d:
            raise ConfigError(f"--{option.replace('_', '-')} needs --firmware")
    if d.get("program"):
        return VmConfig(program=str(d["program"]), **common)
    cmdline = f"{d.get('cmdline', default_cmdline(common['console_device']))} {d.get('append', '')}".strip()
    return VmConfig(kernel=d.get("kernel"), initrd=d.get("initrd"), cmdline=cmdline,
                    entry=_choice(d, "entry", ENTRIES), **common)


def _firmware_config(d: dict, common: dict) -> VmConfig:
    for option in ("kernel", "initrd", "program"):
        if option in d:
            raise ConfigError(f"--firmware boots from disk or network: it cannot be used with --{option}")
    order = parse_boot_order(d["boot"]) if "boot" in d else None
    boot_slots(order or DEFAULT_BOOT_ORDER, list(range(len(common["disks"]))), list(range(len(common["nets"]))))
    return VmConfig(firmware=str(d["firmware"]), boot_order=order, firmware_log=d.get("firmware_log"), **common)


def _vsock(value) -> VsockSpec | None:
    """--vsock: its text, a dict of its keys, or a VsockSpec (None: no vsock device)."""
    if value is None or isinstance(value, VsockSpec):
        return value
    try:
        return parse_vsock_spec(value) if isinstance(value, str) else vsock_from_dict(value)
    except ConfigError as e:
        raise ConfigError(f"--vsock: {e}") from None


def _seconds(d: dict, option: str) -> float:
    """A duration in seconds, 0 or more: a number, or its decimal text (default 0)."""
    value = d.get(option, 0)
    try:
        seconds = float(value) if not isinstance(value, bool) else -1.0
    except (TypeError, ValueError):
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise ConfigError(f"--{option.replace('_', '-')} {value!r}: give a number of seconds, 0 or more")
    return seconds


def _mem(value) -> int:
    try:
        size = parse_size(value)
    except ConfigError as e:
        raise ConfigError(f"--mem: {e}") from None
    if size < MIN_MEM:
        raise ConfigError(f"--mem {size} bytes is too small: at least {MIN_MEM // MiB}M")
    if size % PAGE_SIZE:
        raise ConfigError("--mem must be a multiple of 4 KiB")
    return size


def _cpus(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"--cpus {value}: at least 1 vCPU")
    return value


def _console(console: str) -> str:
    if not (console in ("stdio", "none") or console.startswith("file:") and len(console) > 5):
        raise ConfigError(f"--console {console!r}: use {CONSOLE_SYNTAX}")
    return console


def _stats(value) -> dict:
    """--stats: True or "" for the table alone, a PATH for the JSON too, False for neither."""
    if isinstance(value, bool):
        return dict(stats=value)
    if not isinstance(value, str):
        raise ConfigError(f"--stats {value!r}: give nothing, or a PATH for the JSON")
    return dict(stats=True, stats_json=value or None)


def _cpuid_mask(value) -> tuple[str, ...] | None:
    """'auto' (None: decided by the machine), 'none' (nothing hidden), or features to hide."""
    from kernel.cpuid import parse_mask

    if value == "auto" or value is None:
        return None
    if value == "none":
        return ()
    try:
        return parse_mask(value if isinstance(value, str) else ",".join(value))
    except ValueError as e:
        raise ConfigError(f"--cpuid-mask: {e}") from None


def _choice(d: dict, option: str, choices: tuple[str, ...]) -> str:
    value = d.get(option, choices[0])
    if value not in choices:
        raise ConfigError(f"--{option.replace('_', '-')} {value!r}: use {' or '.join(choices)}")
    return value


def _each(d: dict, option: str, from_text, from_dict_form) -> list:
    """Each --disk / --net / --port entry: command-line text, a dict of its keys, or a DiskSpec / NetSpec."""
    out = []
    for entry in d.get(option) or ():
        try:
            if isinstance(entry, (DiskSpec, NetSpec, PortSpec)):
                out.append(entry)
            else:
                out.append(from_text(entry) if isinstance(entry, str) else from_dict_form(entry))
        except ConfigError as e:
            raise ConfigError(f"--{option}: {e}") from None
    return out


def _one(d: dict, option: str, from_text, from_dict_form, spec_type):
    """A single-device option (--rng, --balloon): absent (None), True or "" (its defaults), its text,
    a dict of its keys, or its spec."""
    entry = d.get(option)
    if entry is None or entry is False or isinstance(entry, spec_type):
        return entry or None
    try:
        if entry is True:
            return spec_type()
        return from_text(entry) if isinstance(entry, str) else from_dict_form(entry)
    except ConfigError as e:
        raise ConfigError(f"--{option}: {e}") from None
