"""A 16550A UART (the PC's COM1), as a port-I/O device.

Register and bit names follow the National Semiconductor PC16550D datasheet;
the matching names in Linux's ``include/uapi/linux/serial_reg.h`` are given in
the comments where they differ.

The model is deliberately simple where timing is concerned:

* Transmission is instantaneous.  A byte written to THR is handed to the
  ``output`` callback at once, so THR and the transmitter shift register are
  always empty again by the time the guest looks (LSR.THRE and LSR.TEMT are
  always set).  Because the transmitter drains at once, a write to THR both
  acknowledges a pending THRE interrupt (as the datasheet says) and raises a
  fresh one (the chip does the same when its FIFO empties): this is what keeps
  Linux's interrupt-driven transmit loop going.
* Received bytes sit in a software buffer bigger than the chip's 16-byte FIFO
  (``rx_buffer_size``, 4096 by default) so that pasted input is not lost; the
  host side can check ``rx_space()`` to apply back-pressure.  LSR.OE is
  reported only when that buffer overflows.
* The received-data interrupt is raised whenever any byte is waiting (the FIFO
  trigger level is not modelled, and neither is the character-timeout
  interrupt, which Linux treats the same way).

Locking: every register access, ``feed`` and ``rx_space`` runs under one
per-device lock.  The ``output`` and ``set_irq`` callbacks are called with that
lock held, so that bytes from several vCPUs reach the sink in the order the
guest wrote them and the IRQ line never lags behind the state that drives it.
Callbacks must therefore not call back into the device, and should not block
for long (the sink should buffer).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable

from . import byte_writes, read_bytes

COM1_PORT = 0x3F8
COM1_IRQ = 4
REGISTER_COUNT = 8  # the device occupies ports base .. base+7

# The chip's receive FIFO holds 16 bytes; we keep a larger software buffer.
HARDWARE_FIFO_SIZE = 16
RX_BUFFER_SIZE = 4096

# --- Register offsets from the base port (datasheet Table II) ---------------
RBR = 0  # Receiver Buffer Register, read, DLAB=0        (UART_RX)
THR = 0  # Transmitter Holding Register, write, DLAB=0   (UART_TX)
DLL = 0  # Divisor Latch (LS), DLAB=1                    (UART_DLL)
IER = 1  # Interrupt Enable Register, DLAB=0             (UART_IER)
DLM = 1  # Divisor Latch (MS), DLAB=1                    (UART_DLM)
IIR = 2  # Interrupt Identification Register, read       (UART_IIR)
FCR = 2  # FIFO Control Register, write                  (UART_FCR)
LCR = 3  # Line Control Register                         (UART_LCR)
MCR = 4  # MODEM Control Register                        (UART_MCR)
LSR = 5  # Line Status Register                          (UART_LSR)
MSR = 6  # MODEM Status Register                         (UART_MSR)
SCR = 7  # Scratch Register                              (UART_SCR)

# --- IER: Interrupt Enable Register -----------------------------------------
IER_ERBFI = 0x01  # Enable Received Data Available Interrupt      (UART_IER_RDI)
IER_ETBEI = 0x02  # Enable Transmitter Holding Register Empty Int (UART_IER_THRI)
IER_ELSI = 0x04  # Enable Receiver Line Status Interrupt          (UART_IER_RLSI)
IER_EDSSI = 0x08  # Enable MODEM Status Interrupt                 (UART_IER_MSI)
IER_MASK = 0x0F  # bits 7:4 are always 0 on a 16550A

# --- IIR: Interrupt Identification Register ---------------------------------
IIR_NO_INT = 0x01  # bit 0 is "0 if interrupt pending"            (UART_IIR_NO_INT)
IIR_MODEM_STATUS = 0x00  # 4th priority                           (UART_IIR_MSI)
IIR_THRE = 0x02  # Transmitter Holding Register Empty, 3rd        (UART_IIR_THRI)
IIR_RDA = 0x04  # Received Data Available, 2nd                    (UART_IIR_RDI)
IIR_RLS = 0x06  # Receiver Line Status, highest                   (UART_IIR_RLSI)
IIR_CTI = 0x0C  # Character Timeout Indication (not generated)    (UART_IIR_RX_TIMEOUT)
IIR_ID_MASK = 0x0F
IIR_FIFOS_ENABLED = 0xC0  # bits 7:6 set when FCR0 = 1            (UART_IIR_FIFO_ENABLED)

# --- FCR: FIFO Control Register ---------------------------------------------
FCR_FIFO_ENABLE = 0x01  #                                         (UART_FCR_ENABLE_FIFO)
FCR_RCVR_FIFO_RESET = 0x02  #                                     (UART_FCR_CLEAR_RCVR)
FCR_XMIT_FIFO_RESET = 0x04  #                                     (UART_FCR_CLEAR_XMIT)
FCR_DMA_MODE_SELECT = 0x08  #                                     (UART_FCR_DMA_SELECT)
FCR_RCVR_TRIGGER = 0xC0  # trigger level, bits 7:6                (UART_FCR_TRIGGER_MASK)

# --- LCR: Line Control Register ---------------------------------------------
LCR_WLS = 0x03  # Word Length Select                              (UART_LCR_WLEN*)
LCR_STB = 0x04  # Number of Stop Bits                             (UART_LCR_STOP)
LCR_PEN = 0x08  # Parity Enable                                   (UART_LCR_PARITY)
LCR_EPS = 0x10  # Even Parity Select                              (UART_LCR_EPAR)
LCR_STICK_PARITY = 0x20  #                                        (UART_LCR_SPAR)
LCR_SET_BREAK = 0x40  #                                           (UART_LCR_SBC)
LCR_DLAB = 0x80  # Divisor Latch Access Bit                       (UART_LCR_DLAB)

# --- MCR: MODEM Control Register --------------------------------------------
MCR_DTR = 0x01  # Data Terminal Ready
MCR_RTS = 0x02  # Request To Send
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08  # on PCs, gates the UART's interrupt onto the IRQ line
MCR_LOOP = 0x10  # loopback (diagnostic) mode
MCR_MASK = 0x1F  # bits 7:5 are always 0

# --- LSR: Line Status Register ----------------------------------------------
LSR_DR = 0x01  # Data Ready
LSR_OE = 0x02  # Overrun Error
LSR_PE = 0x04  # Parity Error (never set: the host link has no parity)
LSR_FE = 0x08  # Framing Error (never set)
LSR_BI = 0x10  # Break Interrupt (never set)
LSR_THRE = 0x20  # Transmitter Holding Register Empty
LSR_TEMT = 0x40  # Transmitter Empty
LSR_RCVR_FIFO_ERROR = 0x80  # Error in RCVR FIFO (never set)     (UART_LSR_FIFOE)
LSR_ERROR_BITS = LSR_OE | LSR_PE | LSR_FE | LSR_BI  # cleared by reading LSR

# --- MSR: MODEM Status Register ---------------------------------------------
MSR_DCTS = 0x01  # Delta Clear To Send
MSR_DDSR = 0x02  # Delta Data Set Ready
MSR_TERI = 0x04  # Trailing Edge Ring Indicator
MSR_DDCD = 0x08  # Delta Data Carrier Detect
MSR_CTS = 0x10  # Clear To Send
MSR_DSR = 0x20  # Data Set Ready
MSR_RI = 0x40  # Ring Indicator
MSR_DCD = 0x80  # Data Carrier Detect
MSR_DELTA_BITS = MSR_DCTS | MSR_DDSR | MSR_TERI | MSR_DDCD

# What the modem inputs read outside loopback: the host end of the line is
# always "connected and ready", and the phone never rings.
MODEM_INPUTS_CONNECTED = MSR_DCD | MSR_DSR | MSR_CTS

# Power-on divisor: the datasheet leaves it undefined; 12 is 9600 baud with
# the PC's 1.8432 MHz clock (base_baud 115200).  The rate changes nothing here.
DEFAULT_DIVISOR = 12


class Serial16550:
    """A 16550A UART: 8 byte-wide registers, offsets 0..7 from the base port.

    ``output(data)`` receives each transmitted byte, as soon as it is written.
    ``set_irq(level)`` is called whenever the UART's interrupt output changes
    (an interrupt is pending, MCR.OUT2 is set, and the chip is not in
    loopback); it is never called twice in a row with the same level.
    """

    def __init__(
        self,
        output: Callable[[bytes], None],
        set_irq: Callable[[bool], None],
        *,
        rx_buffer_size: int = RX_BUFFER_SIZE,
    ) -> None:
        if rx_buffer_size < HARDWARE_FIFO_SIZE:
            raise ValueError(f"rx_buffer_size must be at least {HARDWARE_FIFO_SIZE}")
        self._output = output
        self._set_irq = set_irq
        self._rx_buffer_size = rx_buffer_size
        self._lock = threading.Lock()
        self._irq_level = False  # the level we last reported through set_irq
        self._power_on_state()

    def _power_on_state(self) -> None:
        """Register values after a Master Reset (datasheet Table IV)."""
        self._ier = 0
        self._lcr = 0
        self._mcr = 0
        self._scr = 0
        self._dll = DEFAULT_DIVISOR & 0xFF
        self._dlm = DEFAULT_DIVISOR >> 8
        self._fifos_enabled = False
        self._rx: deque[int] = deque()
        self._overrun = False  # LSR.OE, latched until LSR is read
        # The THRE interrupt source.  It is set whenever the (always empty)
        # transmitter becomes empty, and when ETBEI is turned on; it is
        # cleared by reading IIR while THRE is the reported source, or by
        # writing THR (which at once sets it again, see _transmit).
        self._thre_pending = False
        self._msr_deltas = 0  # MSR bits 3:0, cleared by reading MSR

    # ------------------------------------------------------------------
    # Port-I/O interface
    # ------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        """Read ``size`` bytes starting at register ``offset`` (little-endian).

        A wider access is split into byte accesses to consecutive registers,
        as the ISA bus does; bytes beyond the last register read as 0xFF.
        """
        with self._lock:
            value = read_bytes(self._read_register, offset, size)
            self._update_irq()
            return value

    def write(self, offset: int, size: int, value: int) -> None:
        """Write ``size`` bytes starting at register ``offset`` (little-endian)."""
        with self._lock:
            for reg, byte in byte_writes(offset, size, value):
                self._write_register(reg, byte)
            self._update_irq()

    # ------------------------------------------------------------------
    # Host side
    # ------------------------------------------------------------------

    def feed(self, data: bytes) -> int:
        """Deliver bytes received from the host console; returns how many were taken.

        Bytes that do not fit in the receive buffer are dropped and LSR.OE is
        set.  In loopback mode the receiver is disconnected from the line, so
        nothing is taken (and no overrun is reported).
        """
        with self._lock:
            if self._mcr & MCR_LOOP:
                return 0
            taken = self._receive(data)
            self._update_irq()
            return taken

    def rx_space(self) -> int:
        """How many bytes ``feed`` can take now without an overrun."""
        with self._lock:
            if self._mcr & MCR_LOOP:
                return 0
            return self._rx_buffer_size - len(self._rx)

    def reset(self) -> None:
        """Master Reset: registers to power-on values, buffers emptied, line low."""
        with self._lock:
            self._power_on_state()
            self._update_irq()

    @property
    def irq_asserted(self) -> bool:
        """The level of the interrupt line as last passed to ``set_irq``."""
        with self._lock:
            return self._irq_level

    # ------------------------------------------------------------------
    # Registers (called with the lock held)
    # ------------------------------------------------------------------

    def _read_register(self, reg: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if reg == RBR:
            if dlab:
                return self._dll
            return self._rx.popleft() if self._rx else 0
        if reg == IER:
            return self._dlm if dlab else self._ier
        if reg == IIR:
            iir = self._iir()
            if iir & IIR_ID_MASK == IIR_THRE:
                self._thre_pending = False  # reading IIR acknowledges THRE
            return iir
        if reg == LCR:
            return self._lcr
        if reg == MCR:
            return self._mcr
        if reg == LSR:
            lsr = self._lsr()
            self._overrun = False  # OE (and the other error bits) clear on read
            return lsr
        if reg == MSR:
            msr = self._modem_inputs() | self._msr_deltas
            self._msr_deltas = 0
            return msr
        if reg == SCR:
            return self._scr
        return 0xFF  # past the end of the register block

    def _write_register(self, reg: int, value: int) -> None:
        dlab = self._lcr & LCR_DLAB
        if reg == THR:
            if dlab:
                self._dll = value
            else:
                self._transmit(value)
        elif reg == IER:
            if dlab:
                self._dlm = value
            else:
                self._write_ier(value)
        elif reg == FCR:
            self._write_fcr(value)
        elif reg == LCR:
            self._lcr = value
        elif reg == MCR:
            self._write_mcr(value)
        elif reg == SCR:
            self._scr = value
        # LSR and MSR are read-only; writes past the block are ignored.

    def _transmit(self, byte: int) -> None:
        # The write acknowledges THRE; the byte then leaves at once, THR is
        # empty again, and the chip raises THRE anew.
        self._thre_pending = False
        if self._mcr & MCR_LOOP:
            # Loopback: the transmitter output is wired to the receiver input.
            self._receive(bytes([byte]))
        else:
            self._output(bytes([byte]))
        self._thre_pending = True

    def _write_ier(self, value: int) -> None:
        previous = self._ier
        self._ier = value & IER_MASK
        if self._ier & IER_ETBEI and not previous & IER_ETBEI:
            # Enabling ETBEI while THR is empty (it always is) raises THRE at
            # once; Linux's 8250 driver checks for this at startup.
            self._thre_pending = True

    def _write_fcr(self, value: int) -> None:
        enable = bool(value & FCR_FIFO_ENABLE)
        if enable != self._fifos_enabled:
            # Switching between FIFO and character mode empties the FIFOs.
            self._rx.clear()
        self._fifos_enabled = enable
        # The other bits are only programmed while FCR0 is 1.  The transmit
        # FIFO is always empty, so FCR_XMIT_FIFO_RESET has nothing to do; the
        # trigger level and DMA mode do not affect this model.
        if enable and value & FCR_RCVR_FIFO_RESET:
            self._rx.clear()

    def _write_mcr(self, value: int) -> None:
        before = self._modem_inputs()
        self._mcr = value & MCR_MASK
        after = self._modem_inputs()
        changed = before ^ after
        if changed & MSR_CTS:
            self._msr_deltas |= MSR_DCTS
        if changed & MSR_DSR:
            self._msr_deltas |= MSR_DDSR
        if changed & MSR_DCD:
            self._msr_deltas |= MSR_DDCD
        if before & MSR_RI and not after & MSR_RI:
            self._msr_deltas |= MSR_TERI

    # ------------------------------------------------------------------
    # Derived state (called with the lock held)
    # ------------------------------------------------------------------

    def _receive(self, data: bytes) -> int:
        space = self._rx_buffer_size - len(self._rx)
        taken = min(space, len(data))
        self._rx.extend(data[:taken])
        if taken < len(data):
            self._overrun = True
        return taken

    def _modem_inputs(self) -> int:
        """MSR bits 7:4, the state of the CTS, DSR, RI and DCD inputs."""
        if not self._mcr & MCR_LOOP:
            return MODEM_INPUTS_CONNECTED
        # Loopback: RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD.
        inputs = 0
        if self._mcr & MCR_RTS:
            inputs |= MSR_CTS
        if self._mcr & MCR_DTR:
            inputs |= MSR_DSR
        if self._mcr & MCR_OUT1:
            inputs |= MSR_RI
        if self._mcr & MCR_OUT2:
            inputs |= MSR_DCD
        return inputs

    def _lsr(self) -> int:
        lsr = LSR_THRE | LSR_TEMT  # the transmitter is always empty
        if self._rx:
            lsr |= LSR_DR
        if self._overrun:
            lsr |= LSR_OE
        return lsr

    def _pending_interrupt(self) -> int | None:
        """The highest-priority enabled interrupt source, as its IIR code."""
        if self._ier & IER_ELSI and self._lsr() & LSR_ERROR_BITS:
            return IIR_RLS
        if self._ier & IER_ERBFI and self._rx:
            return IIR_RDA
        if self._ier & IER_ETBEI and self._thre_pending:
            return IIR_THRE
        if self._ier & IER_EDSSI and self._msr_deltas:
            return IIR_MODEM_STATUS
        return None

    def _iir(self) -> int:
        source = self._pending_interrupt()
        iir = IIR_NO_INT if source is None else source
        if self._fifos_enabled:
            iir |= IIR_FIFOS_ENABLED
        return iir

    def _update_irq(self) -> None:
        """Drive the IRQ line from the pending state; report changes only.

        On a PC the UART's interrupt reaches the PIC only while OUT2 is set.
        In loopback mode the OUT2 pin is forced inactive, so the line is low.
        """
        level = (
            self._pending_interrupt() is not None
            and bool(self._mcr & MCR_OUT2)
            and not self._mcr & MCR_LOOP
        )
        if level != self._irq_level:
            self._irq_level = level
            self._set_irq(level)
