"""The CPUID table one vCPU sees.

KVM_GET_SUPPORTED_CPUID tells what the host's KVM can offer a guest; it is not a
table a guest can run with as it is.  A VMM has to describe the virtual machine's
topology in it (whose APIC id is which, how many cores share a cache), may add the
KVM paravirtual leaves, and may hide features the guest must not use.  Everything
here is a pure function over a list of `CpuidEntry` (the Python mirror of
`struct kvm_cpuid_entry2`); the KVM layer converts to and from ctypes and calls
KVM_SET_CPUID2 with the result.

The virtual topology is always: one socket, `num_cpus` cores, one thread per core,
and APIC id == vCPU index.  The fields written for it are those of the Intel SDM
Vol. 2A (CPUID instruction) and AMD APM Vol. 3 (Appendix E, "Obtaining Processor
Information Via the CPUID Instruction"):

* leaf 1: EBX[31:24] initial APIC id, EBX[23:16] addressable logical processor
  ids, EDX.HTT, ECX bit 31 (hypervisor present);
* leaf 4 (Intel deterministic cache parameters), leaf 0x8000001D (AMD cache
  topology): how many logical processors share each cache;
* leaves 0xB and 0x1F (x2APIC extended topology): an SMT level and a core level;
* AMD leaves 0x80000001 (CmpLegacy), 0x80000008 ECX (NC, ApicIdSize) and
  0x8000001E (extended APIC id, core id).

Leaves the host does not report are left out: an AMD leaf does not appear on an
Intel host because of this module.  The one exception is the KVM paravirtual
signature (Linux `Documentation/virt/kvm/x86/cpuid.rst`), see `_ensure_kvm_leaves`.

Features are hidden by name (`FEATURES`, `DEPENDENTS`), e.g. `EMULATOR_MASK` for a
software-emulating KVM that cannot execute `lock cmpxchg16b` or `xrstor`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, NamedTuple

# struct kvm_cpuid_entry2.flags: the entry applies to one subleaf (ECX) only.
# (The misspelling is the kernel's own: include/uapi/linux/kvm.h.)
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1


@dataclass
class CpuidEntry:
    """One `struct kvm_cpuid_entry2`: the result of CPUID(function, index)."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


# --- Leaves ---------------------------------------------------------------------------

LEAF_VENDOR = 0x0  # EAX = highest basic leaf; EBX,EDX,ECX = vendor string
LEAF_FEATURES = 0x1  # version, APIC id, feature flags
LEAF_CACHE_PARAMS = 0x4  # Intel deterministic cache parameters (one subleaf per cache)
LEAF_STRUCTURED_FEATURES = 0x7  # structured extended feature flags
LEAF_EXT_TOPOLOGY = 0xB  # x2APIC extended topology enumeration
LEAF_XSAVE = 0xD  # processor extended state enumeration
LEAF_V2_EXT_TOPOLOGY = 0x1F  # V2 extended topology enumeration

KVM_CPUID_SIGNATURE = 0x40000000  # EAX = highest KVM leaf; EBX,ECX,EDX = "KVMKVMKVM\0\0\0"
KVM_CPUID_FEATURES = 0x40000001  # EAX = KVM_FEATURE_* bits, EDX = KVM_HINTS_* bits

LEAF_EXT_MAX = 0x80000000  # EAX = highest extended leaf
LEAF_EXT_FEATURES = 0x80000001  # extended feature flags
LEAF_EXT_ADDRESS_SIZES = 0x80000008  # address sizes; AMD: ECX = NC, ApicIdSize
LEAF_AMD_CACHE_TOPOLOGY = 0x8000001D  # AMD cache topology (one subleaf per cache)
LEAF_AMD_EXT_APIC_ID = 0x8000001E  # AMD extended APIC id, core id, node id

BASIC_RANGE = range(0x0, 0x40000000)
KVM_RANGE = range(0x40000000, 0x40000100)
EXTENDED_RANGE = range(0x80000000, 0x80010000)

REGISTERS = ("eax", "ebx", "ecx", "edx")

# Vendor strings (leaf 0, in EBX, EDX, ECX order).  Hygon is AMD's licensee and
# follows AMD's topology leaves.
AMD_VENDORS = (b"AuthenticAMD", b"HygonGenuine")

# --- Leaf 1 ---------------------------------------------------------------------------

LEAF1_EBX_APIC_ID_SHIFT = 24  # EBX[31:24]: initial APIC id
LEAF1_EBX_LOGICAL_COUNT_SHIFT = 16  # EBX[23:16]: max addressable logical processor ids
LEAF1_ECX_HYPERVISOR = 1 << 31  # "not used" by hardware, set by hypervisors
LEAF1_EDX_HTT = 1 << 28  # EBX[23:16] is valid: more than one logical processor

# --- Leaf 4 and 0x8000001D (cache descriptions) ---------------------------------------

CACHE_TYPE_MASK = 0x1F  # EAX[4:0]: 0 = no more caches, 1 = data, 2 = instruction, 3 = unified
CACHE_LEVEL_SHIFT = 5  # EAX[7:5]: cache level, starting at 1
CACHE_SHARING_SHIFT = 14  # EAX[25:14]: logical processors sharing this cache - 1
CACHE_SHARING_MASK = 0xFFF << CACHE_SHARING_SHIFT
CACHE_CORES_SHIFT = 26  # leaf 4 only, EAX[31:26]: cores in the package - 1
CACHE_CORES_MASK = 0x3F << CACHE_CORES_SHIFT

# --- Leaves 0xB and 0x1F (extended topology) ------------------------------------------

TOPOLOGY_LEVEL_INVALID = 0
TOPOLOGY_LEVEL_SMT = 1
TOPOLOGY_LEVEL_CORE = 2
TOPOLOGY_LEVEL_TYPE_SHIFT = 8  # ECX[15:8]: level type; ECX[7:0]: the subleaf number

# --- AMD ------------------------------------------------------------------------------

EXT_FEATURES_ECX_CMP_LEGACY = 1 << 1  # 0x80000001 ECX: core multi-processing legacy mode
AMD_NC_MASK = 0xFF  # 0x80000008 ECX[7:0]: number of physical cores - 1
AMD_APIC_ID_SIZE_SHIFT = 12  # 0x80000008 ECX[15:12]: APIC id bits that identify the core
AMD_APIC_ID_SIZE_MASK = 0xF << AMD_APIC_ID_SIZE_SHIFT
ADDRESS_SIZES_EAX_LINEAR_SHIFT = 8  # 0x80000008 EAX[15:8]: linear address bits
LINEAR_ADDRESS_BITS_4_LEVEL = 48

# --- XSAVE (leaf 0xD) -----------------------------------------------------------------

XSAVE_LEGACY_AREA_SIZE = 512  # x87 and SSE state, the FXSAVE layout
XSAVE_HEADER_SIZE = 64
XSAVE_SUPERVISOR_COMPONENT = 1 << 0  # 0xD.n ECX bit 0: component n is in IA32_XSS

# --- KVM paravirtual features (Documentation/virt/kvm/x86/cpuid.rst) ------------------

KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"

KVM_FEATURE_CLOCKSOURCE = 0  # kvmclock at MSRs 0x11 and 0x12
KVM_FEATURE_NOP_IO_DELAY = 1  # no delays needed on port I/O
KVM_FEATURE_MMU_OP = 2  # deprecated
KVM_FEATURE_CLOCKSOURCE2 = 3  # kvmclock at MSRs 0x4b564d00 and 0x4b564d01
KVM_FEATURE_ASYNC_PF = 4  # async page faults, MSR 0x4b564d02
KVM_FEATURE_STEAL_TIME = 5  # steal time, MSR 0x4b564d03
KVM_FEATURE_PV_EOI = 6  # paravirtual end of interrupt, MSR 0x4b564d04
KVM_FEATURE_PV_UNHALT = 7  # KVM_HC_KICK_CPU hypercall
KVM_FEATURE_PV_TLB_FLUSH = 9  # paravirtual TLB flush
KVM_FEATURE_ASYNC_PF_VMEXIT = 10  # async page faults delivered as #PF vmexits
KVM_FEATURE_PV_SEND_IPI = 11  # KVM_HC_SEND_IPI hypercall
KVM_FEATURE_POLL_CONTROL = 12  # host-side halt polling control, MSR 0x4b564d05
KVM_FEATURE_PV_SCHED_YIELD = 13  # KVM_HC_SCHED_YIELD hypercall
KVM_FEATURE_ASYNC_PF_INT = 14  # async page-present events as interrupts, MSR 0x4b564d06
KVM_FEATURE_MSI_EXT_DEST_ID = 15  # MSI address bits 11:5 extend the destination id
KVM_FEATURE_HC_MAP_GPA_RANGE = 16  # KVM_HC_MAP_GPA_RANGE hypercall
KVM_FEATURE_MIGRATION_CONTROL = 17  # MSR_KVM_MIGRATION_CONTROL
KVM_FEATURE_CLOCKSOURCE_STABLE_BIT = 24  # the host warns when kvmclock is not stable

KVM_HINTS_REALTIME = 0  # EDX of 0x40000001: vCPUs are never preempted

# What 0x40000001 says when this module has to make the KVM leaves up itself (see
# `_ensure_kvm_leaves`): only kvmclock, through both MSR pairs.  Every KVM since
# 2.6.26 handles the kvmclock MSRs whatever CPUID says, so these three bits are safe
# to promise; CLOCKSOURCE_STABLE_BIT only tells the guest to look at the
# PVCLOCK_TSC_STABLE_BIT flag the host sets (or not) in each vCPU's pvclock page.
# The others need host support this module cannot see (async PF, steal time,
# PV EOI, ...) or VMM support (MSI_EXT_DEST_ID), so they are never invented.
SYNTHESIZED_KVM_FEATURES = (
    (1 << KVM_FEATURE_CLOCKSOURCE)
    | (1 << KVM_FEATURE_CLOCKSOURCE2)
    | (1 << KVM_FEATURE_CLOCKSOURCE_STABLE_BIT)
)


# --- Named features, for masking ------------------------------------------------------


class CpuidBit(NamedTuple):
    """Where a feature flag lives: CPUID(leaf, subleaf).register bit `bit`."""

    leaf: int
    subleaf: int
    register: str
    bit: int


# Names as Linux prints them in /proc/cpuinfo (and accepts in `clearcpuid=`).
FEATURES: dict[str, CpuidBit] = {
    # Leaf 1 ECX
    "monitor": CpuidBit(0x1, 0, "ecx", 3),
    "vmx": CpuidBit(0x1, 0, "ecx", 5),
    "fma": CpuidBit(0x1, 0, "ecx", 12),
    "cx16": CpuidBit(0x1, 0, "ecx", 13),  # CMPXCHG16B
    "pcid": CpuidBit(0x1, 0, "ecx", 17),
    "x2apic": CpuidBit(0x1, 0, "ecx", 21),
    "tsc_deadline": CpuidBit(0x1, 0, "ecx", 24),  # Linux: tsc_deadline_timer
    "xsave": CpuidBit(0x1, 0, "ecx", 26),
    "osxsave": CpuidBit(0x1, 0, "ecx", 27),
    "avx": CpuidBit(0x1, 0, "ecx", 28),
    "f16c": CpuidBit(0x1, 0, "ecx", 29),
    "rdrand": CpuidBit(0x1, 0, "ecx", 30),
    # Leaf 7 subleaf 0 EBX
    "avx2": CpuidBit(0x7, 0, "ebx", 5),
    "smep": CpuidBit(0x7, 0, "ebx", 7),
    "invpcid": CpuidBit(0x7, 0, "ebx", 10),
    "mpx": CpuidBit(0x7, 0, "ebx", 14),
    "avx512f": CpuidBit(0x7, 0, "ebx", 16),
    "avx512dq": CpuidBit(0x7, 0, "ebx", 17),
    "rdseed": CpuidBit(0x7, 0, "ebx", 18),
    "smap": CpuidBit(0x7, 0, "ebx", 20),
    "avx512ifma": CpuidBit(0x7, 0, "ebx", 21),
    "avx512pf": CpuidBit(0x7, 0, "ebx", 26),
    "avx512er": CpuidBit(0x7, 0, "ebx", 27),
    "avx512cd": CpuidBit(0x7, 0, "ebx", 28),
    "avx512bw": CpuidBit(0x7, 0, "ebx", 30),
    "avx512vl": CpuidBit(0x7, 0, "ebx", 31),
    # Leaf 7 subleaf 0 ECX
    "avx512vbmi": CpuidBit(0x7, 0, "ecx", 1),
    "umip": CpuidBit(0x7, 0, "ecx", 2),
    "pku": CpuidBit(0x7, 0, "ecx", 3),
    "ospke": CpuidBit(0x7, 0, "ecx", 4),
    "waitpkg": CpuidBit(0x7, 0, "ecx", 5),
    "avx512_vbmi2": CpuidBit(0x7, 0, "ecx", 6),
    "shstk": CpuidBit(0x7, 0, "ecx", 7),  # CET shadow stacks
    "vaes": CpuidBit(0x7, 0, "ecx", 9),
    "vpclmulqdq": CpuidBit(0x7, 0, "ecx", 10),
    "avx512_vnni": CpuidBit(0x7, 0, "ecx", 11),
    "avx512_bitalg": CpuidBit(0x7, 0, "ecx", 12),
    "avx512_vpopcntdq": CpuidBit(0x7, 0, "ecx", 14),
    "la57": CpuidBit(0x7, 0, "ecx", 16),  # 5-level paging
    "rdpid": CpuidBit(0x7, 0, "ecx", 22),
    # Leaf 7 subleaf 0 EDX
    "avx512_4vnniw": CpuidBit(0x7, 0, "edx", 2),
    "avx512_4fmaps": CpuidBit(0x7, 0, "edx", 3),
    "avx512_vp2intersect": CpuidBit(0x7, 0, "edx", 8),
    "ibt": CpuidBit(0x7, 0, "edx", 20),  # CET indirect branch tracking
    "amx_bf16": CpuidBit(0x7, 0, "edx", 22),
    "avx512_fp16": CpuidBit(0x7, 0, "edx", 23),
    "amx_tile": CpuidBit(0x7, 0, "edx", 24),
    "amx_int8": CpuidBit(0x7, 0, "edx", 25),
    "arch_capabilities": CpuidBit(0x7, 0, "edx", 29),  # IA32_ARCH_CAPABILITIES MSR
    # Leaf 7 subleaf 1 EAX
    "avx_vnni": CpuidBit(0x7, 1, "eax", 4),
    "avx512_bf16": CpuidBit(0x7, 1, "eax", 5),
    # Leaf 0xD subleaf 1 EAX
    "xsaveopt": CpuidBit(0xD, 1, "eax", 0),
    "xsavec": CpuidBit(0xD, 1, "eax", 1),
    "xgetbv1": CpuidBit(0xD, 1, "eax", 2),
    "xsaves": CpuidBit(0xD, 1, "eax", 3),
    "xfd": CpuidBit(0xD, 1, "eax", 4),
    # Leaf 0x80000001 ECX (AMD)
    "svm": CpuidBit(0x80000001, 0, "ecx", 2),
    "xop": CpuidBit(0x80000001, 0, "ecx", 11),
    "fma4": CpuidBit(0x80000001, 0, "ecx", 16),
    # Leaf 0x80000001 EDX
    "pdpe1gb": CpuidBit(0x80000001, 0, "edx", 26),  # 1 GiB pages
    "rdtscp": CpuidBit(0x80000001, 0, "edx", 27),
}

# Other spellings accepted in a mask.
ALIASES: dict[str, str] = {
    "avx512": "avx512f",  # the whole AVX-512 family depends on AVX512F
    "tsc_deadline_timer": "tsc_deadline",
}

# Feature -> the features that cannot be offered without it.  Masking a feature masks
# its dependents too, transitively.
DEPENDENTS: dict[str, tuple[str, ...]] = {
    # Everything whose register state XSAVE manages, and the XSAVE extensions.
    "xsave": ("osxsave", "avx", "mpx", "pku", "xsaveopt", "xsavec", "xgetbv1", "xsaves", "xfd"),
    # VEX/EVEX-encoded instructions need the YMM state AVX enables.
    "avx": ("fma", "f16c", "avx2", "avx512f", "vaes", "vpclmulqdq", "avx_vnni", "xop", "fma4"),
    "avx512f": (
        "avx512dq", "avx512ifma", "avx512pf", "avx512er", "avx512cd", "avx512bw",
        "avx512vl", "avx512vbmi", "avx512_vbmi2", "avx512_vnni", "avx512_bitalg",
        "avx512_vpopcntdq", "avx512_4vnniw", "avx512_4fmaps", "avx512_vp2intersect",
        "avx512_fp16", "avx512_bf16",
    ),
    "pku": ("ospke",),
    # CET state is supervisor state, saved only by XSAVES.
    "xsaves": ("shstk", "ibt"),
    "xfd": ("amx_tile",),
    "amx_tile": ("amx_bf16", "amx_int8"),
}

# Feature -> the XSAVE state components (bits of XCR0, subleaves of 0xD) that hold its
# registers.  When such a feature is masked (but XSAVE is kept), its components are
# taken out of 0xD.0 EAX:EDX and their subleaves zeroed.
XSAVE_COMPONENTS: dict[str, tuple[int, ...]] = {
    "avx": (2,),  # YMM_Hi128
    "mpx": (3, 4),  # BNDREGS, BNDCSR
    "avx512f": (5, 6, 7),  # opmask, ZMM_Hi256, Hi16_ZMM
    "pku": (9,),  # PKRU
    "amx_tile": (17, 18),  # TILECFG, TILEDATA
}

# Features a software-emulating KVM (such as this project's kvm_pvm hosts) cannot run
# in guest kernel mode: a stock kernel stops at `lock cmpxchg16b` (cx16) and at
# `xrstor` (xsave family).  See /work/shared/README.md.
#
# Measured on such a host (kvm_pvm, AMD EPYC), with a guest that runs CPUID: the guest
# does see the cleared cx16, x2apic and tsc_deadline bits of leaf 1 ECX and the whole of
# leaf 0x80000001, but that KVM turns some host features back on whatever the table
# says: xsave, avx, fma, f16c, rdrand, the SSE family, aes, movbe and popcnt in leaf 1
# ECX, all of leaf 1 EDX, and all of leaves 7 and 0xD.  KVM_GET_CPUID2 shows the
# same merged table, so a VMM can check what actually reached the guest.
EMULATOR_MASK = ("cx16", "xsave")


def known_features() -> tuple[str, ...]:
    """Every name a mask may contain, sorted."""
    return tuple(sorted({*FEATURES, *ALIASES}))


def _canonical(name: str) -> str:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in FEATURES:
        raise ValueError(
            f"unknown CPUID feature {name!r}; known features: {', '.join(known_features())}"
        )
    return key


def parse_mask(text: str) -> tuple[str, ...]:
    """Parse a comma-separated feature list such as "cx16,xsave" (a CLI value).

    Returns the canonical names, in order, without repeats; raises ValueError on an
    unknown name.  An empty string means no mask.
    """
    names: list[str] = []
    for item in text.split(","):
        if not item.strip():
            continue
        name = _canonical(item)
        if name not in names:
            names.append(name)
    return tuple(names)


def masked_features(mask: Iterable[str]) -> frozenset[str]:
    """The names in `mask` together with everything that depends on them."""
    todo = [_canonical(name) for name in mask]
    closed: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in closed:
            closed.add(name)
            todo.extend(DEPENDENTS.get(name, ()))
    return frozenset(closed)


# --- Table helpers --------------------------------------------------------------------


def find_entry(entries: Iterable[CpuidEntry], function: int, index: int = 0) -> CpuidEntry | None:
    """The entry CPUID(function, index) reads, or None.

    An entry without KVM_CPUID_FLAG_SIGNIFCANT_INDEX answers for every index.
    """
    for entry in entries:
        if entry.function != function:
            continue
        if not entry.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX or entry.index == index:
            return entry
    return None


def vendor(entries: Iterable[CpuidEntry]) -> bytes:
    """The 12-byte vendor string of leaf 0 (b"" when leaf 0 is missing)."""
    leaf0 = find_entry(entries, LEAF_VENDOR)
    if leaf0 is None:
        return b""
    return b"".join(r.to_bytes(4, "little") for r in (leaf0.ebx, leaf0.edx, leaf0.ecx))


def _signature_registers(signature: bytes) -> tuple[int, int, int]:
    """A 12-byte hypervisor signature as the EBX, ECX, EDX of leaf 0x40000000."""
    ebx, ecx, edx = (int.from_bytes(signature[i : i + 4], "little") for i in (0, 4, 8))
    return ebx, ecx, edx


def _set_field(value: int, mask: int, shift: int, field: int) -> int:
    """`value` with the bits under `mask` replaced by `field << shift` (saturated)."""
    field = min(field, mask >> shift)
    return (value & ~mask & 0xFFFFFFFF) | (field << shift)


def _bits_for(count: int) -> int:
    """ceil(log2(count)): the APIC id bits needed to number `count` things."""
    return (count - 1).bit_length()


# --- The table for one vCPU -----------------------------------------------------------


def vcpu_cpuid(
    supported: list[CpuidEntry],
    *,
    vcpu_index: int,
    num_cpus: int,
    mask: Iterable[str] = (),
) -> list[CpuidEntry]:
    """The CPUID table for vCPU `vcpu_index` of `num_cpus`, built from `supported`.

    `supported` is what KVM_GET_SUPPORTED_CPUID returned; it is not modified.  The
    result has the topology described in the module docstring, the KVM paravirtual
    leaves, the features named in `mask` (and their dependents) cleared, and leaves
    0, 0x40000000 and 0x80000000 reporting the highest leaf actually present.  It
    is sorted by (function, index).
    """
    if num_cpus < 1:
        raise ValueError(f"num_cpus must be at least 1, not {num_cpus}")
    if not 0 <= vcpu_index < num_cpus:
        raise ValueError(f"vcpu_index {vcpu_index} is not in 0..{num_cpus - 1}")
    cleared = masked_features(mask)

    entries = [dataclasses.replace(entry) for entry in supported]
    is_amd = vendor(entries) in AMD_VENDORS

    _ensure_kvm_leaves(entries)
    _set_leaf1_topology(entries, vcpu_index, num_cpus)
    _set_cache_sharing(entries, LEAF_CACHE_PARAMS, num_cpus, with_core_count=True)
    _set_cache_sharing(entries, LEAF_AMD_CACHE_TOPOLOGY, num_cpus, with_core_count=False)
    entries = _set_extended_topology(entries, LEAF_EXT_TOPOLOGY, vcpu_index, num_cpus)
    entries = _set_extended_topology(entries, LEAF_V2_EXT_TOPOLOGY, vcpu_index, num_cpus)
    if is_amd:
        _set_amd_topology(entries, vcpu_index, num_cpus)
    _clear_features(entries, cleared)
    _set_max_leaves(entries)

    entries.sort(key=lambda entry: (entry.function, entry.index))
    return entries


def _ensure_kvm_leaves(entries: list[CpuidEntry]) -> None:
    """Make sure the KVM signature leaf and the KVM features leaf exist.

    A KVM normally reports both in its supported CPUID, and then they are kept as
    reported (the host knows which PV features it implements).  Some KVMs leave them
    out.  A guest without the signature does not use kvmclock and falls back to
    calibrating the TSC against the PIT, which is slow and, under a software KVM,
    inaccurate; so the leaves are made up, offering only SYNTHESIZED_KVM_FEATURES.
    """
    ebx, ecx, edx = _signature_registers(KVM_SIGNATURE)
    signature = find_entry(entries, KVM_CPUID_SIGNATURE)
    if signature is None:
        entries.append(CpuidEntry(KVM_CPUID_SIGNATURE, 0, 0, KVM_CPUID_FEATURES, ebx, ecx, edx))
    elif (signature.ebx, signature.ecx, signature.edx) != (ebx, ecx, edx):
        # Not KVM's leaf: nothing to add to it.
        return
    if find_entry(entries, KVM_CPUID_FEATURES) is None:
        entries.append(CpuidEntry(KVM_CPUID_FEATURES, 0, 0, SYNTHESIZED_KVM_FEATURES, 0, 0, 0))


def _set_leaf1_topology(entries: list[CpuidEntry], vcpu_index: int, num_cpus: int) -> None:
    leaf1 = find_entry(entries, LEAF_FEATURES)
    if leaf1 is None:
        return
    # Initial APIC id: the low 8 bits of the x2APIC id.
    leaf1.ebx = _set_field(leaf1.ebx, 0xFF << LEAF1_EBX_APIC_ID_SHIFT, LEAF1_EBX_APIC_ID_SHIFT,
                           vcpu_index & 0xFF)
    # Addressable logical processor ids in the package: a power of two.  255 is the
    # field's maximum and stands for 256 (the SDM rounds it up to a power of two).
    leaf1.ebx = _set_field(leaf1.ebx, 0xFF << LEAF1_EBX_LOGICAL_COUNT_SHIFT,
                           LEAF1_EBX_LOGICAL_COUNT_SHIFT, 1 << _bits_for(num_cpus))
    if num_cpus > 1:
        leaf1.edx |= LEAF1_EDX_HTT
    else:
        leaf1.edx &= ~LEAF1_EDX_HTT
    leaf1.ecx |= LEAF1_ECX_HYPERVISOR


def _set_cache_sharing(entries: list[CpuidEntry], leaf: int, num_cpus: int, *,
                       with_core_count: bool) -> None:
    """Describe each cache of `leaf` (4 or 0x8000001D) for our topology.

    With one thread per core, L1 and L2 belong to one logical processor; the L3 (and
    anything beyond) is shared by the whole socket.  Leaf 4 also reports the cores in
    the package.
    """
    for entry in entries:
        if entry.function != leaf or entry.eax & CACHE_TYPE_MASK == 0:
            continue
        level = (entry.eax >> CACHE_LEVEL_SHIFT) & 0x7
        sharing = num_cpus if level >= 3 else 1
        entry.eax = _set_field(entry.eax, CACHE_SHARING_MASK, CACHE_SHARING_SHIFT, sharing - 1)
        if with_core_count:
            entry.eax = _set_field(entry.eax, CACHE_CORES_MASK, CACHE_CORES_SHIFT, num_cpus - 1)


def _set_extended_topology(entries: list[CpuidEntry], leaf: int, vcpu_index: int,
                           num_cpus: int) -> list[CpuidEntry]:
    """Replace the subleaves of `leaf` (0xB or 0x1F) with an SMT level and a core level.

    Subleaf 0 (SMT): shift 0, one logical processor per core.  Subleaf 1 (core): shift
    ceil(log2(num_cpus)), num_cpus logical processors in the package.  Subleaf 2 ends
    the list (level type 0).  EDX is the x2APIC id, ECX[7:0] the subleaf number.
    """
    if find_entry(entries, leaf) is None:
        return entries
    levels = [
        # (EAX: shift to the next level's id, EBX: logical processors, level type)
        (0, 1, TOPOLOGY_LEVEL_SMT),
        (_bits_for(num_cpus), num_cpus, TOPOLOGY_LEVEL_CORE),
        (0, 0, TOPOLOGY_LEVEL_INVALID),
    ]
    replacement = [
        CpuidEntry(
            function=leaf,
            index=subleaf,
            flags=KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            eax=shift,
            ebx=count & 0xFFFF,
            ecx=(level_type << TOPOLOGY_LEVEL_TYPE_SHIFT) | subleaf,
            edx=vcpu_index,
        )
        for subleaf, (shift, count, level_type) in enumerate(levels)
    ]
    return [entry for entry in entries if entry.function != leaf] + replacement


def _set_amd_topology(entries: list[CpuidEntry], vcpu_index: int, num_cpus: int) -> None:
    ext_features = find_entry(entries, LEAF_EXT_FEATURES)
    if ext_features is not None:
        # CmpLegacy: the logical processors HTT counts are cores, not threads.
        if num_cpus > 1:
            ext_features.ecx |= EXT_FEATURES_ECX_CMP_LEGACY
        else:
            ext_features.ecx &= ~EXT_FEATURES_ECX_CMP_LEGACY

    sizes = find_entry(entries, LEAF_EXT_ADDRESS_SIZES)
    if sizes is not None:
        sizes.ecx = _set_field(sizes.ecx, AMD_NC_MASK, 0, num_cpus - 1)
        sizes.ecx = _set_field(sizes.ecx, AMD_APIC_ID_SIZE_MASK, AMD_APIC_ID_SIZE_SHIFT,
                               _bits_for(num_cpus))

    ext_apic = find_entry(entries, LEAF_AMD_EXT_APIC_ID)
    if ext_apic is not None:
        ext_apic.eax = vcpu_index  # extended APIC id
        # EBX[7:0] core (compute unit) id; EBX[15:8] threads per core - 1 = 0.
        ext_apic.ebx = vcpu_index & 0xFF
        # ECX[7:0] node id = 0; ECX[10:8] nodes per processor - 1 = 0.
        ext_apic.ecx = 0
        ext_apic.edx = 0


def _clear_features(entries: list[CpuidEntry], cleared: frozenset[str]) -> None:
    for name in cleared:
        where = FEATURES[name]
        entry = find_entry(entries, where.leaf, where.subleaf)
        if entry is not None:
            setattr(entry, where.register, getattr(entry, where.register) & ~(1 << where.bit))

    xsave_leaves = [entry for entry in entries if entry.function == LEAF_XSAVE]
    if "xsave" in cleared:
        # No XSAVE: leaf 0xD describes nothing.  Its entries stay (zeroed) so that the
        # leaf still answers zeros rather than, on Intel, the highest basic leaf.
        for entry in xsave_leaves:
            entry.eax = entry.ebx = entry.ecx = entry.edx = 0
    elif xsave_leaves:
        _clear_xsave_components(entries, cleared)

    if "la57" in cleared:
        # Without 5-level paging linear addresses have 48 bits.
        sizes = find_entry(entries, LEAF_EXT_ADDRESS_SIZES)
        if sizes is not None:
            shift = ADDRESS_SIZES_EAX_LINEAR_SHIFT
            linear_bits = (sizes.eax >> shift) & 0xFF
            if linear_bits > LINEAR_ADDRESS_BITS_4_LEVEL:
                sizes.eax = _set_field(sizes.eax, 0xFF << shift, shift, LINEAR_ADDRESS_BITS_4_LEVEL)


def _clear_xsave_components(entries: list[CpuidEntry], cleared: frozenset[str]) -> None:
    """Take the state components of masked features out of leaf 0xD."""
    gone = {component for name in cleared for component in XSAVE_COMPONENTS.get(name, ())}
    if "xsaves" in cleared:
        # No XSAVES, no IA32_XSS: no supervisor state components.
        subleaf1 = find_entry(entries, LEAF_XSAVE, 1)
        if subleaf1 is not None:
            subleaf1.ecx = subleaf1.edx = 0
        gone |= {
            entry.index
            for entry in entries
            if entry.function == LEAF_XSAVE and entry.index >= 2
            and entry.ecx & XSAVE_SUPERVISOR_COMPONENT
        }
    if not gone:
        return

    for entry in entries:
        if entry.function == LEAF_XSAVE and entry.index in gone:
            entry.eax = entry.ebx = entry.ecx = entry.edx = 0
    subleaf0 = find_entry(entries, LEAF_XSAVE, 0)
    if subleaf0 is None:
        return
    xcr0_supported = (subleaf0.edx << 32 | subleaf0.eax) & ~sum(1 << c for c in gone)
    subleaf0.eax = xcr0_supported & 0xFFFFFFFF
    subleaf0.edx = xcr0_supported >> 32
    # ECX: the XSAVE area size (standard format) for every component XCR0 may enable.
    # (EBX, the size for the components enabled now, KVM keeps up to date itself.)
    size = XSAVE_LEGACY_AREA_SIZE + XSAVE_HEADER_SIZE
    for entry in entries:
        if (entry.function == LEAF_XSAVE and entry.index >= 2
                and xcr0_supported >> entry.index & 1):
            size = max(size, entry.ebx + entry.eax)  # offset + size
    subleaf0.ecx = size


def _set_max_leaves(entries: list[CpuidEntry]) -> None:
    """Make leaves 0, 0x40000000 and 0x80000000 report the highest leaf present."""
    for leaf_range in (BASIC_RANGE, KVM_RANGE, EXTENDED_RANGE):
        functions = [entry.function for entry in entries if entry.function in leaf_range]
        top = find_entry(entries, leaf_range.start)
        if top is not None:
            top.eax = max(functions)


def features_still_visible(table: Iterable[CpuidEntry], mask: Iterable[str]) -> tuple[str, ...]:
    """The names in `mask` whose bit is still set in `table` (the table KVM actually holds,
    read back with KVM_GET_CPUID2).  Some KVMs merge host bits into what the VMM set;
    a guest kernel can still be told to ignore those with `clearcpuid=<names>`."""
    entries = list(table)
    visible = []
    for name in dict.fromkeys(_canonical(n) for n in mask):
        where = FEATURES[name]
        entry = find_entry(entries, where.leaf, where.subleaf)
        if entry is not None and getattr(entry, where.register) >> where.bit & 1:
            visible.append(name)
    return tuple(visible)
