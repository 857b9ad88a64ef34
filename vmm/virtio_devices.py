"""The virtio devices of a VmConfig: open the backend a spec names, then build the device on it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import BalloonSpec, DiskSpec, NetSpec, RngSpec, VsockSpec, default_mac
from .memory import GuestMemory

if TYPE_CHECKING:
    from virtio.blk import VirtioBlk
    from virtio.console import VirtioConsole
    from virtio.net import VirtioNet


def build_disk(mem: GuestMemory, spec: DiskSpec, *, default_queues: int = 1, queue_size: int = 256) -> VirtioBlk:
    """A virtio-blk device on the image `spec` names (raises ImageError, ValueError).  (Loaded here,
    as every device: a VM without a disk never loads virtio-blk.)"""
    from virtio.backends.raw import RawImage
    from virtio.blk import VirtioBlk

    image = RawImage.open(spec.path, read_only=spec.read_only, cache=spec.cache)
    return _on_backend(image, lambda: VirtioBlk(mem, image, num_queues=spec.queues or default_queues,
                                                queue_size=queue_size, serial=spec.serial,
                                                read_only=spec.read_only))


def build_net(mem: GuestMemory, spec: NetSpec, *, vm_id: str | int = "", default_queues: int = 1,
              queue_size: int = 256) -> VirtioNet:
    """A virtio-net device on the tap `spec` names, one tap queue per queue pair (raises TapError,
    ValueError); without a MAC in `spec`, default_mac(tap, vm_id); with an MTU in `spec`, the tap's
    set to it too.  (virtio-net and its batch paths, with numpy, are loaded here: a VM without a
    NIC never loads them.)"""
    from virtio.backends.tap import Tap
    from virtio.net import VirtioNet
    from virtio.net_common import DEFAULT_MTU
    from virtio.net_hdr import NET_HDR_SIZE

    queues = spec.queues or default_queues
    tap = Tap.open(spec.tap, queues=queues, vnet_hdr_size=NET_HDR_SIZE)

    def build() -> VirtioNet:
        if spec.mtu is not None and tap.mtu() != spec.mtu:
            tap.set_mtu(spec.mtu)
        return VirtioNet(mem, tap, mac=spec.mac or default_mac(tap.name, vm_id), queue_pairs=queues,
                         queue_size=queue_size, mtu=spec.mtu or DEFAULT_MTU)

    return _on_backend(tap, build)


def build_console(mem: GuestMemory, ports, console_sink=None, *, queue_size: int = 256) -> VirtioConsole:
    """A virtio-console device: port 0 the console (its output to `console_sink`) when one is given,
    then the named `ports` (PortSpecs), each on its socket or file (raises PortError)."""
    from virtio.backends.port import ConsolePort, FilePort, SocketPort
    from virtio.console import VirtioConsole

    opened = []
    try:
        for spec in ports:
            opened.append((spec.name, SocketPort.listen(spec.socket) if spec.socket else FilePort.open(spec.file)))
        console = ConsolePort(console_sink) if console_sink is not None else None
        return VirtioConsole(mem, console=console, named=opened, queue_size=queue_size)
    except BaseException:
        for _, backend in opened:
            backend.close()
        raise


def build_vsock(mem: GuestMemory, spec: VsockSpec):
    """A virtio-vsock device listening at `spec.socket` (raises OSError: the socket cannot be made)."""
    from virtio.backends.vsock_unix import UnixVsockBackend
    from virtio.vsock import VirtioVsock

    backend = UnixVsockBackend(spec.socket)
    return _on_backend(backend, lambda: VirtioVsock(mem, backend, guest_cid=spec.cid))


def _on_backend(backend, build):
    """What `build()` returns; the backend closed if it fails."""
    try:
        return build()
    except BaseException:
        backend.close()
        raise


def build_rng(mem: GuestMemory, spec: RngSpec):
    """A virtio-rng device drawing on the host's getrandom, at most spec.rate bytes a second."""
    from virtio.backends.entropy import HostEntropy
    from virtio.rng import VirtioRng

    return VirtioRng(mem, HostEntropy(), rate=spec.rate)


def build_balloon(mem: GuestMemory, spec: BalloonSpec):
    """A virtio-balloon device that gives inflated and reported pages back by punching holes in
    guest RAM's memfd (raises ValueError for a size larger than the RAM)."""
    from virtio.backends.ramdiscard import RamDiscard
    from virtio.balloon import VirtioBalloon

    return VirtioBalloon(mem, RamDiscard(mem.fd), target=spec.size, stats_interval=spec.stats_interval,
                         free_page_reporting=spec.free_page_reporting, deflate_on_oom=spec.deflate_on_oom)
