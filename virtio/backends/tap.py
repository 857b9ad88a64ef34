"""A Linux tap device: Ethernet frames in and out, each behind a virtio-net header.

    tap = Tap.open("tap0", queues=2)          # creates tap0 (or attaches to a persistent one)
    n = tap.readv(0, [view1, view2])          # one frame with its header, from queue 0's fd
    tap.writev(1, [hdr_view, frame_view])     # one frame, from queue 1's fd
    send = tap.writer(1); send([view])         # the same, bound to queue 1 (for hot loops)
    tap.set_offload(TUN_F_CSUM | TUN_F_TSO4)  # what the reader (us) accepts from the kernel
    tap.close()

What the kernel does is in Linux's Documentation/networking/tuntap.rst and
include/uapi/linux/if_tun.h.  Each queue is one open of /dev/net/tun
(O_NONBLOCK) followed by TUNSETIFF with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
(and IFF_MULTI_QUEUE when there is more than one queue): the first open creates
the interface - in the network namespace of the opening thread - unless a
persistent one of that name exists already.

The vnet header: with IFF_VNET_HDR every frame read or written is preceded by a
`struct virtio_net_hdr` (flags, gso_type, hdr_len, gso_size, csum_start,
csum_offset: 10 bytes) padded to the size TUNSETVNETHDRSZ sets - 12 here, the
size of virtio 1.x's header with its num_buffers field, so a guest's TX buffers
go to the tap as they are and RX frames land in guest buffers as the driver
wants them.  TUNSETVNETLE makes the header little-endian, as
virtio 1.x wants it, whatever the host's byte order.  The kernel does not fill
num_buffers (older kernels skip those two bytes, newer ones zero them): a
reader that uses it writes it.

Offloads: TUNSETOFFLOAD tells the kernel what a reader accepts - partial
checksums (TUN_F_CSUM), TCP segmentation offload (TUN_F_TSO4/6, TUN_F_TSO_ECN),
UDP fragmentation (TUN_F_UFO, a no-op since Linux 4.14).  Without them the
kernel segments and checksums every frame before it reaches the tap.  What a
writer may send is not limited by it: the kernel validates every header it is
given (a bad one fails that write with EINVAL).

readv / writev are os.readv / os.writev on the queue's fd: one call, one frame,
no copy in Python.  readv returns the bytes stored, vnet header included; a
frame longer than the buffers is cut and the rest lost, and the count does not
say so: a reader that must know adds a byte of its own after its buffers (the
frame was cut if that byte was reached).  Both raise BlockingIOError when the queue is empty / the kernel's buffers are
full; the caller polls fileno(i) for EPOLLIN / EPOLLOUT.

Batches (`open_batch_io(i)`, a `TapBatchIO` of tap_batch.py): many frames per system
call, each a row of struct iovec the caller built over its memory, submitted together
to an io_uring with RWF_NOWAIT (an empty / full queue answers -EAGAIN at once).  Linux
6.1 refuses RWF_NOWAIT on a tap (-EOPNOTSUPP): an empty request tells (it moves
no frame), and then there is no TapBatchIO (one frame per call).  Which of the
two a process uses is logged once.

This module knows nothing of virtio devices: it takes memoryviews, iovec arrays
and TUN_F_* flags.  (No `fcntl` module, a project rule: ioctl through ctypes.)
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from functools import partial
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

from .errors import TapError

if TYPE_CHECKING:  # (numpy and io_uring are loaded only when a device takes the batch path)
    from .tap_batch import NetBatchIO, TapBatchIO

log = logging.getLogger(__name__)

# <linux/if_tun.h>: ioctls, _IOW('T', nr, int) / _IOR('T', nr, unsigned int)
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
TUNSETPERSIST = 0x400454CB  # _IOW('T', 203, int)
TUNGETFEATURES = 0x800454CF  # _IOR('T', 207, unsigned int)
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int)
TUNGETIFF = 0x800454D2  # _IOR('T', 210, unsigned int)
TUNSETSNDBUF = 0x400454D4  # _IOW('T', 212, int)
TUNGETVNETHDRSZ = 0x800454D7  # _IOR('T', 215, int)
TUNSETVNETHDRSZ = 0x400454D8  # _IOW('T', 216, int)
TUNSETQUEUE = 0x400454D9  # _IOW('T', 217, int)
TUNSETVNETLE = 0x400454DC  # _IOW('T', 220, int)
# <linux/sockios.h>: any socket of the tap's namespace reaches the interface by its name
SIOCGIFMTU = 0x8921
SIOCSIFMTU = 0x8922

# TUNSETIFF ifr_flags
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_NAPI = 0x0010
IFF_NO_CARRIER = 0x0040
IFF_NO_PI = 0x1000
IFF_ONE_QUEUE = 0x2000
IFF_VNET_HDR = 0x4000
IFF_TUN_EXCL = 0x8000
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
IFF_PERSIST = 0x0800

# TUNSETOFFLOAD flags
TUN_F_CSUM = 0x01  # the reader accepts frames with a partial checksum
TUN_F_TSO4 = 0x02  # ... TSO for IPv4 packets (needs TUN_F_CSUM)
TUN_F_TSO6 = 0x04  # ... TSO for IPv6 packets (needs TUN_F_CSUM)
TUN_F_TSO_ECN = 0x08  # ... TSO with ECN bits (needs TSO4 or TSO6)
TUN_F_UFO = 0x10  # ... UDP fragmentation offload (needs TUN_F_CSUM; ignored since Linux 4.14)
TUN_F_USO4 = 0x20  # ... UDP segmentation offload, IPv4 (Linux 6.2+)
TUN_F_USO6 = 0x40  # ... UDP segmentation offload, IPv6 (Linux 6.2+)

TUN_DEVICE = "/dev/net/tun"
IFNAMSIZ = 16  # including the NUL: names are at most 15 characters
MAX_TAP_QUEUES = 256  # the kernel's MAX_TAP_QUEUES
VIRTIO_NET_HDR_SIZE = 10  # struct virtio_net_hdr without num_buffers: the smallest TUNSETVNETHDRSZ

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int


class _IfReq(ctypes.Structure):
    """struct ifreq as TUNSETIFF / TUNGETIFF / TUNSETQUEUE use it: name, flags, padding (40 bytes)."""

    _fields_ = [("ifr_name", ctypes.c_char * IFNAMSIZ), ("ifr_flags", ctypes.c_short), ("_pad", ctypes.c_char * 22)]


assert ctypes.sizeof(_IfReq) == 40


class _IfReqMtu(ctypes.Structure):
    """struct ifreq as SIOCGIFMTU / SIOCSIFMTU use it: name, ifr_mtu, padding (40 bytes)."""

    _fields_ = [("ifr_name", ctypes.c_char * IFNAMSIZ), ("ifr_mtu", ctypes.c_int), ("_pad", ctypes.c_char * 20)]


assert ctypes.sizeof(_IfReqMtu) == 40


def _ioctl_ptr(fd: int, request: int, arg) -> None:
    if _ioctl(fd, request, ctypes.byref(arg)) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _sockios(sock, name: str, request: int, mtu: int = 0) -> int:
    """An interface ioctl of <linux/sockios.h> that carries an MTU, through `sock`: the kernel
    looks `name` up in the socket's network namespace.  Raises OSError."""
    req = _IfReqMtu(ifr_name=name.encode(), ifr_mtu=mtu)
    _ioctl_ptr(sock.fileno(), request, req)
    return req.ifr_mtu


def check_tap_name(name: str) -> None:
    """Raise TapError unless `name` is a name Linux accepts for an interface (dev_valid_name)."""
    if not name:
        raise TapError("tap name is empty")
    if len(name.encode()) >= IFNAMSIZ:
        raise TapError(f"tap name {name!r} is too long: at most {IFNAMSIZ - 1} characters")
    if name in (".", "..") or any(c in name for c in "/:") or any(c.isspace() for c in name):
        raise TapError(f"tap name {name!r} is not a valid interface name (no '/', ':' or spaces)")


class NetBackend(Protocol):
    """What virtio/net.py needs of a network backend (a Tap, or a test's fake).

    Queue i: `fileno(i)` for epoll (readable: frames wait; writable: room), frames with their
    12-byte header through `readv(i, views)` (the bytes stored, at most the views' total: a
    longer frame is cut; raises BlockingIOError when empty) and `writev(i, views)`
    (BlockingIOError when full; OSError when the kernel rejects the frame).

    `open_batch_io(i)`: queue i's NetBatchIO (many frames per call), or None where the
    backend has none (then a device moves one frame per call).  The device never does I/O on
    a file descriptor itself.
    """

    name: str
    queues: int

    def fileno(self, index: int = 0) -> int: ...

    def readv(self, index: int, views: Sequence[memoryview]) -> int: ...

    def writev(self, index: int, views: Sequence[memoryview]) -> int: ...

    def reader(self, index: int) -> Callable[[Sequence[memoryview]], int]:
        """readv bound to queue `index`: what a device's hot loop calls per frame."""
        ...

    def writer(self, index: int) -> Callable[[Sequence[memoryview]], int]:
        """writev bound to queue `index`."""
        ...

    def open_batch_io(self, index: int) -> NetBatchIO | None: ...

    def set_offload(self, flags: int) -> None: ...

    def set_queue_enabled(self, index: int, enabled: bool) -> None: ...

    def close(self) -> None: ...


_said_path = False


def _say_path(tap: str, path: str, say: Callable[..., None]) -> None:
    """Say once per process which way frames go to and from taps."""
    global _said_path
    if not _said_path:
        _said_path = True
        say("tap %s: I/O path: %s", tap, path)


class Tap:
    """An open tap interface: `queues` file descriptors, one per queue."""

    def __init__(self, name: str, fds: list[int], vnet_hdr_size: int, control=None):
        self.name = name
        self.fds = fds
        self._control = control  # a socket of the tap's namespace, for SIOC*IFMTU (made at open)
        self.queues = len(fds)
        self.vnet_hdr_size = vnet_hdr_size
        self.offload = 0
        self._enabled = [True] * len(fds)

    @classmethod
    def open(cls, name: str, *, queues: int = 1, vnet_hdr_size: int = 12) -> "Tap":
        """Create (or attach to) tap `name` with `queues` queues.  Raises TapError."""
        check_tap_name(name)
        if not 1 <= queues <= MAX_TAP_QUEUES:
            raise TapError(f"tap {name}: {queues} queues is not from 1 to {MAX_TAP_QUEUES}")
        if vnet_hdr_size < VIRTIO_NET_HDR_SIZE:
            raise TapError(f"tap {name}: vnet header size {vnet_hdr_size} is below {VIRTIO_NET_HDR_SIZE}")
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if queues > 1 else 0)
        fds: list[int] = []
        try:
            for _ in range(queues):
                fd = _open_tun(name)
                fds.append(fd)
                name = _set_iff(fd, name, flags, queues)  # a pattern like "tap%d" becomes the real name
                try:
                    _ioctl_ptr(fd, TUNSETVNETHDRSZ, ctypes.c_int(vnet_hdr_size))
                except OSError as err:
                    raise TapError(f"tap {name}: cannot set the vnet header size to {vnet_hdr_size}: {err.strerror}") from None
                try:
                    _ioctl_ptr(fd, TUNSETVNETLE, ctypes.c_int(1))
                except OSError as err:
                    if err.errno != errno.EINVAL:  # kernels before 4.1: little-endian hosts do not need it
                        raise TapError(f"tap {name}: TUNSETVNETLE: {err.strerror}") from None
            # The namespace is the opening thread's now; the MTU ioctls may come from any thread.
            import socket  # (here: checking a --net option loads no socket module)

            control = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return cls(name, fds, vnet_hdr_size, control)

    # -- what the device uses ----------------------------------------------------------
    def fileno(self, index: int = 0) -> int:
        return self.fds[index]

    def readv(self, index: int, views: Sequence[memoryview]) -> int:
        """Read one frame (header first) into `views`; the bytes stored (a longer frame is cut)."""
        return os.readv(self.fds[index], views)

    def writev(self, index: int, views: Sequence[memoryview]) -> int:
        """Send one frame (header first) made of `views`."""
        return os.writev(self.fds[index], views)

    def reader(self, index: int) -> Callable[[Sequence[memoryview]], int]:
        return partial(os.readv, self.fds[index])  # no Python frame between the device and the syscall

    def writer(self, index: int) -> Callable[[Sequence[memoryview]], int]:
        return partial(os.writev, self.fds[index])

    def open_batch_io(self, index: int) -> TapBatchIO | None:
        """Queue `index`'s batch I/O (io_uring), or None where this kernel cannot give it: then
        one frame per system call (said once per process, as is the io_uring path)."""
        try:
            from .tap_batch import TapBatchIO

            batch_io = TapBatchIO(self.fds[index])
        except OSError as err:
            _say_path(self.name, f"one frame per system call (io_uring batches unavailable: {err})", log.warning)
            return None
        _say_path(self.name, "io_uring batches (RWF_NOWAIT), one frame per system call for odd chains", log.info)
        return batch_io

    def set_offload(self, flags: int) -> None:
        """TUNSETOFFLOAD: the TUN_F_* offloads the reader accepts.  Raises OSError (EINVAL)."""
        # One setting for the whole tap, whichever queue's fd sets it.  The argument is
        # passed by value, not through a pointer.
        if _ioctl(self.fds[0], TUNSETOFFLOAD, ctypes.c_void_p(flags)) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"tap {self.name}: TUNSETOFFLOAD {flags:#x}: {os.strerror(err)}")
        self.offload = flags

    def set_queue_enabled(self, index: int, enabled: bool) -> None:
        """Attach or detach queue `index` (TUNSETQUEUE): the kernel sends nothing to a detached queue.

        Only for a multi-queue tap; a single-queue tap has nothing to detach.
        """
        if self.queues == 1 or self._enabled[index] == enabled:
            return
        req = _IfReq(ifr_flags=IFF_ATTACH_QUEUE if enabled else IFF_DETACH_QUEUE)
        try:
            _ioctl_ptr(self.fds[index], TUNSETQUEUE, req)
        except OSError as err:
            raise OSError(err.errno, f"tap {self.name}: cannot {'attach' if enabled else 'detach'} queue {index}: {err.strerror}") from None
        self._enabled[index] = enabled

    def queue_enabled(self, index: int) -> bool:
        return self._enabled[index]

    def set_mtu(self, mtu: int) -> None:
        """SIOCSIFMTU: the interface's MTU (the largest frame the host side sends and takes,
        link header excluded).  Needs CAP_NET_ADMIN in the tap's namespace.  Raises TapError."""
        try:
            _sockios(self._control, self.name, SIOCSIFMTU, mtu)
        except OSError as err:
            raise TapError(f"tap {self.name}: cannot set its MTU to {mtu}: {err.strerror}") from None

    def mtu(self) -> int:
        """SIOCGIFMTU: the interface's MTU."""
        return _sockios(self._control, self.name, SIOCGIFMTU)

    # -- inspection ----------------------------------------------------------------------
    def flags(self) -> int:
        """TUNGETIFF's ifr_flags (IFF_TAP, IFF_NO_PI, IFF_VNET_HDR, IFF_MULTI_QUEUE...)."""
        req = _IfReq()
        _ioctl_ptr(self.fds[0], TUNGETIFF, req)
        return req.ifr_flags & 0xFFFF

    def get_vnet_hdr_size(self) -> int:
        size = ctypes.c_int()
        _ioctl_ptr(self.fds[0], TUNGETVNETHDRSZ, size)
        return size.value

    def close(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)
        if self._control is not None:
            self._control.close()

    def __enter__(self) -> "Tap":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Tap({self.name!r}, queues={self.queues}, fds={self.fds})"


def _open_tun(name: str) -> int:
    try:
        return os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TapError(
            f"cannot create tap {name}: {TUN_DEVICE} does not exist (load the tun module: modprobe tun)"
        ) from None
    except PermissionError:
        raise TapError(f"cannot create tap {name}: no permission to open {TUN_DEVICE}") from None
    except OSError as err:
        raise TapError(f"cannot create tap {name}: {TUN_DEVICE}: {err.strerror}") from None


def _set_iff(fd: int, name: str, flags: int, queues: int) -> str:
    req = _IfReq(ifr_name=name.encode(), ifr_flags=flags)
    try:
        _ioctl_ptr(fd, TUNSETIFF, req)
    except OSError as err:
        if err.errno == errno.EPERM:
            msg = f"no permission to create tap {name}: need CAP_NET_ADMIN (or a persistent tap owned by this user)"
        elif err.errno == errno.EBUSY:
            msg = f"tap {name} is held by another process (or this one): a tap without multi_queue has one user"
        elif err.errno == errno.EINVAL:
            msg = (
                f"cannot use tap {name}: an interface of that name exists but is not a tap, "
                f"or is a tap {'without' if queues > 1 else 'with'} multi_queue, or the name is invalid"
            )
        else:
            msg = f"cannot create tap {name}: {err.strerror}"
        raise TapError(msg) from None
    return req.ifr_name.decode()
