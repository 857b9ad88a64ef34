"""A small classic-BPF assembler: instructions with forward jumps to named labels.

    asm = Assembler()
    asm.load(SECCOMP_DATA_NR)                   # A = seccomp_data.nr
    asm.jump(BPF_JEQ, 59, "deny")               # if A == 59 goto deny (else the next instruction)
    asm.ret(SECCOMP_RET_ALLOW)
    asm.label("deny"); asm.ret(SECCOMP_RET_ERRNO | EPERM)
    program = asm.assemble()                    # [SockFilter, ...]

Classic BPF jumps only forward, by at most 255 instructions (jt/jf are 8 bits): `assemble`
raises BpfError for a label that is behind its jump, too far, or missing.
"""

from __future__ import annotations

from .abi import BPF_ABS, BPF_JMP, BPF_K, BPF_LD, BPF_MAXINSNS, BPF_RET, BPF_W, SockFilter

NEXT = None  # a jump target: the next instruction


class BpfError(ValueError):
    """A program that cannot be encoded (a bad jump, too long)."""


class Assembler:
    def __init__(self):
        self._insns: list[tuple[int, str | None, str | None, int]] = []  # code, jt label, jf label, k
        self._labels: dict[str, int] = {}

    def load(self, offset: int) -> None:
        """A = the 32-bit word at `offset` of the input (struct seccomp_data): BPF_LD|BPF_W|BPF_ABS."""
        self._insns.append((BPF_LD | BPF_W | BPF_ABS, NEXT, NEXT, offset))

    def jump(self, op: int, k: int, jt: str | None, jf: str | None = NEXT) -> None:
        """if (A op k) goto jt else goto jf: op is BPF_JEQ, BPF_JGE (unsigned) or BPF_JSET (A & k)."""
        self._insns.append((BPF_JMP | op | BPF_K, jt, jf, k))

    def ret(self, action: int) -> None:
        """Return `action` (a SECCOMP_RET_* value): BPF_RET|BPF_K."""
        self._insns.append((BPF_RET | BPF_K, NEXT, NEXT, action))

    def label(self, name: str) -> None:
        """Name the next instruction."""
        if name in self._labels:
            raise BpfError(f"label {name!r} defined twice")
        self._labels[name] = len(self._insns)

    def assemble(self) -> list[SockFilter]:
        if len(self._insns) > BPF_MAXINSNS:
            raise BpfError(f"{len(self._insns)} instructions: classic BPF allows {BPF_MAXINSNS}")
        return [SockFilter(code, self._offset(i, jt), self._offset(i, jf), k)
                for i, (code, jt, jf, k) in enumerate(self._insns)]

    def _offset(self, at: int, label: str | None) -> int:
        if label is NEXT:
            return 0
        if label not in self._labels:
            raise BpfError(f"jump to an undefined label {label!r}")
        offset = self._labels[label] - at - 1
        if not 0 <= offset <= 255:
            raise BpfError(f"jump from instruction {at} to {label!r} is {offset}: classic BPF jumps 0 to 255 forward")
        return offset
