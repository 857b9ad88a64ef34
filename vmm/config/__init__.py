"""The VM's configuration: every option's syntax and checks, in one place, producing plain data.

    config = from_args(args)               # pyvmm run's argparse namespace (vmm/cli.py)
    config = VmConfig.from_dict({"mem": "1G", "disk": ["a.img,readonly=on"]})  # a config file, an API
    Machine(check_host(config))

options.py: KEY=VALUE lists, on/off, counts, sizes, ConfigError; disk.py, net.py, boot.py: --disk,
--net, --boot; vsock.py: --vsock; vm.py: VmConfig and from_dict; host.py: the files a config names;
console.py: --console-device, --port."""

from __future__ import annotations

from .boot import DEFAULT_BOOT_ORDER, BootItem, boot_slots, parse_boot_order
from .console import PortSpec, parse_port_spec
from .disk import DiskSpec, parse_disk_spec
from .host import check_cpus, check_host
from .net import NetSpec, default_mac, format_mac, parse_mac, parse_net_spec
from .options import ConfigError, parse_size
from .vm import OPTIONS, VmConfig, from_dict
from .balloon import BalloonSpec, parse_balloon_spec
from .rng import RngSpec, parse_rng_spec
from .vsock import VsockSpec, parse_vsock_spec

__all__ = ["DEFAULT_BOOT_ORDER", "OPTIONS", "BalloonSpec", "BootItem", "ConfigError", "DiskSpec", "NetSpec",
           "PortSpec", "RngSpec", "VmConfig", "VsockSpec", "boot_slots", "check_cpus", "check_host", "default_mac",
           "format_mac", "from_args", "from_dict", "parse_balloon_spec", "parse_boot_order", "parse_disk_spec",
           "parse_mac", "parse_net_spec", "parse_port_spec", "parse_rng_spec", "parse_size", "parse_vsock_spec"]


def from_args(args) -> VmConfig:
    """The checked VmConfig of `pyvmm run`'s options (an argparse namespace: attributes named as
    OPTIONS; those it lacks, or that are None, take their defaults)."""
    options = {k: v for k, v in vars(args).items() if k in OPTIONS}
    return check_host(from_dict(options))
