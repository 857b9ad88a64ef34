"""--api-socket: where a VM's management API listens (vmm/api), and the per-user directory the
default sockets live in, which `pyvmm ls` reads.

    --api-socket PATH    that Unix socket
    --api-socket off     no API
    (none)               RUNTIME_DIR/NAME.sock after --name, or pyvmm-PID.sock for a VM without one

RUNTIME_DIR is $XDG_RUNTIME_DIR/pyvmm, else /run/user/UID/pyvmm where that exists, else
/tmp/pyvmm-UID; it is made mode 0700 and must be a directory of this user that nobody else can
enter (a /tmp name another user made first is refused, not used)."""

from __future__ import annotations

import os
import re
import stat

from .options import ConfigError

OFF = "off"
DEFAULT_NAME = "pyvmm"  # VmConfig.name when --name is not given: the socket is named after the pid
SOCKET_SUFFIX = ".sock"
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes, the last a NUL


def parse_api_socket(value) -> str | None:
    """--api-socket's value: a path, OFF, or None (the default path)."""
    if value is None:
        return None
    text = str(value)
    if not text or "\0" in text:
        raise ConfigError(f"--api-socket {value!r}: give a PATH, or off")
    if text != OFF and len(os.fsencode(os.path.abspath(text))) > MAX_SOCKET_PATH:
        raise ConfigError(f"--api-socket {text}: longer than a Unix socket path can be ({MAX_SOCKET_PATH} bytes)")
    return text


def runtime_dir(*, create: bool = False, uid: int | None = None, environ=os.environ) -> str:
    """This user's directory of default API sockets (made, mode 0700, with create=True).
    ConfigError if it is not a private directory of this user."""
    uid = os.getuid() if uid is None else uid
    base = environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        path = os.path.join(base, "pyvmm")
    elif os.path.isdir(f"/run/user/{uid}"):
        path = f"/run/user/{uid}/pyvmm"
    else:
        path = f"/tmp/pyvmm-{uid}"
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise ConfigError(f"cannot make the API socket directory {path}: {e.strerror}") from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
        raise ConfigError(f"{path} is not a directory of this user's alone (mode 0700): "
                          "remove it, or give --api-socket PATH")
    return path


def default_socket_path(name: str, pid: int, directory: str) -> str:
    """RUNTIME_DIR/NAME.sock, or pyvmm-PID.sock without --name."""
    if name == DEFAULT_NAME:
        return os.path.join(directory, f"{DEFAULT_NAME}-{pid}{SOCKET_SUFFIX}")
    if not NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"--name {name!r} cannot name an API socket (letters, digits, '.', '_', '-'; "
                          "at most 100): give --api-socket PATH or off")
    return os.path.join(directory, name + SOCKET_SUFFIX)


def api_socket_path(api_socket: str | None, name: str, pid: int) -> str | None:
    """Where the VM's API listens (None: off), the default directory made if needed."""
    if api_socket == OFF:
        return None
    if api_socket is not None:
        parent = os.path.dirname(os.path.abspath(api_socket))
        if not os.path.isdir(parent):
            raise ConfigError(f"--api-socket {api_socket}: {parent} is not a directory")
        if os.path.lexists(api_socket) and not stat.S_ISSOCK(os.lstat(api_socket).st_mode):
            raise ConfigError(f"--api-socket {api_socket}: exists and is not a socket")
        return api_socket
    return default_socket_path(name, pid, runtime_dir(create=True))


def vm_name_of(path: str) -> str:
    """The VM name `pyvmm ls` shows for a socket in the runtime directory."""
    base = os.path.basename(path)
    return base[: -len(SOCKET_SUFFIX)] if base.endswith(SOCKET_SUFFIX) else base
