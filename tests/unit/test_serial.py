"""The 16550A UART, driven the way Linux's 8250 driver drives it."""

from __future__ import annotations

import threading

import pytest

from vmm.devices.serial import (
    DLL,
    DLM,
    FCR,
    FCR_FIFO_ENABLE,
    FCR_RCVR_FIFO_RESET,
    FCR_XMIT_FIFO_RESET,
    IER,
    IER_EDSSI,
    IER_ELSI,
    IER_ERBFI,
    IER_ETBEI,
    IIR,
    IIR_FIFOS_ENABLED,
    IIR_MODEM_STATUS,
    IIR_NO_INT,
    IIR_RDA,
    IIR_RLS,
    IIR_THRE,
    LCR,
    LCR_DLAB,
    LSR,
    LSR_DR,
    LSR_OE,
    LSR_TEMT,
    LSR_THRE,
    MCR,
    MCR_DTR,
    MCR_LOOP,
    MCR_OUT1,
    MCR_OUT2,
    MCR_RTS,
    MSR,
    MSR_CTS,
    MSR_DCD,
    MSR_DCTS,
    MSR_DDCD,
    MSR_DDSR,
    MSR_DSR,
    MSR_RI,
    MSR_TERI,
    RBR,
    RX_BUFFER_SIZE,
    SCR,
    THR,
    Serial16550,
)

LCR_8N1 = 0x03  # UART_LCR_WLEN8


class Harness:
    """A UART wired to a byte sink and an IRQ-line recorder."""

    def __init__(self, **kwargs) -> None:
        self.sent = bytearray()
        self.irq_calls: list[bool] = []
        self.uart = Serial16550(self.sent.extend, self.irq_calls.append, **kwargs)

    def inb(self, reg: int) -> int:
        return self.uart.read(reg, 1)

    def outb(self, reg: int, value: int) -> None:
        self.uart.write(reg, 1, value)

    @property
    def irq(self) -> bool:
        return self.irq_calls[-1] if self.irq_calls else False

    def iir_id(self) -> int:
        return self.inb(IIR) & 0x0F


@pytest.fixture
def h() -> Harness:
    return Harness()


def linux_autoconfig(h: Harness) -> str:
    """The register dance of Linux's 8250 autoconfig() and autoconfig_16550a()."""
    # IER test: the low four bits must stick, and clear.
    saved_ier = h.inb(IER)
    h.outb(IER, 0)
    scratch2 = h.inb(IER) & 0x0F
    h.outb(IER, 0x0F)
    scratch3 = h.inb(IER) & 0x0F
    h.outb(IER, saved_ier)
    if scratch2 != 0 or scratch3 != 0x0F:
        return "IER test failed"

    save_mcr = h.inb(MCR)
    save_lcr = h.inb(LCR)

    # Loopback test: RTS|OUT2 must show up as CTS|DCD.
    h.outb(MCR, MCR_LOOP | 0x0A)
    status1 = h.inb(MSR) & 0xF0
    h.outb(MCR, save_mcr)
    if status1 != 0x90:
        return "LOOP test failed"

    # Clear a would-be EFR (an FCR write with LCR=0xBF), then look at IIR[7:6].
    h.outb(LCR, 0xBF)
    h.outb(FCR, 0)
    h.outb(LCR, 0)
    h.outb(FCR, FCR_FIFO_ENABLE)
    kind = h.inb(IIR) >> 6
    if kind != 3:
        return {0: "8250/16450", 1: "unknown", 2: "16550"}[kind]

    # autoconfig_16550a(): rule out the enhanced variants.
    h.outb(LCR, LCR_DLAB)  # ST16C650V1: EFR reads 0 with DLAB set
    if h.inb(2) == 0:
        return "ST16C650V1"
    h.outb(LCR, 0xBF)  # 16650 and later: EFR reads 0 with LCR=0xBF
    if h.inb(2) == 0:
        return "16650"
    h.outb(LCR, LCR_DLAB)  # 16750: the 64-byte FIFO bit sticks with DLAB set
    h.outb(FCR, FCR_FIFO_ENABLE | 0x20)
    status1 = h.inb(IIR) & 0xE0
    h.outb(FCR, FCR_FIFO_ENABLE)
    h.outb(LCR, 0)
    h.outb(FCR, FCR_FIFO_ENABLE | 0x20)
    status2 = h.inb(IIR) & 0xE0
    h.outb(FCR, FCR_FIFO_ENABLE)
    if status1 == 0xC0 and status2 == 0xE0:
        return "16750"
    iersave = h.inb(IER)  # XScale: IER bit 6 (UUE) sticks
    h.outb(IER, iersave | 0x40)
    sticky = h.inb(IER) & 0x40
    h.outb(IER, iersave)
    if sticky:
        return "XScale"
    h.outb(LCR, save_lcr)
    return "16550A"


def test_linux_autoconfig_detects_a_16550a(h: Harness) -> None:
    assert linux_autoconfig(h) == "16550A"
    assert h.sent == b""
    assert h.irq_calls == []


def test_scratch_register_holds_any_value(h: Harness) -> None:
    for value in (0x00, 0x55, 0xAA, 0xFF):
        h.outb(SCR, value)
        assert h.inb(SCR) == value


def test_dlab_selects_the_divisor_latch(h: Harness) -> None:
    h.outb(IER, IER_ERBFI)
    h.outb(LCR, LCR_DLAB | LCR_8N1)
    h.outb(DLL, 0x01)  # 115200 baud
    h.outb(DLM, 0x00)
    assert (h.inb(DLL), h.inb(DLM)) == (0x01, 0x00)
    h.outb(LCR, LCR_8N1)
    assert h.inb(LCR) == LCR_8N1
    assert h.inb(IER) == IER_ERBFI  # IER was not touched by the DLM write
    assert h.sent == b""  # the DLL write was not a transmission
    h.outb(LCR, LCR_DLAB)
    assert (h.inb(DLL), h.inb(DLM)) == (0x01, 0x00)


def test_ier_reserved_bits_read_zero(h: Harness) -> None:
    h.outb(IER, 0xFF)
    assert h.inb(IER) == 0x0F


def test_fifo_enable_shows_in_iir_bits_7_6(h: Harness) -> None:
    assert h.inb(IIR) == IIR_NO_INT
    h.outb(FCR, FCR_FIFO_ENABLE)
    assert h.inb(IIR) == IIR_FIFOS_ENABLED | IIR_NO_INT
    h.outb(FCR, 0)
    assert h.inb(IIR) == IIR_NO_INT


# --- transmit -------------------------------------------------------------


def test_tx_bytes_reach_the_sink_in_order(h: Harness) -> None:
    h.outb(LCR, LCR_8N1)
    message = b"Linux version 6.x\r\nttyS0 at I/O 0x3f8\r\n"
    for byte in message:
        assert h.inb(LSR) & LSR_THRE  # the console's wait_for_xmitr()
        h.outb(THR, byte)
        assert h.inb(LSR) & (LSR_THRE | LSR_TEMT) == LSR_THRE | LSR_TEMT
    assert bytes(h.sent) == message


def test_tx_is_not_masked_by_word_length(h: Harness) -> None:
    h.outb(THR, 0xFF)  # LCR still 0 (5 data bits): passed through anyway
    assert bytes(h.sent) == b"\xff"


def test_thre_interrupt_when_etbei_enabled_and_cleared_by_iir_read(h: Harness) -> None:
    h.outb(MCR, MCR_OUT2)
    assert h.irq_calls == []
    h.outb(IER, IER_ETBEI)
    assert h.irq_calls == [True]
    assert h.inb(IIR) == IIR_THRE  # reading it acknowledges THRE
    assert h.irq_calls == [True, False]
    assert h.inb(IIR) == IIR_NO_INT


def test_reenabling_etbei_raises_thre_again(h: Harness) -> None:
    """serial8250_do_startup()'s check for UARTs that do not reassert THRE."""
    h.outb(IER, IER_ETBEI)
    iir1 = h.inb(IIR)
    h.outb(IER, 0)
    h.outb(IER, IER_ETBEI)
    iir2 = h.inb(IIR)
    h.outb(IER, 0)
    assert iir1 & 0x0F == IIR_THRE
    assert iir2 & 0x0F == IIR_THRE


def test_writing_ier_again_does_not_re_raise_thre(h: Harness) -> None:
    h.outb(IER, IER_ETBEI)
    assert h.iir_id() == IIR_THRE
    h.outb(IER, IER_ETBEI | IER_ERBFI)  # ETBEI already on: no new THRE
    assert h.iir_id() == IIR_NO_INT


def test_thr_write_acknowledges_thre_and_the_drained_transmitter_raises_it_again(
    h: Harness,
) -> None:
    h.outb(MCR, MCR_OUT2)
    h.outb(IER, IER_ETBEI)
    h.outb(THR, ord("a"))  # acknowledges the pending THRE; sent at once ...
    assert h.irq_calls == [True]  # ... so THRE is pending again, no extra edge
    assert h.inb(IIR) == IIR_THRE
    assert h.irq_calls == [True, False]
    h.outb(THR, ord("b"))  # a fresh THRE once the byte has gone
    assert h.irq_calls == [True, False, True]
    assert bytes(h.sent) == b"ab"


def test_linux_interrupt_driven_tx_loop(h: Harness) -> None:
    """serial8250_handle_irq(): IIR, LSR, up to 16 bytes to THR; stop_tx at the end."""
    h.outb(FCR, FCR_FIFO_ENABLE)
    h.outb(MCR, MCR_OUT2 | MCR_RTS | MCR_DTR)
    pending = bytearray(b"x" * 40 + b"\n")
    h.outb(IER, IER_ERBFI | IER_ETBEI)  # start_tx
    interrupts = 0
    while h.irq:
        interrupts += 1
        assert h.inb(IIR) == IIR_FIFOS_ENABLED | IIR_THRE
        assert h.inb(LSR) & LSR_THRE
        for _ in range(16):
            if not pending:
                break
            h.outb(THR, pending.pop(0))
        if not pending:
            h.outb(IER, IER_ERBFI)  # __stop_tx
        assert interrupts < 10
    assert bytes(h.sent) == b"x" * 40 + b"\n"
    assert interrupts == 3
    assert h.inb(IIR) == IIR_FIFOS_ENABLED | IIR_NO_INT


def test_disabling_etbei_drops_the_line(h: Harness) -> None:
    h.outb(MCR, MCR_OUT2)
    h.outb(IER, IER_ETBEI)
    h.outb(IER, 0)
    assert h.irq_calls == [True, False]
    assert h.inb(IIR) == IIR_NO_INT


# --- the IRQ line -----------------------------------------------------------


def test_out2_gates_the_irq_line(h: Harness) -> None:
    h.outb(IER, IER_ETBEI)
    assert h.irq_calls == []  # pending, but OUT2 is clear
    assert h.uart.irq_asserted is False
    h.outb(MCR, MCR_OUT2)
    assert h.irq_calls == [True]
    assert h.uart.irq_asserted is True
    h.outb(MCR, MCR_DTR | MCR_RTS)
    assert h.irq_calls == [True, False]
    assert h.iir_id() == IIR_THRE  # the UART itself still reports it


def test_loopback_keeps_the_irq_line_low(h: Harness) -> None:
    h.outb(MCR, MCR_OUT2)
    h.outb(IER, IER_ETBEI)
    assert h.irq_calls == [True]
    h.outb(MCR, MCR_OUT2 | MCR_LOOP)  # the OUT2 pin is forced inactive
    assert h.irq_calls == [True, False]
    h.outb(MCR, MCR_OUT2)
    assert h.irq_calls == [True, False, True]


def test_set_irq_is_called_only_on_changes(h: Harness) -> None:
    h.outb(MCR, MCR_OUT2)
    h.outb(IER, IER_ERBFI)
    h.uart.feed(b"a")
    h.uart.feed(b"b")
    h.uart.feed(b"c")
    h.inb(LSR)
    h.inb(IIR)
    assert h.irq_calls == [True]
    h.inb(RBR)
    h.inb(RBR)
    assert h.irq_calls == [True]
    h.inb(RBR)
    assert h.irq_calls == [True, False]


# --- receive ----------------------------------------------------------------


def test_rx_feed_sets_dr_raises_interrupt_and_reads_in_order(h: Harness) -> None:
    h.outb(FCR, FCR_FIFO_ENABLE)
    h.outb(MCR, MCR_OUT2)
    h.outb(IER, IER_ERBFI)
    assert h.inb(LSR) & LSR_DR == 0
    assert h.uart.feed(b"ls -l\n") == 6
    assert h.irq_calls == [True]
    assert h.inb(IIR) == IIR_FIFOS_ENABLED | IIR_RDA
    received = bytearray()
    while h.inb(LSR) & LSR_DR:  # serial8250_rx_chars()
        received.append(h.inb(RBR))
    assert bytes(received) == b"ls -l\n"
    assert h.irq_calls == [True, False]
    assert h.inb(IIR) == IIR_FIFOS_ENABLED | IIR_NO_INT


def test_rx_without_erbfi_sets_dr_but_no_interrupt(h: Harness) -> None:
    h.outb(MCR, MCR_OUT2)
    h.uart.feed(b"x")
    assert h.inb(LSR) & LSR_DR
    assert h.inb(IIR) == IIR_NO_INT
    assert h.irq_calls == []
    h.outb(IER, IER_ERBFI)  # enabling it with data waiting raises it
    assert h.irq_calls == [True]


def test_received_data_outranks_thre(h: Harness) -> None:
    h.outb(IER, IER_ERBFI | IER_ETBEI)
    h.uart.feed(b"ab")
    assert h.iir_id() == IIR_RDA
    assert h.iir_id() == IIR_RDA  # reading IIR does not acknowledge RDA
    h.inb(RBR)
    h.inb(RBR)
    assert h.iir_id() == IIR_THRE  # THRE was pending underneath all along
    assert h.iir_id() == IIR_NO_INT


def test_rbr_read_when_empty_returns_zero(h: Harness) -> None:
    assert h.inb(RBR) == 0
    assert h.inb(LSR) & LSR_DR == 0


def test_rx_space_reports_free_buffer(h: Harness) -> None:
    assert h.uart.rx_space() == RX_BUFFER_SIZE
    h.uart.feed(b"12345")
    assert h.uart.rx_space() == RX_BUFFER_SIZE - 5
    h.inb(RBR)
    assert h.uart.rx_space() == RX_BUFFER_SIZE - 4


def test_fcr_clears_the_receive_fifo(h: Harness) -> None:
    h.outb(FCR, FCR_FIFO_ENABLE)
    h.outb(MCR, MCR_OUT2)
    h.outb(IER, IER_ERBFI)
    h.uart.feed(b"stale input")
    assert h.irq
    h.outb(FCR, FCR_FIFO_ENABLE | FCR_RCVR_FIFO_RESET | FCR_XMIT_FIFO_RESET)
    assert h.inb(LSR) & LSR_DR == 0
    assert not h.irq
    assert h.uart.rx_space() == RX_BUFFER_SIZE
    assert h.inb(IIR) == IIR_FIFOS_ENABLED | IIR_NO_INT
    h.uart.feed(b"new")
    assert bytes(h.inb(RBR) for _ in range(3)) == b"new"


def test_fcr_reset_bits_are_ignored_unless_fcr0_is_set(h: Harness) -> None:
    h.uart.feed(b"keep")  # FIFOs off, and they stay off
    h.outb(FCR, FCR_RCVR_FIFO_RESET)
    assert h.inb(LSR) & LSR_DR


def test_linux_clear_fifos_sequence_empties_the_receiver(h: Harness) -> None:
    h.outb(FCR, FCR_FIFO_ENABLE | 0x80)  # running with FIFOs on
    h.uart.feed(b"junk")
    h.outb(FCR, FCR_FIFO_ENABLE)  # serial8250_clear_fifos()
    h.outb(FCR, FCR_FIFO_ENABLE | FCR_RCVR_FIFO_RESET | FCR_XMIT_FIFO_RESET)
    h.outb(FCR, 0)
    assert h.inb(LSR) & LSR_DR == 0


def test_overrun_when_the_buffer_overflows(h: Harness) -> None:
    small = Harness(rx_buffer_size=32)
    small.outb(MCR, MCR_OUT2)
    small.outb(IER, IER_ERBFI | IER_ELSI)
    data = bytes(range(40))
    assert small.uart.rx_space() == 32
    assert small.uart.feed(data) == 32
    assert small.uart.rx_space() == 0
    assert small.iir_id() == IIR_RLS  # line status outranks received data
    lsr = small.inb(LSR)
    assert lsr & (LSR_OE | LSR_DR) == LSR_OE | LSR_DR
    assert small.inb(LSR) & LSR_OE == 0  # reading LSR cleared OE
    assert small.iir_id() == IIR_RDA
    received = bytes(small.inb(RBR) for _ in range(32))
    assert received == data[:32]  # the bytes that did not fit were dropped
    assert small.iir_id() == IIR_NO_INT
    assert small.irq_calls == [True, False]


def test_overrun_without_elsi_is_reported_in_lsr_only(h: Harness) -> None:
    small = Harness(rx_buffer_size=16)
    small.outb(MCR, MCR_OUT2)
    small.uart.feed(bytes(17))
    assert small.inb(LSR) & LSR_OE
    assert small.irq_calls == []


def test_rx_buffer_must_hold_at_least_a_fifo() -> None:
    with pytest.raises(ValueError):
        Serial16550(lambda data: None, lambda level: None, rx_buffer_size=8)


# --- modem control and loopback -----------------------------------------------


def test_msr_reports_a_connected_line_outside_loopback(h: Harness) -> None:
    assert h.inb(MSR) == MSR_DCD | MSR_DSR | MSR_CTS


@pytest.mark.parametrize(
    "mcr_bit, msr_bit",
    [(MCR_RTS, MSR_CTS), (MCR_DTR, MSR_DSR), (MCR_OUT1, MSR_RI), (MCR_OUT2, MSR_DCD)],
)
def test_loopback_mirrors_mcr_outputs_in_msr(h: Harness, mcr_bit: int, msr_bit: int) -> None:
    h.outb(MCR, MCR_LOOP | mcr_bit)
    h.inb(MSR)  # discard the deltas from entering loopback
    assert h.inb(MSR) & 0xF0 == msr_bit
    h.outb(MCR, MCR_LOOP)
    assert h.inb(MSR) & 0xF0 == 0


def test_msr_delta_bits_and_modem_status_interrupt(h: Harness) -> None:
    h.outb(MCR, MCR_OUT2 | MCR_OUT1)
    h.outb(IER, IER_EDSSI)
    assert h.iir_id() == IIR_NO_INT
    h.outb(MCR, MCR_LOOP | MCR_OUT1)  # CTS, DSR, DCD drop; RI rises
    assert h.iir_id() == IIR_MODEM_STATUS
    msr = h.inb(MSR)
    assert msr == MSR_RI | MSR_DCTS | MSR_DDSR | MSR_DDCD
    assert h.iir_id() == IIR_NO_INT  # reading MSR acknowledged it
    h.outb(MCR, MCR_LOOP)  # RI falls: trailing edge
    assert h.inb(MSR) == MSR_TERI
    assert h.inb(MSR) == 0


def test_loopback_routes_tx_to_rx_and_disconnects_the_host(h: Harness) -> None:
    h.outb(MCR, MCR_LOOP)
    assert h.uart.rx_space() == 0
    assert h.uart.feed(b"typed") == 0
    h.outb(THR, 0x5A)
    assert h.sent == b""
    assert h.inb(LSR) & LSR_DR
    assert h.inb(RBR) == 0x5A
    h.outb(MCR, 0)
    assert h.uart.rx_space() == RX_BUFFER_SIZE
    assert h.uart.feed(b"typed") == 5


# --- access width, reset --------------------------------------------------------


def test_wide_accesses_split_into_byte_registers(h: Harness) -> None:
    h.uart.write(LCR, 2, (MCR_OUT2 << 8) | LCR_8N1)  # LCR then MCR
    assert h.inb(LCR) == LCR_8N1
    assert h.inb(MCR) == MCR_OUT2
    h.outb(SCR, 0x42)
    assert h.uart.read(SCR, 2) == 0xFF42  # past the last register reads 0xFF


def test_reset_returns_to_power_on_state(h: Harness) -> None:
    h.outb(MCR, MCR_OUT2)
    h.outb(IER, IER_ERBFI)
    h.outb(SCR, 0x77)
    h.uart.feed(b"abc")
    assert h.irq
    h.uart.reset()
    assert h.irq_calls == [True, False]
    assert (h.inb(IER), h.inb(MCR), h.inb(SCR), h.inb(LCR)) == (0, 0, 0, 0)
    assert h.inb(LSR) == LSR_THRE | LSR_TEMT
    assert h.inb(IIR) == IIR_NO_INT


# --- threads ----------------------------------------------------------------------


def test_concurrent_feed_and_read_lose_and_reorder_nothing() -> None:
    h = Harness(rx_buffer_size=64)
    h.outb(FCR, FCR_FIFO_ENABLE)
    h.outb(MCR, MCR_OUT2)
    h.outb(IER, IER_ERBFI)
    data = bytes((i * 7 + i // 256) & 0xFF for i in range(20_000))
    received = bytearray()

    def console() -> None:  # the host side, honouring back-pressure
        sent = 0
        while sent < len(data):
            space = h.uart.rx_space()
            if space:
                sent += h.uart.feed(data[sent : sent + min(space, 37)])

    def vcpu() -> None:  # the guest side, draining while DR is set
        while len(received) < len(data):
            while h.inb(LSR) & LSR_DR:
                received.append(h.inb(RBR))

    threads = [threading.Thread(target=console), threading.Thread(target=vcpu)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert bytes(received) == data
    assert h.inb(LSR) & LSR_OE == 0
    # The line followed the data: it was raised and lowered in turn, never twice alike.
    assert all(a != b for a, b in zip(h.irq_calls, h.irq_calls[1:]))
    assert h.irq_calls[-1] is False


def test_concurrent_transmitters_keep_each_writers_order() -> None:
    h = Harness()
    per_thread = 2_000

    def vcpu(tag: int) -> None:
        for i in range(per_thread):
            h.outb(THR, tag | (i & 0x0F))

    threads = [threading.Thread(target=vcpu, args=(tag,)) for tag in (0x10, 0x20, 0x30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(h.sent) == 3 * per_thread
    for tag in (0x10, 0x20, 0x30):
        mine = [b & 0x0F for b in h.sent if b & 0xF0 == tag]
        assert mine == [i & 0x0F for i in range(per_thread)]
