"""--console-device and --port (vmm/config/console.py): syntax, checks, the default command line,
the dict form, the host checks; and the CLI's one line and status 2 for bad ones."""

from __future__ import annotations

import re
import socket

import pytest

from vmm import cli
from vmm.config import ConfigError, PortSpec, check_host, from_dict, parse_port_spec


def test_port_specs():
    assert parse_port_spec("name=org.pyvmm.agent-0,socket=/run/a.sock") == PortSpec("org.pyvmm.agent-0", socket="/run/a.sock")
    assert parse_port_spec("file=/var/log/p,name=log") == PortSpec("log", file="/var/log/p")


@pytest.mark.parametrize("text,message", [
    ("socket=/tmp/a", "name="),
    ("name=,socket=/tmp/a", "name="),
    ("name=../x,socket=/tmp/a", "name="),
    ("name=.hidden,socket=/tmp/a", "name="),
    ("name=a/b,socket=/tmp/a", "name="),
    ("name=" + "n" * 65 + ",socket=/tmp/a", "name="),
    ("name=a", "one of socket=PATH and file=PATH"),
    ("name=a,socket=/x,file=/y", "one of socket=PATH and file=PATH"),
    ("name=a,socket=", "needs a PATH"),
    ("name=a,socket=/" + "s" * 120, "at most 107 bytes"),
    ("name=a,tty=/dev/x", "unknown option"),
    ("name=a,name=b,file=/x", "given twice"),
])
def test_bad_port_specs(text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_port_spec(text)


def test_console_device_and_its_default_command_line():
    assert from_dict({}).console_device == "serial" and from_dict({}).cmdline == "console=ttyS0"
    c = from_dict({"console_device": "virtio", "append": "quiet"})
    assert c.console_device == "virtio" and c.cmdline == "console=ttyS0 console=hvc0 quiet"
    assert from_dict({"console_device": "virtio", "cmdline": "console=hvc0"}).cmdline == "console=hvc0"
    with pytest.raises(ConfigError, match="--console-device 'usb'"):
        from_dict({"console_device": "usb"})


def test_ports_of_one_vm():
    c = from_dict({"port": ["name=a,socket=/tmp/a.sock", {"name": "b", "file": "/tmp/b"}]})
    assert c.ports == (PortSpec("a", socket="/tmp/a.sock"), PortSpec("b", file="/tmp/b"))
    with pytest.raises(ConfigError, match="name 'a' given twice"):
        from_dict({"port": ["name=a,socket=/tmp/a.sock", "name=a,file=/tmp/b"]})
    with pytest.raises(ConfigError, match="socket '/tmp/a.sock' given twice"):
        from_dict({"port": ["name=a,socket=/tmp/a.sock", "name=b,socket=/tmp/a.sock"]})
    with pytest.raises(ConfigError, match="at most 31"):
        from_dict({"port": [f"name=p{i},file=/tmp/p{i}" for i in range(32)]})
    with pytest.raises(ConfigError, match="--port: port"):
        from_dict({"port": [{"socket": "/tmp/x"}]})


def test_host_checks(tmp_path):
    kernel = tmp_path / "k"
    kernel.write_bytes(b"x")
    base = {"kernel": str(kernel)}
    check_host(from_dict({**base, "port": [f"name=a,socket={tmp_path}/a.sock", f"name=b,file={tmp_path}/b"]}))
    (tmp_path / "plain").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        check_host(from_dict({**base, "port": [f"name=a,socket={tmp_path}/plain"]}))
    with pytest.raises(ConfigError, match="does not exist"):
        check_host(from_dict({**base, "port": [f"name=a,file={tmp_path}/no/such"]}))
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(tmp_path / "old.sock"))  # a socket file (a stale one is replaced when listening)
    check_host(from_dict({**base, "port": [f"name=a,socket={tmp_path}/old.sock"]}))
    live.close()


def test_cli_says_one_line_and_exits_2(capsys):
    assert cli.main(["run", "--port", "name=a/b,socket=/tmp/x"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "name=" in err
    assert cli.main(["run", "--console-device", "usb"]) == cli.EXIT_USAGE
