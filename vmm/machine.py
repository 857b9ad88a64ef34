"""One VM, assembled from a VmConfig (vmm/config): memory, vCPUs, buses, devices; its lifecycle.

    cfg = VmConfig(kernel="vmlinuz", initrd="initrd", cmdline="console=ttyS0", cpus=2)
    status = Machine(cfg).run()      # blocks until the guest powers off or the VM is stopped

    with Machine(cfg) as vm:         # or: the VM runs while the caller goes on (the Python API)
        vm.wait_for("PYVMM-READY", timeout=60)
        status, output = vm.run("uname -r")
        vm.pause(); vm.resume(); vm.counters()
        vm.stop()
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import threading
import time

from kernel import cpuid as cpuid_mod
from kernel.layout import IDENTITY_MAP_ADDR, VMX_TSS_ADDR
from kernel.loads import BackgroundLoads
from kernel.x86 import BOOT_MSRS, lapic_for_boot
from .boot import BootPlan, acpi_config, boot_firmware, boot_program, finish_linux
from .bus import Bus
from .config import DEFAULT_BOOT_ORDER, ConfigError, VmConfig, boot_slots
from .console import OutputSink, TerminalInput
from .devices.cmos import BASE_PORT as CMOS_BASE, PORT_RANGE_SIZE as CMOS_SIZE, CmosRtc
from .devices.acpi_pm import RESET_PORT, SLEEP_CONTROL_PORT, AcpiSleepDevice
from .devices import ged
from .devices.i8042 import BASE_PORT as I8042_BASE, PORT_RANGE_SIZE as I8042_SIZE, I8042
from .devices.serial import REGISTER_COUNT as SERIAL_PORTS, Serial16550
from .early import EarlyLinux, start_linux, wants_early_linux
from .kvm import Kvm
from .kvm import structs as s
from .irq import IrqRouter
from .lifecycle import Lifecycle
from .long_mode import set_long_mode
from .machine_api import PythonApi
from .pci.config import DEVICE_ID, VENDOR_ID, patch_rom_ids
from .pci.host import PciHost
from .pci.layout import DEFAULT_LAYOUT
from .guest_console import GuestConsole
from .memory import GuestMemory
from .shutdown import GracefulStop
from .pause import PauseGate
from .vcpu import KICK_SIGNAL, VcpuThread
from .virtio_devices import build_balloon, build_console, build_disk, build_net, build_rng, build_vsock

log = logging.getLogger(__name__)

COM1_PORT, COM1_IRQ = 0x3F8, 4
PAUSE_TIMEOUT = 5.0  # seconds for every vCPU to leave KVM_RUN on a pause


class VmStateError(Exception):
    """A request the VM's state does not allow now (pause a paused VM, resume a running one...)."""

class Machine(PythonApi):
    def __init__(self, config: VmConfig, *, kvm: Kvm | None = None, console_out=None, console_in: int | None = None,
                 early: EarlyLinux | None = None):
        """`early`: guest RAM with this configuration's kernel on its way in (vmm/early.py), which the
        Machine takes over; for a direct Linux boot without one, the Machine starts it first thing."""
        if early is None and wants_early_linux(config):
            early = start_linux(config)
        try:
            self._assemble(config, kvm, console_out, console_in, early)
        except BaseException:
            if early is not None:
                early.abandon()
            raise

    def _assemble(self, config: VmConfig, kvm: Kvm | None, console_out, console_in: int | None,
                  early: EarlyLinux | None) -> None:
        self.config = config
        self._early = early
        self.lifecycle = Lifecycle()
        self.kvm = kvm or Kvm()
        self.firmware = None
        if config.firmware is not None:
            from .firmware.image import load_firmware  # (vmm/firmware is loaded for a firmware boot alone)

            self.firmware = load_firmware(config.firmware or None)
        self._firmware_mapping = None
        self._debugcon = self._debugcon_close = None
        self.vm = self.kvm.create_vm()
        if self.firmware is not None:  # the TSS pages go below the image, wherever it starts
            self.vm.set_tss_addr(self.firmware.tss_addr)
            self.vm.set_identity_map_addr(self.firmware.identity_map_addr)
        else:
            self.vm.set_tss_addr(VMX_TSS_ADDR)
            self.vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
        self.vm.create_irqchip()
        self.vm.create_pit2(s.KVM_PIT_SPEAKER_DUMMY)

        self.mem = early.mem if early is not None else GuestMemory(config.mem_size)
        for slot, region in enumerate(self.mem.regions):
            self.vm.set_user_memory_region(slot, region.gpa, region.size, self.mem.host_address(region))
        if self.firmware is not None:
            from .firmware.image import FIRMWARE_PCI_LAYOUT

            self.pci_layout = FIRMWARE_PCI_LAYOUT
        else:
            self.pci_layout = early.pci_layout if early is not None else DEFAULT_LAYOUT
        self.vcpus = [self.vm.create_vcpu(i) for i in range(config.cpus)]
        self.notes: list[str] = []  # things the user should know, printed once by the CLI
        self.signals: list[int] = []  # the stop signals run() received, also those after the VM had ended
        clear = self._configure_cpuid()
        self._console_sink = console_out or self._make_sink(config.console)
        self.console = GuestConsole(self._console_sink)  # what the guest wrote, for the Python API
        self._console_in = console_in
        # A kernel has been loading since the start, into guest RAM in the background (vmm/early.py);
        # firmware (fw_cfg describes the devices) and programs are loaded once the devices are there.
        self._loads = early.loads if early is not None else BackgroundLoads()
        extra = f" clearcpuid={','.join(clear)}" if clear else ""
        self.plan = self._boot(extra) if self.firmware is None and not config.program else None
        try:
            self._add_devices()
        except BaseException:
            self._loads.wait(raise_errors=False)
            raise
        self._loads.wait()
        if self.plan is None:
            self.plan = self._boot(extra)
        self._configure_vcpus()
        # Firmware may need an instruction that an emulating KVM lacks completed for it.
        fixup = None
        if self.firmware is not None:
            from .firmware.iret import ProtectedModeIret

            fixup = ProtectedModeIret(self.mem)
        self.exit_stats = None  # --stats: each vCPU's exit profile, read once the vCPU threads have ended
        if config.stats:
            from .exit_stats import VcpuExitStats  # loaded only then: a plain start stays lean

            self.exit_stats = [VcpuExitStats(v.id) for v in self.vcpus]
        self.gate = PauseGate()
        self._state_lock = threading.Lock()  # one pause or resume at a time
        self._paused_clock: int | None = None  # kvm-clock when paused, given back on resume
        self.started_at: float | None = None  # time.monotonic() of start()
        self.paused_seconds = 0.0  # time spent paused, over the VM's life
        self._paused_at: float | None = None
        self.threads = [VcpuThread(v, pio=self.pio, mmio=self.mmio, mem=self.mem, lifecycle=self.lifecycle,
                                   gate=self.gate, on_exit=fixup, stats=self.exit_stats[i] if self.exit_stats else None)
                        for i, v in enumerate(self.vcpus)]
        self.lifecycle.on_stop(self._kick_all)
        self.lifecycle.on_stop(self.gate.wake)
        self.console.connect_input(self._console_feed())
        self.graceful_stop = GracefulStop(config.shutdown_timeout, request=self.request_shutdown,
                                          stop=lambda message: self.lifecycle.stop(0, message))
        self._repoll_fd = -1  # while run() runs: wakes the main loop to look at graceful_stop's deadline

    # -- assembly -------------------------------------------------------------------
    def _add_devices(self) -> None:
        """The firmware's mapping, the platform devices on the buses, the PCI host and the virtio
        devices of the configuration."""
        config = self.config
        if self.firmware is not None:
            from .firmware.image import FirmwareMapping
            from .kvm import constants as kc

            self._firmware_mapping = FirmwareMapping(self.firmware)
            self._firmware_mapping.map(self.vm, len(self.mem.regions),
                                       readonly=bool(self.kvm.check_extension(kc.KVM_CAP_READONLY_MEM)))

        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        self.serial = Serial16550(output=self.console, set_irq=lambda level: self.vm.irq_line(COM1_IRQ, level))
        self.pio.register(COM1_PORT, SERIAL_PORTS, self.serial, "serial")
        self.pio.register(I8042_BASE, I8042_SIZE, I8042(on_reset=self.lifecycle.reset), "i8042")
        low, high = self.mem.regions[0].size, sum(r.size for r in self.mem.regions[1:])
        self.pio.register(CMOS_BASE, CMOS_SIZE, CmosRtc(mem_below_4g=low, mem_above_4g=high), "cmos")
        self.pio.register(SLEEP_CONTROL_PORT, RESET_PORT - SLEEP_CONTROL_PORT + 1,
                          AcpiSleepDevice(on_poweroff=self.lifecycle.power_off, on_reset=self.lifecycle.reset),
                          "acpi-pm")
        self.ged = ged.GenericEventDevice(set_irq=lambda level: self.vm.irq_line(ged.GSI, level))
        self.pio.register(ged.SELECTOR_PORT, ged.SELECTOR_SIZE, self.ged, "ged")

        self.fw_cfg = None
        if self.firmware is not None:
            self._add_firmware_devices()

        self.irq = IrqRouter(self.vm)
        self.pci = PciHost(pio=self.pio, mmio=self.mmio, layout=self.pci_layout, on_reset=self.lifecycle.reset)
        self.disks, self.nets = [], []
        self.console_device = None  # virtio-console, with --console-device virtio or a --port
        self.disk_slots, self.net_slots = [], []  # PCI slot of each, in command-line order
        self.rng = self.balloon = None
        self.vsock = None
        try:
            for spec in config.disks:
                self.disks.append(self._add_disk(spec))
            for spec in config.nets:
                self.nets.append(self._add_net(spec))
            self.console_device = self._add_console() if config.console_device == "virtio" or config.ports else None
            if config.rng is not None:
                self.rng = self._add_virtio(build_rng(self.mem, config.rng))
            if config.balloon is not None:
                self.balloon = self._add_virtio(build_balloon(self.mem, config.balloon))
            self.vsock = self._add_vsock(config.vsock) if config.vsock is not None else None
        except BaseException:
            self._close_devices()
            raise

    @staticmethod
    def _make_sink(console: str):
        if console == "stdio":
            return OutputSink(1)
        if console.startswith("file:"):
            try:
                return OutputSink.to_file(console[5:])
            except OSError as e:
                raise ConfigError(f"--console {console}: {e.strerror}") from None
        if console == "none":
            return lambda data: None
        raise ValueError(f"unknown console {console!r}")

    def _add_disk(self, spec):
        """A virtio-blk-pci device for one --disk; queues default to one per vCPU."""
        from virtio.pci import VirtioPciDevice  # (loaded with the first virtio device)

        dev = build_disk(self.mem, spec, default_queues=self.config.cpus)
        try:
            # With firmware, devices start as after a reset: decode off, the BIOS places and enables them.
            self.disk_slots.append(self.pci.add_device(VirtioPciDevice(dev, irq=self.irq, vm=self.vm),
                                                       enable=self.firmware is None))
        except BaseException:
            dev.close()
            raise
        return dev

    def _add_net(self, spec):
        """A virtio-net-pci device on a tap for one --net; queue pairs default to one per vCPU.
        It carries an expansion ROM: rom=PATH, or with firmware boot iPXE's (when installed)."""
        rom = self._net_rom(spec)
        from virtio.pci import VirtioPciDevice

        dev = build_net(self.mem, spec, vm_id=self.config.name, default_queues=self.config.cpus)
        try:
            pci_dev = VirtioPciDevice(dev, irq=self.irq, vm=self.vm)
            if rom is not None:
                config = pci_dev.config
                config.add_expansion_rom(patch_rom_ids(rom, config.get(VENDOR_ID, 2), config.get(DEVICE_ID, 2)))
            self.net_slots.append(self.pci.add_device(pci_dev, enable=self.firmware is None))
        except BaseException:
            dev.close()
            raise
        return dev

    def _add_console(self):
        """The virtio-console-pci device: the console on port 0 with --console-device virtio (the
        serial port's input then goes nowhere), and the --port ports."""
        virtio_console = self.config.console_device == "virtio"
        return self._add_virtio(build_console(self.mem, self.config.ports,
                                              self.console if virtio_console else None))

    def _add_vsock(self, spec):
        """The virtio-vsock-pci device of --vsock, listening at its socket from now on."""
        try:
            dev = build_vsock(self.mem, spec)
        except OSError as e:
            raise ConfigError(f"--vsock socket {spec.socket}: {e.strerror or e}") from None
        return self._add_virtio(dev)

    def _add_virtio(self, dev):
        """A virtio-pci function for a device that needs nothing else (--rng, --balloon, --vsock...)."""
        from virtio.pci import VirtioPciDevice

        try:
            self.pci.add_device(VirtioPciDevice(dev, irq=self.irq, vm=self.vm), enable=self.firmware is None)
        except BaseException:
            dev.close()
            raise
        return dev

    def _console_feed(self):
        """Where the console's input goes: hvc0 with --console-device virtio, else the serial port."""
        if self.console_device is not None and self.console_device.ports[0] is not None:
            return self.console_device.ports[0].backend.feed
        return self.serial.feed

    # -- the balloon while the VM runs (from any thread: the management API, vmm/api/routes.py) --
    def set_balloon_target(self, size: int) -> None:
        """Ask the guest to give `size` bytes of its RAM back (0: all of it to the guest); raises
        ValueError without --balloon or for more than the guest's RAM."""
        if self.balloon is None:
            raise ValueError("this VM has no balloon (--balloon)")
        self.balloon.set_target(size)

    def balloon_info(self) -> dict:
        """target and actual (bytes the guest holds in the balloon), bytes inflated, deflated and
        reported free so far, and the guest's last statistics (with `updates`, their times)."""
        if self.balloon is None:
            raise ValueError("this VM has no balloon (--balloon)")
        return {**self.balloon.counter_detail(), "stats": self.balloon.stats()}

    # -- a graceful stop (from any thread: the management API, SIGTERM) --
    def request_shutdown(self) -> bool:
        """Ask the guest to power off: press its ACPI power button (a Generic Event Device,
        vmm/devices/ged.py; the kit's /init acts on it).  Returns whether the guest was asked: not
        when it cannot hear it (a --program guest has no ACPI) or the VM is already stopping.  The
        guest decides what to do; pyvmm ends when it powers off."""
        if self.config.program or self.lifecycle.stopping:
            return False
        try:
            self.ged.press_power_button()
        except OSError:  # the VM was closed meanwhile
            return False
        return True

    def _net_rom(self, spec) -> bytes | None:
        from .firmware.image import DEFAULT_NET_ROM, load_rom

        rom = getattr(spec, "rom", None)
        if rom == "off":
            return None
        if rom is not None:
            return load_rom(rom, "--net rom")
        if self.firmware is not None and os.path.isfile(DEFAULT_NET_ROM):
            return load_rom(DEFAULT_NET_ROM, "--net rom")
        return None

    def _add_firmware_devices(self) -> None:
        """fw_cfg (filled in _boot_firmware, once the PCI slots are known), the PM1 blocks of the full
        FADT a firmware boot gets (kernel/acpi.py says why), and the debug console."""
        from .devices import acpi_pm1
        from .devices.fw_cfg import BASE_PORT as FW_CFG_BASE, PORT_RANGE_SIZE as FW_CFG_SIZE, FwCfg
        from .firmware.debugcon import DEBUGCON_PORT, DebugConsole, debug_sink

        pm1 = acpi_pm1.Pm1Control(on_poweroff=self.lifecycle.power_off)
        self.pio.register(acpi_pm1.CONTROL_PORT, acpi_pm1.CONTROL_SIZE, pm1, "acpi-pm1")
        self.pio.register(acpi_pm1.EVENT_PORT, acpi_pm1.EVENT_SIZE, pm1.event, "acpi-pm1-event")
        self.fw_cfg = FwCfg(self.mem)
        self.pio.register(FW_CFG_BASE, FW_CFG_SIZE, self.fw_cfg, "fw-cfg")
        sink = debug_sink(self.config.firmware_log)
        if sink is not None:
            write, self._debugcon_close = sink
            self._debugcon = DebugConsole(write)
            self.pio.register(DEBUGCON_PORT, 1, self._debugcon, "debugcon")

    def _boot_firmware(self) -> BootPlan:
        from .firmware.fw_cfg import bootorder_paths, firmware_e820, setup_fw_cfg
        from .firmware.image import FirmwareError

        c = self.config
        layout = self.pci.layout
        e820 = firmware_e820(self.mem.regions, layout.e820_reserved() + self.firmware.e820_reserved())
        order = c.boot_order if c.boot_order is not None else DEFAULT_BOOT_ORDER
        try:
            entries = boot_slots(order, self.disk_slots, self.net_slots)
        except ConfigError as e:
            raise FirmwareError(str(e)) from None
        from kernel import acpi

        tables = acpi.build_tables(acpi_config(c.cpus, layout.acpi_config(), pc_platform=True))
        setup_fw_cfg(self.fw_cfg, mem=self.mem, cpus=c.cpus, e820=e820, acpi_tables=tables,
                     bootorder=bootorder_paths(entries) if entries else None,
                     serial_port=COM1_PORT, mmio64_start=layout.mmio64_window[0])
        return boot_firmware(self.mem, self.firmware)

    def _boot(self, extra_cmdline: str = "") -> BootPlan:
        c = self.config
        if self.firmware is not None:
            return self._boot_firmware()
        if c.program:
            top = max(r.end for r in self.mem.regions)
            return boot_program(self.mem, program=c.program, cpus=c.cpus, map_size=max(top, 4 << 30))
        return finish_linux(self.mem, self._early.linux, cpus=c.cpus, pci=self.pci_layout.acpi_config(),
                            cmdline=c.cmdline + extra_cmdline if extra_cmdline else None)

    def cpuid_mask(self) -> tuple[str, ...]:
        """The features hidden from the guest: as configured, else (automatic) what an emulating
        KVM cannot run, when a kernel will run in guest kernel mode."""
        if self.config.cpuid_mask is not None:
            return self.config.cpuid_mask
        if self.config.program:
            return ()
        native = self.config.kernel_mode_native
        if native is None:
            from .hostcheck import kernel_mode_native

            native = kernel_mode_native(self.kvm)
        return () if native else cpuid_mod.EMULATOR_MASK

    def _configure_cpuid(self) -> tuple[str, ...]:
        """Give each vCPU its CPUID; return the masked features KVM left visible anyway."""
        supported = [cpuid_mod.CpuidEntry(*e) for e in self.kvm.supported_cpuid()]
        mask = self.cpuid_mask()
        for i, vcpu in enumerate(self.vcpus):
            vcpu.set_cpuid(cpuid_mod.vcpu_cpuid(supported, vcpu_index=i, num_cpus=self.config.cpus, mask=mask))
        if not mask:
            return ()
        held = [cpuid_mod.CpuidEntry(*e) for e in self.vcpus[0].get_cpuid()]
        visible = cpuid_mod.features_still_visible(held, mask)
        if visible and self.firmware is not None:
            self.notes.append(f"this KVM keeps {', '.join(visible)} visible despite the CPUID mask; "
                              f"a kernel started by the firmware needs clearcpuid={','.join(visible)}")
            return ()
        if visible and not self.config.program:
            self.notes.append(f"this KVM keeps {', '.join(visible)} visible despite the CPUID mask; "
                              f"added clearcpuid={','.join(visible)} to the kernel command line")
        return visible if not self.config.program else ()

    def _configure_vcpus(self) -> None:
        if self.plan.firmware is not None:
            return  # KVM's reset state: vCPU 0 at the reset vector, the others waiting for INIT/SIPI
        for i, vcpu in enumerate(self.vcpus):
            vcpu.set_msrs(BOOT_MSRS)
            vcpu.set_lapic(lapic_for_boot(vcpu.get_lapic(), enable=self.plan.user_mode))
            if i < len(self.plan.states):
                set_long_mode(vcpu, self.plan.states[i])
                if i > 0:
                    vcpu.set_mp_state(s.KVM_MP_STATE_RUNNABLE)

    # -- running ------------------------------------------------------------------------
    def _kick_all(self) -> None:
        for t in self.threads:
            t.kick()

    def start(self) -> None:
        """Start the vCPU threads (the first time in a process: from the main thread, which alone
        may install the kick signal's handler)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(KICK_SIGNAL, lambda *_: None)
        elif signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
            raise RuntimeError("start the first VM of a process from its main thread (the vCPU kick signal)")
        self.started_at = time.monotonic()
        for t in self.threads:
            t.start()

    # -- pause and resume (from any thread but a vCPU's) -------------------------------------
    @property
    def state(self) -> str:
        """created (not started), running, paused or stopping."""
        if self.lifecycle.stopping:
            return "stopping"
        if self.started_at is None:
            return "created"
        return "paused" if self.gate.closed else "running"

    def uptime(self) -> float:
        """Seconds since start() (0 before), paused time included."""
        return 0.0 if self.started_at is None else time.monotonic() - self.started_at

    def paused_time(self) -> float:
        """Seconds spent paused over the VM's life, the pause now going on included."""
        at = self._paused_at
        return self.paused_seconds + (time.monotonic() - at if at is not None else 0.0)

    def pause(self, timeout: float = PAUSE_TIMEOUT) -> None:
        """Stop every vCPU: each is kicked out of KVM_RUN and parks until resume(); kvm-clock is
        read once they all stand still, so the guest's clock does not move while paused.
        Raises VmStateError unless running."""
        with self._state_lock:
            state = self.state
            if state != "running":
                raise VmStateError(f"cannot pause a VM that is {state}")
            self.gate.close()
            self._kick_all()
            if not self.gate.wait_parked(lambda: sum(t.is_alive() for t in self.threads), timeout):
                self.gate.open()
                raise VmStateError(f"the vCPUs did not stop within {timeout:g} s")
            if self.lifecycle.stopping:
                self.gate.open()
                raise VmStateError("the VM stopped while being paused")
            self._paused_clock = self.vm.get_clock()
            self._paused_at = time.monotonic()

    def resume(self) -> None:
        """Let the vCPUs run again, kvm-clock going on from where the pause left it (and each
        vCPU's guest told it was stopped: KVM_KVMCLOCK_CTRL).  Raises VmStateError unless paused."""
        with self._state_lock:
            state = self.state
            if state != "paused":
                raise VmStateError(f"cannot resume a VM that is {state}")
            self.vm.set_clock(self._paused_clock)
            for v in self.vcpus:
                v.kvmclock_ctrl()
            self.paused_seconds += time.monotonic() - self._paused_at
            self._paused_at = None
            self.gate.open()

    def request_reboot(self) -> None:
        """Reset the VM and boot it again, whatever --on-reboot says (the API's reboot)."""
        self.lifecycle.reset(restart=True)

    def kill(self, message: str = "stopped by the API") -> None:
        """Stop the VM now, whatever the guest is doing (exit status 0, as a SIGTERM)."""
        self.lifecycle.stop(0, message)

    def run(self, command: str | None = None, *, timeout: float = 60.0, on_started=None):
        """Without a command, what `pyvmm run` does: run the VM until the guest powers off, resets,
        or we are told to stop (blocking; the exit status); `on_started()` is called once the vCPUs
        run (an exception from it stops the VM and is raised).  With one, inside `with Machine(...)
        as vm:`, run it in the kit guest's shell: (exit status, output) (run_command)."""
        if command is not None:
            return self.run_command(command, timeout)
        self._repoll_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            self.start()
            if on_started is not None:
                on_started()
            self._main_loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.lifecycle.stop(0)
            for t in self.threads:
                t.join(timeout=5)
            os.close(self._repoll_fd)
            self._repoll_fd = -1
        return self.lifecycle.exit_code or 0

    def _on_signal(self, signum, _frame) -> None:
        self.signals.append(signum)  # (a guest reset may have ended the VM first: the caller must still stop)
        if signum == signal.SIGTERM:  # --shutdown-timeout: the guest may be asked first
            self.graceful_stop.on_sigterm()
            os.eventfd_write(self._repoll_fd, 1)  # the main loop's epoll then takes the deadline
            return
        self.lifecycle.stop(0 if signum != signal.SIGHUP else 1, f"stopped by {signal.Signals(signum).name}")

    def _main_loop(self) -> None:
        ep = select.epoll()
        ep.register(self.lifecycle.wake_fd, select.EPOLLIN)
        ep.register(self._repoll_fd, select.EPOLLIN)
        term = None
        if self._console_in is not None:
            try:  # a regular file or /dev/null cannot be polled: then there is no console input
                ep.register(self._console_in, select.EPOLLIN)
            except PermissionError:
                self._console_in = None
        if self._console_in is not None:
            term = TerminalInput(self._console_in, feed=self._console_feed(),
                                 quit=lambda: self.lifecycle.stop(0, "quit from the console"), echo=self._console_sink)
            os.set_blocking(self._console_in, False)
        try:
            with term if term is not None else contextlib.nullcontext():
                while not self.lifecycle.stopping:
                    timeout = self.graceful_stop.poll_timeout()
                    for fd, _ in ep.poll(-1 if timeout is None else timeout):
                        if fd == self._repoll_fd:
                            os.eventfd_read(self._repoll_fd)
                        elif term is not None and fd == self._console_in:
                            term.on_readable()
                            if term.eof:
                                ep.unregister(fd)
                    self.graceful_stop.check()
        finally:
            ep.close()
            if self._console_in is not None:
                try:
                    os.set_blocking(self._console_in, True)
                except OSError:
                    pass

    def _close_devices(self) -> None:
        self.pci.close()  # closes each device: I/O threads joined, ioeventfds removed, images unlocked
        self.disks, self.nets = [], []
        self.rng = self.balloon = None
        self.irq.close()

    def close(self) -> None:
        self._close_devices()
        for v in self.vcpus:
            v.close()
        self.vm.close()
        if self._firmware_mapping is not None:
            self._firmware_mapping.close()
        if self._debugcon is not None:
            self._debugcon.flush()
            self._debugcon_close()
        self.mem.close()
        self.lifecycle.close()
        if isinstance(self._console_sink, OutputSink):
            self._console_sink.close()
