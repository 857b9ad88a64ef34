"""The API's socket: its default name and directory, stale and live sockets, the server over a
real Unix socket (malformed and slow clients get their 4xx and the server goes on), and the
client side of `pyvmm ls` and the verbs, with their plain tables and exit statuses."""

import json
import os
import socket
import stat
import threading
import time

import pytest

from tests.unit.test_api_routes import FakeMachine
from vmm import cli
from vmm.api import client, server as server_mod, verbs
from vmm.api.routes import Routes
from vmm.api.server import ApiServer, ApiSocketBusy
from vmm.config import ConfigError, VmConfig
from vmm.config.api import api_socket_path, default_socket_path, parse_api_socket, runtime_dir


# -- names and directories -------------------------------------------------------------------
def test_default_socket_names(tmp_path):
    d = str(tmp_path)
    assert default_socket_path("web1", 123, d) == f"{d}/web1.sock"
    assert default_socket_path("pyvmm", 123, d) == f"{d}/pyvmm-123.sock"  # no --name: the pid
    for bad in ("../x", "a/b", ".hidden", "", "x" * 101, "sp ace"):
        with pytest.raises(ConfigError, match="--api-socket"):
            default_socket_path(bad, 1, d)


def test_runtime_dir_choice_and_safety(tmp_path, monkeypatch):
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    path = runtime_dir(create=True, environ=env)
    assert path == f"{tmp_path}/pyvmm" and stat.S_IMODE(os.stat(path).st_mode) == 0o700
    os.chmod(path, 0o755)  # others could enter: refused, not used
    with pytest.raises(ConfigError, match="0700"):
        runtime_dir(environ=env)
    os.rmdir(path)
    os.symlink(str(tmp_path), path)  # a symlink in its place: refused
    with pytest.raises(ConfigError):
        runtime_dir(environ=env)
    uid = os.getuid()
    fallback = runtime_dir(environ={})
    assert fallback in (f"/run/user/{uid}/pyvmm", f"/tmp/pyvmm-{uid}")


def test_the_api_socket_option(tmp_path):
    assert VmConfig.from_dict({"api_socket": "off"}).api_socket == "off"
    assert VmConfig.from_dict({}).api_socket is None
    with pytest.raises(ConfigError, match="longer"):
        parse_api_socket("/" + "x" * 200)
    with pytest.raises(ConfigError):
        parse_api_socket("")
    assert api_socket_path("off", "x", 1) is None
    with pytest.raises(ConfigError, match="not a directory"):
        api_socket_path(str(tmp_path / "none" / "s.sock"), "x", 1)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="not a socket"):
        api_socket_path(str(tmp_path / "file"), "x", 1)
    assert api_socket_path(str(tmp_path / "s.sock"), "x", 1) == str(tmp_path / "s.sock")


def test_bad_api_socket_is_one_line_and_exit_2(capsys):
    assert cli.main(["run", "--program", "/bin/true", "--api-socket", ""]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--api-socket" in err


# -- the server ----------------------------------------------------------------------------------
@pytest.fixture
def served(tmp_path):
    machine = FakeMachine()
    path = str(tmp_path / "t.sock")
    srv = ApiServer(path, Routes(lambda: machine, name="t", api_socket=path))
    srv.start()
    yield machine, srv, path
    srv.close()


def raw_exchange(path, data: bytes, timeout=5.0) -> bytes:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    s.sendall(data)
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    s.close()
    return out


def test_socket_mode_and_removal(tmp_path):
    path = str(tmp_path / "t.sock")
    srv = ApiServer(path, Routes(lambda: None, name="t"))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with pytest.raises(ApiSocketBusy, match="already listens"):
        ApiServer(path, Routes(lambda: None, name="t2"))  # a live VM's socket is not taken
    srv.close()
    assert not os.path.exists(path)


def test_a_stale_socket_is_replaced(tmp_path):
    path = str(tmp_path / "t.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # the file stays, nobody listens
    srv = ApiServer(path, Routes(lambda: None, name="t"))
    srv.close()
    (tmp_path / "f").write_text("")
    with pytest.raises(ApiSocketBusy, match="not a socket"):
        ApiServer(str(tmp_path / "f"), Routes(lambda: None, name="t"))


def test_keep_alive_and_pipelining(served):
    _, srv, path = served
    out = raw_exchange(path, b"GET /vm HTTP/1.1\r\n\r\nPUT /vm/pause HTTP/1.1\r\n\r\n"
                             b"GET /vm/counters HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert out.count(b"HTTP/1.1 200 OK") == 3 and b'"paused"' in out


def test_malformed_and_oversized_requests_get_4xx_and_the_server_goes_on(served):
    machine, srv, path = served
    cases = {b"BLAH\r\n\r\n": 400, b"GET /vm HTTP/3.0\r\n\r\n": 505,
             b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\n\r\n": 414,
             b"PUT /vm/balloon HTTP/1.1\r\nContent-Length: 10000000\r\n\r\n": 413,
             b"GET /vm HTTP/1.1\r\n" + b"X: y\r\n" * 100 + b"\r\n": 431,
             b"GET /nope HTTP/1.1\r\n\r\n": 404,
             b"\x00\xff" * 3000: 414}
    for data, status in cases.items():
        out = raw_exchange(path, data)
        assert out.startswith(b"HTTP/1.1 %d " % status), (data[:40], out[:60])
        assert json.loads(out.split(b"\r\n\r\n", 1)[1])["status"] == status
    assert client.call(path, "GET", "/vm")["state"] == "running"


def test_a_slow_request_gets_408_and_does_not_hold_the_others(served, monkeypatch):
    machine, srv, path = served
    monkeypatch.setattr(server_mod, "REQUEST_TIMEOUT", 0.5)
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow.settimeout(5)
    slow.connect(path)
    slow.sendall(b"GET /vm HTTP/1.1\r\nX: ")  # and never more
    assert client.call(path, "GET", "/vm")["name"] == "t"  # others are served meanwhile
    answer = slow.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408 ")
    slow.close()


def test_too_many_clients_get_503(served):
    _, srv, path = served
    held = []
    for _ in range(server_mod.MAX_CLIENTS):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        held.append(s)
    time.sleep(0.2)
    extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    extra.settimeout(5)
    extra.connect(path)
    assert extra.recv(4096).startswith(b"HTTP/1.1 503 ")  # answered at once, and closed
    extra.close()
    for s in held:
        s.close()
    time.sleep(0.2)
    assert client.call(path, "GET", "/vm")["state"] == "running"


# -- ls and the verbs ------------------------------------------------------------------------------
def test_ls_lists_live_vms_removes_stale_sockets_and_is_not_held_by_a_silent_one(tmp_path):
    a = ApiServer(str(tmp_path / "a.sock"), Routes(lambda: FakeMachine(), name="a"))
    a.start()
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(tmp_path / "dead.sock"))
    dead.close()
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # listens, never accepts
    silent.bind(str(tmp_path / "silent.sock"))
    silent.listen(1)
    try:
        started = time.monotonic()
        vms = client.list_vms(str(tmp_path), timeout=0.3)
        assert time.monotonic() - started < 3
        assert [(v["name"], v["state"]) for v in vms] == [("a", "running"), ("silent", "not answering")]
        assert not os.path.exists(tmp_path / "dead.sock")  # the stale one is gone
        text = verbs.ls(False, str(tmp_path))
        lines = text.splitlines()
        assert lines[0].split() == ["NAME", "PID", "STATE", "CPUS", "MEMORY", "UPTIME"]
        assert lines[1].split() == ["a", str(os.getpid()), "running", "2", "512M", "12.5s"]
    finally:
        silent.close()
        a.close()
    assert verbs.ls(False, str(tmp_path)) == "no VMs running"


def test_the_verbs(tmp_path):
    machine = FakeMachine()
    srv = ApiServer(str(tmp_path / "t.sock"), Routes(lambda: machine, name="t"))
    srv.start()
    d = str(tmp_path)
    try:
        info = verbs.vm_verb("info", "t", False, d)
        assert "state       running" in info and "VCPU  THREAD  RUNNING  EXITS" in info and "net0" in info
        assert json.loads(verbs.vm_verb("info", "t", True, d))["name"] == "t"
        counters = verbs.vm_verb("counters", "t", False, d).splitlines()
        assert counters[0].split() == ["DEVICE", "TYPE", "REQUESTS", "BYTES", "ERRORS", "NOTIFICATIONS", "INTERRUPTS"]
        assert counters[1].split() == ["blk0", "virtio-blk", "6", "8192", "0", "4", "2"]
        assert "io-out=5 hlt=2" in verbs.vm_verb("counters", "t", False, d)
        assert verbs.vm_verb("pause", "t", False, d) == "t: paused"
        with pytest.raises(verbs.VerbError) as e:
            verbs.vm_verb("pause", "t", False, d)
        assert e.value.code == 2 and "paused" in str(e.value)
        assert verbs.vm_verb("resume", str(tmp_path / "t.sock"), False, None) == "t/t.sock: running".replace(
            "t/t.sock", str(tmp_path / "t.sock"))  # a path names the socket itself
        assert verbs.vm_verb("stop", "t", False, d) == "t: asked to power off"
        assert verbs.vm_verb("kill", "t", False, d) == "t: stopped"
        with pytest.raises(verbs.VerbError) as e:
            verbs.vm_verb("info", "nosuch", False, d)
        assert e.value.code == 2 and "no VM named nosuch" in str(e.value)
    finally:
        srv.close()


def test_verbs_through_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    d = runtime_dir(create=True)
    machine = FakeMachine()
    srv = ApiServer(os.path.join(d, "t.sock"), Routes(lambda: machine, name="t"))
    srv.start()
    try:
        assert cli.main(["ls"]) == 0
        assert capsys.readouterr().out.splitlines()[1].split()[:3] == ["t", str(os.getpid()), "running"]
        assert cli.main(["pause", "t", "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == {"state": "paused"}
        assert cli.main(["pause", "t"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("pyvmm: error: t: cannot pause")
        assert cli.main(["info"]) == 2  # NAME missing: argparse's one line
        assert capsys.readouterr().err.count("\n") == 1
    finally:
        srv.close()
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(os.path.join(d, "t.sock"))
    dead.close()
    assert cli.main(["info", "t"]) == 2
    assert "not running" in capsys.readouterr().err and not os.path.exists(os.path.join(d, "t.sock"))
