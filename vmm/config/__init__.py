"""The VM's configuration: every option's syntax and checks, in one place, producing plain data.

    config = from_args(args)               # pyvmm run's argparse namespace (vmm/cli.py), --config's file under it
    config = VmConfig.from_dict({"mem": "1G", "disk": ["a.img,readonly=on"]})  # a config file, an API
    Machine(check_host(config))

options.py: KEY=VALUE lists, on/off, counts, sizes, ConfigError; disk.py, net.py, boot.py: --disk,
--net, --boot; vsock.py: --vsock; vm.py: VmConfig and from_dict; host.py: the files a config names;
console.py: --console-device, --port; flags.py: every option's flag and help, once; file.py: the
TOML config file (--config, --print-config)."""

from __future__ import annotations

import contextlib
import re

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
    OPTIONS; those it lacks, or that are None, take their defaults; `config`: a TOML file under them)."""
    options, config = checked_options(args)
    with _naming_the_file(args, options):
        return check_host(config)


def checked_options(args) -> tuple[dict, VmConfig]:
    """The options given (the --config file's, the flags given over them: a repeatable flag replaces
    the file's array) and the VmConfig they make, not yet checked against the host's files.  An
    error about a key the file gave names the file first."""
    from .file import load

    path = getattr(args, "config", None)
    options = {**(load(path) if path else {}), **_flags(args)}
    with _naming_the_file(args, options):
        return options, from_dict(options)


def _flags(args) -> dict:
    return {k: v for k, v in vars(args).items() if k in OPTIONS and v is not None}


@contextlib.contextmanager
def _naming_the_file(args, options: dict):
    """A ConfigError about an option (its message starts with the option's flag, or its name) that
    the config file gave, not a flag, gets the file's name in front."""
    try:
        yield
    except ConfigError as e:
        option = re.match(r"(?:--)?([a-z][a-z-]*)", str(e))
        key = option.group(1).replace("-", "_") if option else None
        if key in options and key not in _flags(args):
            raise ConfigError(f"{args.config}: {e}") from None
        raise
