"""What a VmConfig needs of the host's files, checked before anything is built: images and programs
that exist and can be read, directories for the files pyvmm writes, a firmware image and option
ROMs that load.  `check_host` returns the config with defaults that depend on the host filled in
(the guest kit's kernel, the firmware image's path)."""

from __future__ import annotations

import dataclasses
import os
import stat

from .. import kit
from .options import ConfigError
from .vm import VmConfig


def check_host(c: VmConfig) -> VmConfig:
    """ConfigError unless the files `c` names can be used; `c` with the host's defaults filled in."""
    if c.console.startswith("file:"):
        writable_file(c.console[len("file:"):], f"--console {c.console}:")
    if c.stats_json is not None:
        writable_file(c.stats_json, "--stats:")
    for disk in c.disks:
        if not os.path.exists(disk.path):
            raise ConfigError(f"--disk: {disk.path} does not exist")
        if os.path.isdir(disk.path):
            raise ConfigError(f"--disk: {disk.path} is a directory, not an image")
        readable(disk.path, "--disk:")
    for port in c.ports:
        if port.file is not None:
            writable_file(port.file, f"--port {port.name}:")
        elif os.path.exists(port.socket) and not stat.S_ISSOCK(os.lstat(port.socket).st_mode):
            raise ConfigError(f"--port {port.name}: {port.socket} exists and is not a socket")
        else:
            writable_file(port.socket, f"--port {port.name}:")
    for net in c.nets:
        if net.rom not in (None, "off"):
            _firmware_file(lambda image: image.load_rom(net.rom, "--net rom"))
    if c.vsock is not None:
        vsock_socket(c.vsock.socket)
    if c.firmware is not None:
        image = _firmware_file(lambda image: image.load_firmware(c.firmware or None))
        if c.firmware_log is not None:
            writable_file(c.firmware_log, "--firmware-log:")
        return dataclasses.replace(c, firmware=image.path)
    if c.program:
        readable_file(c.program, "program")
        return c
    kernel, initrd = c.kernel, c.initrd
    if kernel is None:
        kernel = str(kit.kit_kernel())
        if not os.path.exists(kernel):
            raise ConfigError(f"no --kernel given and no guest kit at {kit.kit_dir()}: "
                              "build it with 'python3 scripts/guestkit.py build'")
        if initrd is None:
            initrd = str(kit.kit_initrd())
    readable_file(kernel, "kernel")
    if initrd is not None:
        readable_file(initrd, "initrd")
    return dataclasses.replace(c, kernel=kernel, initrd=initrd)


def check_cpus(c: VmConfig, max_cpus: int) -> None:
    """The vCPU count against what this host's KVM allows (KVM_CAP_MAX_VCPUS)."""
    if not 1 <= c.cpus <= max_cpus:
        raise ConfigError(f"--cpus {c.cpus}: this host's KVM allows 1 to {max_cpus}")


def readable_file(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise ConfigError(f"{what} {path} does not exist")
    if not os.path.isfile(path):
        raise ConfigError(f"{what} {path} is not a file")
    return readable(path, what)


def readable(path: str, what: str) -> str:
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{what} {path} is not readable")
    return path


def writable_file(path: str, what: str) -> str:
    """A file pyvmm writes or appends to (created if missing): its directory must exist."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError(f"{what} directory {parent} does not exist")
    if os.path.isdir(path):
        raise ConfigError(f"{what} {path} is a directory")
    if not os.access(path if os.path.exists(path) else parent, os.W_OK):
        raise ConfigError(f"{what} {path} is not writable")
    return path


def vsock_socket(path: str) -> None:
    """Where --vsock listens: a directory pyvmm may create the socket in, nothing but a socket there."""
    import stat

    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError(f"--vsock socket: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"--vsock socket: directory {parent} is not writable")
    if os.path.lexists(path) and not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise ConfigError(f"--vsock socket: {path} exists and is not a socket")


def _firmware_file(load):
    """What `load(vmm.firmware.image)` returns; its FirmwareError as a ConfigError.  (The firmware
    modules load only for a VM that names a firmware or ROM.)"""
    from ..firmware import image

    try:
        return load(image)
    except image.FirmwareError as e:
        raise ConfigError(str(e)) from None
