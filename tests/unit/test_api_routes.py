"""The API's endpoints (vmm/api/routes.py, describe.py) on a fake machine: what each answers,
and the 4xx/5xx of what cannot be done."""

import json

import pytest

from vmm.api.http import HttpError, RequestReader
from vmm.api.routes import Routes
from vmm.config import VmConfig
from vmm.kvm import exits
from vmm.machine import VmStateError
from virtio.counters import QueueCounters


class FakeDevice:
    def __init__(self, name, queues=2):
        self.name = name
        self.queues = [object()] * queues
        self.active = True
        self.status = 0x0F
        self.counters = [QueueCounters(requests=3, bytes=4096, notifications=2, interrupts=1) for _ in range(queues)]

    def counter_totals(self):
        return {"requests": 6, "bytes": 8192, "errors": 0, "notifications": 4, "interrupts": 2}


class FakePciFunction:
    def __init__(self, device):
        self.device = device


class FakePci:
    def __init__(self, devices):
        self.devices = [None] + [FakePciFunction(d) for d in devices] + [None]


class FakeVcpuThread:
    def __init__(self, i):
        self.vcpu = type("V", (), {"id": i})()
        self.name = f"vcpu{i}"
        self.exits = 7
        self.exit_counts = {exits.IoOut: 5, exits.Hlt: 2}

    def is_alive(self):
        return True


class FakeMachine:
    def __init__(self, *, hears_the_button=True, balloon=True):
        self.config = VmConfig(program="/bin/guest", cpus=2, name="t")
        self.state = "running"
        self.pci = FakePci([FakeDevice("virtio-blk"), FakeDevice("virtio-net", 3), FakeDevice("virtio-blk", 1)])
        self.threads = [FakeVcpuThread(0), FakeVcpuThread(1)]
        self.calls = []
        self.balloon = object() if balloon else None
        self.target = 0
        self.hears_the_button = hears_the_button

    def request_shutdown(self):
        self.calls.append("shutdown")
        return self.hears_the_button

    def uptime(self):
        return 12.5

    def paused_time(self):
        return 1.25

    def pause(self):
        if self.state != "running":
            raise VmStateError(f"cannot pause a VM that is {self.state}")
        self.state = "paused"

    def resume(self):
        if self.state != "paused":
            raise VmStateError(f"cannot resume a VM that is {self.state}")
        self.state = "running"

    def request_reboot(self):
        self.calls.append("reboot")

    def kill(self):
        self.calls.append("kill")
        self.state = "stopping"

    def set_balloon_target(self, size):
        if size > self.config.mem_size:
            raise ValueError("more than the guest's RAM")
        self.target = size

    def balloon_info(self):
        if self.balloon is None:
            raise ValueError("this VM has no balloon (--balloon)")
        return {"target": self.target, "actual": 0}


def ask(routes, method, target, body=None):
    data = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    raw = f"{method} {target} HTTP/1.1\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data
    [request] = RequestReader().feed(raw)
    try:
        return routes.handle(request)
    except HttpError as e:
        return e.status, {"error": str(e)}


@pytest.fixture
def vm():
    machine = FakeMachine()
    return machine, Routes(lambda: machine, name="t", api_socket="/run/t.sock")


def test_get_vm(vm):
    machine, routes = vm
    status, body = ask(routes, "GET", "/vm")
    assert status == 200
    assert (body["name"], body["state"], body["uptime_s"], body["paused_s"], body["cpus"]) == ("t", "running", 12.5, 1.25, 2)
    assert body["memory"] == machine.config.mem_size and body["api_socket"] == "/run/t.sock"
    assert body["config"]["program"] == "/bin/guest" and body["config"]["disks"] == []
    assert [v["thread"] for v in body["vcpus"]] == ["vcpu0", "vcpu1"]
    assert [(d["id"], d["pci_slot"], d["queues"]) for d in body["devices"]] == [("blk0", 1, 2), ("net0", 2, 3),
                                                                                ("blk1", 3, 1)]
    json.dumps(body)  # all of it JSON


def test_counters(vm):
    _, routes = vm
    status, body = ask(routes, "GET", "/vm/counters")
    assert status == 200
    assert body["devices"]["net0"] == {"type": "virtio-net", "requests": 6, "bytes": 8192, "errors": 0,
                                       "notifications": 4, "interrupts": 2}
    assert body["vcpus"]["1"] == {"exits": 7, "by_kind": {"io-out": 5, "hlt": 2}}


def test_pause_and_resume(vm):
    machine, routes = vm
    assert ask(routes, "PUT", "/vm/pause") == (200, {"state": "paused"})
    status, body = ask(routes, "PUT", "/vm/pause")
    assert status == 409 and "paused" in body["error"]
    assert ask(routes, "PUT", "/vm/resume") == (200, {"state": "running"})
    assert ask(routes, "PUT", "/vm/resume")[0] == 409


def test_shutdown_reboot_kill(vm):
    machine, routes = vm
    assert ask(routes, "PUT", "/vm/shutdown")[0] == 202
    assert ask(routes, "PUT", "/vm/reboot")[0] == 202
    machine.state = "paused"
    assert ask(routes, "PUT", "/vm/shutdown")[0] == 409  # a paused guest cannot act on the button
    assert ask(routes, "PUT", "/vm/kill") == (200, {"state": "stopping"})
    assert machine.calls == ["shutdown", "reboot", "kill"]


def test_shutdown_of_a_guest_that_cannot_hear_the_power_button_is_409():
    machine = FakeMachine(hears_the_button=False)
    status, body = ask(Routes(lambda: machine, name="t"), "PUT", "/vm/shutdown")
    assert status == 409 and "power button" in body["error"]


def test_balloon(vm):
    machine, routes = vm
    assert ask(routes, "PUT", "/vm/balloon", {"target": 1 << 20}) == (200, {"target": 1 << 20, "actual": 0})
    assert ask(routes, "GET", "/vm/balloon") == (200, {"target": 1 << 20, "actual": 0})
    for bad in ({"target": -1}, {"target": True}, {"target": "1M"}, {"target": 1.5}, {}, {"target": 1, "x": 2},
                [1], b"{nope"):
        assert ask(routes, "PUT", "/vm/balloon", bad)[0] == 400, bad
    assert ask(routes, "PUT", "/vm/balloon", {"target": 1 << 40})[0] == 400  # the machine refuses it
    assert machine.target == 1 << 20


def test_no_balloon_is_404():
    machine = FakeMachine(balloon=False)
    routes = Routes(lambda: machine, name="t")
    assert ask(routes, "GET", "/vm/balloon")[0] == 404
    assert ask(routes, "PUT", "/vm/balloon", {"target": 0})[0] == 404


def test_unknown_paths_and_methods(vm):
    _, routes = vm
    assert ask(routes, "GET", "/nope")[0] == 404
    assert ask(routes, "GET", "/vm/pause")[0] == 405
    assert ask(routes, "DELETE", "/vm")[0] == 405
    assert ask(routes, "GET", "/vm/")[0] == 200  # a trailing slash is the same path


def test_between_two_boots_is_503():
    routes = Routes(lambda: None, name="t")
    assert ask(routes, "GET", "/vm")[0] == 503
