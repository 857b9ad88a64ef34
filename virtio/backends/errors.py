"""The backends' set-up errors: each is the user's to fix (a bad path, a tap in use...), and the
command line reports it in one line.  Here, apart from the backends, so that catching them loads
none of a backend's own machinery (sockets, io_uring)."""


class ImageError(Exception):
    """The image cannot be used as asked (missing, not permitted, not a disk...): the user's to fix."""


class TapError(Exception):
    """The tap cannot be used as asked (no permission, in use, bad name...): the user's to fix."""


class PortError(OSError):
    """A port's host side cannot be set up (a socket path in use, a file that cannot be opened)."""
