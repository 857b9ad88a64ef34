"""Tests for kernel/cpuid.py: the per-vCPU CPUID table.

Two hand-written KVM_GET_SUPPORTED_CPUID tables stand in for real hosts: an Intel
Xeon (Sapphire Rapids-like, with AMX and AVX-512) and an AMD EPYC (Genoa-like).
A last test asks this machine's /dev/kvm for its own table through a small ctypes
ioctl and checks the same invariants on it.
"""

from __future__ import annotations

import copy
import ctypes
import errno
import os

import pytest

from kernel.cpuid import (
    EMULATOR_MASK,
    FEATURES,
    KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
    KVM_FEATURE_CLOCKSOURCE,
    KVM_FEATURE_CLOCKSOURCE2,
    KVM_FEATURE_CLOCKSOURCE_STABLE_BIT,
    SYNTHESIZED_KVM_FEATURES,
    CpuidEntry,
    find_entry,
    known_features,
    masked_features,
    parse_mask,
    vcpu_cpuid,
)

SIG = KVM_CPUID_FLAG_SIGNIFCANT_INDEX


def bits(*positions: int) -> int:
    value = 0
    for position in positions:
        value |= 1 << position
    return value


def E(function: int, index: int, eax: int, ebx: int, ecx: int, edx: int, flags: int = 0) -> CpuidEntry:
    return CpuidEntry(function, index, flags, eax, ebx, ecx, edx)


def vendor_regs(name: bytes) -> tuple[int, int, int]:
    """EBX, ECX, EDX of leaf 0 for a 12-byte vendor string (stored EBX, EDX, ECX)."""
    ebx, edx, ecx = (int.from_bytes(name[i : i + 4], "little") for i in (0, 4, 8))
    return ebx, ecx, edx


def brand_leaves(brand: str) -> list[CpuidEntry]:
    raw = brand.encode().ljust(48, b"\0")
    words = [int.from_bytes(raw[i : i + 4], "little") for i in range(0, 48, 4)]
    return [E(0x80000002 + n, 0, *words[4 * n : 4 * n + 4]) for n in range(3)]


KVM_SIGNATURE_REGS = (0x4B4D564B, 0x564B4D56, 0x4D)  # "KVMK" "VMKV" "M\0\0\0"
HOST_KVM_FEATURES = 0x01007EFB


def intel_host() -> list[CpuidEntry]:
    """KVM_GET_SUPPORTED_CPUID as a Sapphire Rapids Xeon (56 cores, 2 threads) reports it."""
    ebx, ecx, edx = vendor_regs(b"GenuineIntel")
    return [
        E(0x0, 0, 0x1F, ebx, ecx, edx),
        E(0x1, 0, 0x000806F8,
          0x1A400800,  # host APIC id 0x1a, 64 logical ids, CLFLUSH 8*8 bytes
          bits(0, 1, 5, 9, 12, 13, 15, 17, 19, 20, 21, 22, 23, 24, 25, 26, 28, 29, 30),  # no hypervisor bit
          0x0F8BFBFF),  # no HTT
        E(0x2, 0, 0x00FEFF01, 0x000000F0, 0, 0),
        # Deterministic cache parameters: L1d, L1i, L2 (2 threads each), L3 (128), end.
        E(0x4, 0, 0xFC004121, 0x02C0003F, 0x0000003F, 0x00000000, SIG),
        E(0x4, 1, 0xFC004122, 0x01C0003F, 0x0000003F, 0x00000000, SIG),
        E(0x4, 2, 0xFC004143, 0x03C0003F, 0x000007FF, 0x00000000, SIG),
        E(0x4, 3, 0xFC1FC163, 0x04C0003F, 0x0001BFFF, 0x00000004, SIG),
        E(0x4, 4, 0x00000000, 0x00000000, 0x00000000, 0x00000000, SIG),
        E(0x6, 0, 0x00000004, 0, 0, 0),
        E(0x7, 0, 0x00000001,
          bits(0, 1, 3, 5, 7, 8, 9, 10, 11, 16, 17, 18, 19, 20, 21, 23, 24, 28, 29, 30, 31),
          bits(1, 2, 3, 5, 6, 8, 9, 10, 11, 12, 14, 16, 22, 24, 25, 27, 28),
          bits(4, 10, 14, 16, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31), SIG),
        E(0x7, 1, bits(4, 5), 0, 0, 0, SIG),
        E(0xA, 0, 0x08300805, 0, 0, 0x00008603),
        # The host's own x2APIC topology: 2 threads, 112 logical processors.
        E(0xB, 0, 0x00000001, 0x00000002, 0x00000100, 0x0000001A, SIG),
        E(0xB, 1, 0x00000007, 0x00000070, 0x00000201, 0x0000001A, SIG),
        E(0xB, 2, 0x00000000, 0x00000000, 0x00000002, 0x0000001A, SIG),
        # XSAVE: x87, SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM, PKRU, TILECFG, TILEDATA.
        E(0xD, 0, 0x000602E7, 0x00002B00, 0x00002B00, 0x00000000, SIG),
        E(0xD, 1, bits(0, 1, 2, 3, 4), 0x00000000, 0x00000000, 0x00000000, SIG),
        E(0xD, 2, 0x00000100, 0x00000240, 0x00000000, 0x00000000, SIG),
        E(0xD, 5, 0x00000040, 0x00000440, 0x00000000, 0x00000000, SIG),
        E(0xD, 6, 0x00000200, 0x00000480, 0x00000000, 0x00000000, SIG),
        E(0xD, 7, 0x00000400, 0x00000680, 0x00000000, 0x00000000, SIG),
        E(0xD, 9, 0x00000008, 0x00000A80, 0x00000000, 0x00000000, SIG),
        E(0xD, 17, 0x00000040, 0x00000AC0, 0x00000002, 0x00000000, SIG),
        E(0xD, 18, 0x00002000, 0x00000B00, 0x00000006, 0x00000000, SIG),
        E(0x1F, 0, 0x00000001, 0x00000002, 0x00000100, 0x0000001A, SIG),
        E(0x1F, 1, 0x00000007, 0x00000070, 0x00000201, 0x0000001A, SIG),
        E(0x1F, 2, 0x00000000, 0x00000000, 0x00000002, 0x0000001A, SIG),
        E(0x40000000, 0, 0x40000001, *KVM_SIGNATURE_REGS),
        E(0x40000001, 0, HOST_KVM_FEATURES, 0, 0, 0),
        E(0x80000000, 0, 0x80000008, 0, 0, 0),
        E(0x80000001, 0, 0, 0, bits(0, 5, 8), bits(11, 20, 26, 27, 29)),
        *brand_leaves("Intel(R) Xeon(R) Platinum 8480+"),
        E(0x80000005, 0, 0, 0, 0, 0),
        E(0x80000006, 0, 0, 0, 0x08007040, 0),
        E(0x80000007, 0, 0, 0, 0, 0x00000100),
        E(0x80000008, 0, 0x0000392E, bits(9), 0, 0),  # 46 physical, 57 linear bits
    ]


def amd_host() -> list[CpuidEntry]:
    """KVM_GET_SUPPORTED_CPUID as an EPYC (Zen 4) host reports it."""
    ebx, ecx, edx = vendor_regs(b"AuthenticAMD")
    return [
        E(0x0, 0, 0x10, ebx, ecx, edx),
        E(0x1, 0, 0x00A10F11, 0x05800800,
          bits(0, 1, 9, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 28, 29, 30, 31),
          0x178BFBFF),  # with HTT
        E(0x4, 0, 0, 0, 0, 0, SIG),  # reserved on AMD: no caches described
        E(0x6, 0, 0x00000004, 0, 0, 0),
        E(0x7, 0, 0x00000001,
          bits(0, 1, 3, 5, 7, 8, 9, 10, 16, 17, 18, 19, 20, 21, 23, 24, 28, 29, 30, 31),
          bits(1, 2, 3, 6, 8, 9, 10, 11, 12, 14, 16, 22),
          bits(4, 29), SIG),
        E(0x7, 1, bits(5), 0, 0, 0, SIG),
        E(0xB, 0, 0, 0, 0, 0, SIG),
        E(0xD, 0, 0x000002E7, 0x00000988, 0x00000988, 0x00000000, SIG),
        E(0xD, 1, bits(0, 1, 2, 3), 0, 0, 0, SIG),
        E(0xD, 2, 0x00000100, 0x00000240, 0, 0, SIG),
        E(0xD, 5, 0x00000040, 0x00000340, 0, 0, SIG),
        E(0xD, 6, 0x00000200, 0x00000380, 0, 0, SIG),
        E(0xD, 7, 0x00000400, 0x00000580, 0, 0, SIG),
        E(0xD, 9, 0x00000008, 0x00000980, 0, 0, SIG),
        E(0x40000000, 0, 0x40000001, *KVM_SIGNATURE_REGS),
        E(0x40000001, 0, HOST_KVM_FEATURES, 0, 0, 0),
        E(0x80000000, 0, 0x80000021, 0, 0, 0),
        E(0x80000001, 0, 0x00A10F11, 0x40000000,
          bits(0, 1, 2, 5, 6, 7, 8, 9, 22), bits(11, 20, 22, 26, 27, 29) | 0x0183F3FF),
        *brand_leaves("AMD EPYC 9654 96-Core Processor"),
        E(0x80000005, 0, 0xFF40FF40, 0xFF40FF40, 0x20080140, 0x20080140),
        E(0x80000006, 0, 0x48002200, 0x68004200, 0x02006140, 0x02009140),
        E(0x80000007, 0, 0, 0, 0, 0x00000100),
        E(0x80000008, 0, 0x00003030, 0x0100D000, 0x0001707F, 0),  # PerfTscSize 1, ApicIdSize 7, NC 127
        E(0x8000001D, 0, 0x00004121, 0x01C0003F, 0x0000003F, 0x00000000, SIG),
        E(0x8000001D, 1, 0x00004122, 0x01C0003F, 0x0000003F, 0x00000000, SIG),
        E(0x8000001D, 2, 0x00004143, 0x01C0003F, 0x000007FF, 0x00000002, SIG),
        E(0x8000001D, 3, 0x0003C163, 0x03C0003F, 0x00007FFF, 0x00000001, SIG),
        E(0x8000001D, 4, 0, 0, 0, 0, SIG),
        E(0x8000001E, 0, 0x0000002F, 0x0000010B, 0x00000000, 0x00000000),
        E(0x80000021, 0, 0x00000045, 0, 0, 0),
    ]


HOSTS = {"intel": intel_host, "amd": amd_host}

# num_cpus -> (leaf 1 EBX[23:16], core-level shift = ceil(log2(num_cpus)))
TOPOLOGIES = {1: (1, 0), 2: (2, 1), 3: (4, 2), 4: (4, 2), 8: (8, 3), 64: (64, 6)}


def leaf(table: list[CpuidEntry], function: int, index: int = 0) -> CpuidEntry:
    entry = find_entry(table, function, index)
    assert entry is not None, f"leaf {function:#x}.{index} missing"
    return entry


def field(value: int, high: int, low: int) -> int:
    return (value >> low) & ((1 << (high - low + 1)) - 1)


def cleared_bits(before: list[CpuidEntry], after: list[CpuidEntry], *, skip=()) -> set[tuple]:
    """(function, index, register, bit) of every bit set in `before` and clear in `after`.

    Also checks that no bit was set, and that both tables hold the same entries.
    """
    assert [(e.function, e.index) for e in before] == [(e.function, e.index) for e in after]
    cleared = set()
    for old, new in zip(before, after):
        if old.function in skip:
            continue
        for register in ("eax", "ebx", "ecx", "edx"):
            was, now = getattr(old, register), getattr(new, register)
            assert now & ~was == 0, f"{old.function:#x}.{old.index} {register}: bits set"
            for bit in range(32):
                if was >> bit & 1 and not now >> bit & 1:
                    cleared.add((old.function, old.index, register, bit))
    return cleared


# --- Topology ------------------------------------------------------------------------


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("num_cpus", TOPOLOGIES)
def test_apic_ids_and_logical_counts(host, num_cpus):
    logical_ids, core_shift = TOPOLOGIES[num_cpus]
    supported = HOSTS[host]()
    for vcpu in sorted({0, 1 % num_cpus, num_cpus - 1}):
        table = vcpu_cpuid(supported, vcpu_index=vcpu, num_cpus=num_cpus)
        leaf1 = leaf(table, 0x1)
        assert field(leaf1.ebx, 31, 24) == vcpu
        assert field(leaf1.ebx, 23, 16) == logical_ids
        assert field(leaf1.ebx, 15, 0) == field(leaf(supported, 0x1).ebx, 15, 0)  # CLFLUSH etc kept
        assert bool(leaf1.edx & bits(28)) == (num_cpus > 1)  # HTT
        assert leaf1.ecx & bits(31)  # hypervisor present

        topology_leaves = [0xB, 0x1F] if host == "intel" else [0xB]
        for function in topology_leaves:
            subleaves = [e for e in table if e.function == function]
            assert [e.index for e in subleaves] == [0, 1, 2]
            smt, core, end = subleaves
            assert all(e.flags & SIG for e in subleaves)
            assert all(e.edx == vcpu for e in subleaves)  # x2APIC id
            assert all(field(e.ecx, 7, 0) == e.index for e in subleaves)
            assert (field(smt.eax, 4, 0), field(smt.ebx, 15, 0), field(smt.ecx, 15, 8)) == (0, 1, 1)
            assert (field(core.eax, 4, 0), field(core.ebx, 15, 0), field(core.ecx, 15, 8)) == (
                core_shift, num_cpus, 2)
            assert (end.eax, end.ebx, field(end.ecx, 15, 8)) == (0, 0, 0)


@pytest.mark.parametrize("num_cpus", [1, 2, 3, 4, 8, 64])
def test_intel_cache_sharing(num_cpus):
    supported = intel_host()
    table = vcpu_cpuid(supported, vcpu_index=0, num_cpus=num_cpus)
    for index, expected_sharing in [(0, 1), (1, 1), (2, 1), (3, num_cpus)]:
        cache = leaf(table, 0x4, index)
        assert field(cache.eax, 25, 14) == expected_sharing - 1
        assert field(cache.eax, 31, 26) == num_cpus - 1
        original = leaf(supported, 0x4, index)
        assert field(cache.eax, 13, 0) == field(original.eax, 13, 0)  # type, level, ...
        assert (cache.ebx, cache.ecx, cache.edx) == (original.ebx, original.ecx, original.edx)
    assert leaf(table, 0x4, 4) == leaf(supported, 0x4, 4)  # the terminating subleaf


@pytest.mark.parametrize("num_cpus", [1, 2, 3, 4, 8, 64])
def test_amd_topology(num_cpus):
    supported = amd_host()
    _, core_shift = TOPOLOGIES[num_cpus]
    vcpu = num_cpus - 1
    table = vcpu_cpuid(supported, vcpu_index=vcpu, num_cpus=num_cpus)

    sizes = leaf(table, 0x80000008)
    assert field(sizes.ecx, 7, 0) == num_cpus - 1  # NC
    assert field(sizes.ecx, 15, 12) == core_shift  # ApicIdSize
    assert field(sizes.ecx, 17, 16) == 1  # PerfTscSize kept
    assert sizes.eax == leaf(supported, 0x80000008).eax

    assert bool(leaf(table, 0x80000001).ecx & bits(1)) == (num_cpus > 1)  # CmpLegacy

    ext_apic = leaf(table, 0x8000001E)
    assert ext_apic.eax == vcpu  # extended APIC id
    assert field(ext_apic.ebx, 7, 0) == vcpu  # core id
    assert field(ext_apic.ebx, 15, 8) == 0  # one thread per core
    assert ext_apic.ecx == 0  # node 0, one node

    for index, expected_sharing in [(0, 1), (1, 1), (2, 1), (3, num_cpus)]:
        assert field(leaf(table, 0x8000001D, index).eax, 25, 14) == expected_sharing - 1
    assert leaf(table, 0x4) == leaf(supported, 0x4)  # leaf 4 holds no cache on AMD


def test_intel_host_gets_no_amd_leaves():
    supported = intel_host()
    table = vcpu_cpuid(supported, vcpu_index=1, num_cpus=4)
    assert {e.function for e in table} == {e.function for e in supported}
    assert leaf(table, 0x80000008) == leaf(supported, 0x80000008)  # ECX reserved on Intel
    assert leaf(table, 0x80000001) == leaf(supported, 0x80000001)  # no CmpLegacy


def test_leaf_0x1f_only_when_supported():
    supported = [e for e in intel_host() if e.function != 0x1F]
    table = vcpu_cpuid(supported, vcpu_index=0, num_cpus=2)
    assert find_entry(table, 0x1F) is None
    assert leaf(table, 0x0).eax == 0xD  # the highest basic leaf left


def test_other_leaves_pass_through():
    supported = intel_host()
    table = vcpu_cpuid(supported, vcpu_index=2, num_cpus=4)
    for function in (0x2, 0x6, 0x7, 0xA, 0xD, 0x80000002, 0x80000006, 0x80000008):
        for original in (e for e in supported if e.function == function):
            assert leaf(table, function, original.index) == original


def test_output_is_sorted_and_unique():
    table = vcpu_cpuid(amd_host(), vcpu_index=0, num_cpus=2)
    keys = [(e.function, e.index) for e in table]
    assert keys == sorted(set(keys))


def test_bad_vcpu_index_or_count():
    with pytest.raises(ValueError):
        vcpu_cpuid(intel_host(), vcpu_index=4, num_cpus=4)
    with pytest.raises(ValueError):
        vcpu_cpuid(intel_host(), vcpu_index=-1, num_cpus=4)
    with pytest.raises(ValueError):
        vcpu_cpuid(intel_host(), vcpu_index=0, num_cpus=0)


def test_input_is_not_mutated():
    for make in HOSTS.values():
        supported = make()
        pristine = copy.deepcopy(supported)
        for num_cpus in (1, 3):
            for vcpu in range(num_cpus):
                table = vcpu_cpuid(supported, vcpu_index=vcpu, num_cpus=num_cpus,
                                   mask=("xsave", "cx16", "la57", "pdpe1gb"))
                assert not any(out is inp for out in table for inp in supported)
        assert supported == pristine


# --- Max leaves ----------------------------------------------------------------------


def test_max_leaves_match_what_is_present():
    supported = intel_host()
    leaf(supported, 0x0).eax = 0x20  # claims more than is there
    leaf(supported, 0x80000000).eax = 0x80000010
    table = vcpu_cpuid(supported, vcpu_index=0, num_cpus=1)
    assert leaf(table, 0x0).eax == 0x1F
    assert leaf(table, 0x80000000).eax == 0x80000008
    assert leaf(table, 0x40000000).eax == 0x40000001


# --- KVM paravirtual leaves ----------------------------------------------------------


def signature(entry: CpuidEntry) -> bytes:
    return b"".join(r.to_bytes(4, "little") for r in (entry.ebx, entry.ecx, entry.edx))


@pytest.mark.parametrize("host", HOSTS)
def test_kvm_leaves_kept(host):
    table = vcpu_cpuid(HOSTS[host](), vcpu_index=0, num_cpus=2)
    sig = leaf(table, 0x40000000)
    assert signature(sig) == b"KVMKVMKVM\0\0\0"
    assert sig.eax == 0x40000001
    assert leaf(table, 0x40000001).eax == HOST_KVM_FEATURES


def test_kvm_leaves_synthesized_when_missing():
    supported = [e for e in intel_host() if not 0x40000000 <= e.function < 0x40000100]
    table = vcpu_cpuid(supported, vcpu_index=0, num_cpus=2)
    sig = leaf(table, 0x40000000)
    assert signature(sig).rstrip(b"\0").decode() == "KVMKVMKVM"
    assert sig.eax == 0x40000001
    features = leaf(table, 0x40000001)
    assert features.eax == SYNTHESIZED_KVM_FEATURES == bits(
        KVM_FEATURE_CLOCKSOURCE, KVM_FEATURE_CLOCKSOURCE2, KVM_FEATURE_CLOCKSOURCE_STABLE_BIT)
    assert (features.ebx, features.ecx, features.edx) == (0, 0, 0)


def test_old_host_signature_eax_zero_is_fixed():
    supported = intel_host()
    leaf(supported, 0x40000000).eax = 0  # "old hosts set eax value to 0x0" (cpuid.rst)
    assert leaf(vcpu_cpuid(supported, vcpu_index=0, num_cpus=1), 0x40000000).eax == 0x40000001


def test_missing_features_leaf_added_to_existing_signature():
    supported = [e for e in intel_host() if e.function != 0x40000001]
    table = vcpu_cpuid(supported, vcpu_index=0, num_cpus=1)
    assert leaf(table, 0x40000001).eax == SYNTHESIZED_KVM_FEATURES


# --- Masking -------------------------------------------------------------------------

LEAF1, LEAF7, LEAF7_1, EXT1 = (0x1, 0), (0x7, 0), (0x7, 1), (0x80000001, 0)


def at(where: tuple[int, int], register: str, *positions: int) -> set[tuple]:
    return {(*where, register, bit) for bit in positions}


def masked_vs_plain(supported, mask, **skip):
    plain = vcpu_cpuid(supported, vcpu_index=1, num_cpus=2)
    masked = vcpu_cpuid(supported, vcpu_index=1, num_cpus=2, mask=mask)
    return plain, masked, cleared_bits(plain, masked, **skip)


def test_mask_cx16_clears_one_bit():
    _, _, cleared = masked_vs_plain(intel_host(), ["cx16"])
    assert cleared == at(LEAF1, "ecx", 13)


def test_mask_xsave_intel_clears_all_dependents():
    plain, masked, cleared = masked_vs_plain(intel_host(), ["xsave"], skip={0xD})
    assert cleared == (
        at(LEAF1, "ecx", 26, 28, 12, 29)  # xsave, avx, fma, f16c
        | at(LEAF7, "ebx", 5, 16, 17, 21, 28, 30, 31)  # avx2, avx512 f/dq/ifma/cd/bw/vl
        # avx512vbmi, pku, avx512_vbmi2, vaes, vpclmulqdq, avx512_vnni/bitalg/vpopcntdq
        | at(LEAF7, "ecx", 1, 3, 6, 9, 10, 11, 12, 14)
        | at(LEAF7, "edx", 22, 23, 24, 25)  # amx_bf16, avx512_fp16, amx_tile, amx_int8
        | at(LEAF7_1, "eax", 4, 5)  # avx_vnni, avx512_bf16
    )
    xsave_leaves = [e for e in masked if e.function == 0xD]
    assert [e.index for e in xsave_leaves] == [e.index for e in plain if e.function == 0xD]
    assert all((e.eax, e.ebx, e.ecx, e.edx) == (0, 0, 0, 0) for e in xsave_leaves)


def test_mask_xsave_amd_clears_xop_family_too():
    supported = amd_host()
    leaf(supported, 0x80000001).ecx |= bits(11, 16)  # a Bulldozer-style XOP/FMA4 host
    _, _, cleared = masked_vs_plain(supported, ["xsave"], skip={0xD})
    assert at(EXT1, "ecx", 11, 16) <= cleared
    assert at(LEAF1, "ecx", 26, 28, 12, 29) <= cleared
    assert not {bit for bit in cleared if bit[:2] == EXT1} - at(EXT1, "ecx", 11, 16)


def test_emulator_mask():
    assert EMULATOR_MASK == ("cx16", "xsave")
    table = vcpu_cpuid(intel_host(), vcpu_index=0, num_cpus=1, mask=EMULATOR_MASK)
    assert leaf(table, 0x1).ecx & bits(13, 26, 27, 28) == 0
    assert leaf(table, 0x7).ebx & bits(5, 16) == 0


def test_mask_avx512_removes_its_xsave_components():
    plain, masked, cleared = masked_vs_plain(intel_host(), ["avx512"], skip={0xD})
    assert cleared == (
        at(LEAF7, "ebx", 16, 17, 21, 28, 30, 31)
        | at(LEAF7, "ecx", 1, 6, 11, 12, 14)
        | at(LEAF7, "edx", 23)
        | at(LEAF7_1, "eax", 5)
    )
    assert leaf(masked, 0xD, 0).eax == leaf(plain, 0xD, 0).eax & ~bits(5, 6, 7)
    for component in (5, 6, 7):
        assert leaf(masked, 0xD, component).eax == 0
    assert leaf(masked, 0xD, 2) == leaf(plain, 0xD, 2)
    assert leaf(masked, 0xD, 0).ecx == 0x2B00  # TILEDATA still ends the area


def test_mask_amx_shrinks_the_xsave_area():
    plain, masked, cleared = masked_vs_plain(intel_host(), ["amx_tile"], skip={0xD})
    assert cleared == at(LEAF7, "edx", 22, 24, 25)
    assert leaf(masked, 0xD, 0).eax == 0x2E7
    assert leaf(masked, 0xD, 0).ecx == 0xA80 + 8  # ends with PKRU now
    assert leaf(masked, 0xD, 18).eax == 0


def test_mask_xsaves_only_touches_subleaf1():
    plain, masked, cleared = masked_vs_plain(intel_host(), ["xsaves"])
    assert cleared == {(0xD, 1, "eax", 3)}


def test_mask_la57_shortens_linear_addresses():
    plain, masked, cleared = masked_vs_plain(intel_host(), ["la57"], skip={0x80000008})
    assert cleared == at(LEAF7, "ecx", 16)
    assert field(leaf(masked, 0x80000008).eax, 15, 8) == 48
    assert field(leaf(masked, 0x80000008).eax, 7, 0) == 46


@pytest.mark.parametrize(
    "name, where, register, bit",
    [
        ("x2apic", LEAF1, "ecx", 21),
        ("pcid", LEAF1, "ecx", 17),
        ("tsc_deadline", LEAF1, "ecx", 24),
        ("tsc_deadline_timer", LEAF1, "ecx", 24),
        ("rdrand", LEAF1, "ecx", 30),
        ("rdseed", LEAF7, "ebx", 18),
        ("pdpe1gb", EXT1, "edx", 26),
        ("arch_capabilities", LEAF7, "edx", 29),
    ],
)
def test_single_bit_masks(name, where, register, bit):
    _, _, cleared = masked_vs_plain(intel_host(), [name])
    assert cleared == {(*where, register, bit)}


def test_masking_an_absent_feature_is_harmless():
    supported = intel_host()
    _, _, cleared = masked_vs_plain(supported, ["svm", "xop", "mpx"])
    assert cleared == set()


def test_unknown_mask_name():
    with pytest.raises(ValueError) as info:
        vcpu_cpuid(intel_host(), vcpu_index=0, num_cpus=1, mask=["cx16", "warp_drive"])
    message = str(info.value)
    assert "warp_drive" in message
    for name in ("cx16", "xsave", "avx512", "x2apic", "pdpe1gb", "rdrand", "rdseed", "la57",
                 "pcid", "tsc_deadline"):
        assert name in message


def test_feature_table_is_consistent():
    seen = {}
    for name, where in FEATURES.items():
        assert where.register in ("eax", "ebx", "ecx", "edx")
        assert 0 <= where.bit < 32
        assert where not in seen, f"{name} and {seen[where]} share a bit"
        seen[where] = name
    assert FEATURES["cx16"] == (1, 0, "ecx", 13)
    assert FEATURES["xsave"] == (1, 0, "ecx", 26)
    assert masked_features(["xsave"]) >= {"osxsave", "avx", "fma", "f16c", "avx2", "avx512f",
                                          "avx512vl", "avx512_bf16", "amx_int8"}
    assert set(known_features()) >= set(FEATURES)


def test_parse_mask():
    assert parse_mask("cx16,xsave") == ("cx16", "xsave")
    assert parse_mask(" cx16 , XSAVE,,cx16 ") == ("cx16", "xsave")
    assert parse_mask("avx512,tsc_deadline_timer") == ("avx512f", "tsc_deadline")
    assert parse_mask("") == ()
    with pytest.raises(ValueError, match="known features"):
        parse_mask("cx16,nope")


# --- This host's KVM -----------------------------------------------------------------

KVM_GET_SUPPORTED_CPUID = 0xC008AE05  # _IOWR(KVMIO, 0x05, struct kvm_cpuid2)


class KvmCpuidEntry2(ctypes.Structure):
    _fields_ = [
        ("function", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("eax", ctypes.c_uint32),
        ("ebx", ctypes.c_uint32),
        ("ecx", ctypes.c_uint32),
        ("edx", ctypes.c_uint32),
        ("padding", ctypes.c_uint32 * 3),
    ]


def kvm_supported_cpuid() -> list[CpuidEntry]:
    """KVM_GET_SUPPORTED_CPUID on /dev/kvm, growing the buffer while KVM says E2BIG."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        capacity = 64
        while True:
            class KvmCpuid2(ctypes.Structure):
                _fields_ = [
                    ("nent", ctypes.c_uint32),
                    ("padding", ctypes.c_uint32),
                    ("entries", KvmCpuidEntry2 * capacity),
                ]

            buffer = KvmCpuid2(nent=capacity)
            if libc.ioctl(fd, KVM_GET_SUPPORTED_CPUID, ctypes.byref(buffer)) == 0:
                break
            error = ctypes.get_errno()
            if error != errno.E2BIG or capacity >= 4096:
                raise OSError(error, os.strerror(error))
            capacity *= 2
    finally:
        os.close(fd)
    return [
        CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
        for e in buffer.entries[: buffer.nent]
    ]


@pytest.mark.kvm
@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no usable /dev/kvm")
def test_host_kvm_supported_cpuid():
    supported = kvm_supported_cpuid()
    pristine = copy.deepcopy(supported)
    leaf0 = leaf(supported, 0x0)
    vendor = b"".join(r.to_bytes(4, "little") for r in (leaf0.ebx, leaf0.edx, leaf0.ecx))
    pv = [e for e in supported if 0x40000000 <= e.function < 0x40000100]
    leaf1 = leaf(supported, 0x1)
    print(f"\nhost KVM: vendor {vendor.decode()}, {len(supported)} entries, max basic leaf "
          f"{leaf0.eax:#x}, max extended leaf {leaf(supported, 0x80000000).eax:#x}")
    for entry in pv:
        print(f"  {entry.function:#x}: eax={entry.eax:#010x} signature={signature(entry)!r}")
    print(f"  leaf 1 ecx={leaf1.ecx:#010x} cx16={bool(leaf1.ecx & bits(13))} "
          f"xsave={bool(leaf1.ecx & bits(26))}")

    for num_cpus in range(1, 5):
        _, core_shift = TOPOLOGIES[num_cpus]
        for vcpu in range(num_cpus):
            table = vcpu_cpuid(supported, vcpu_index=vcpu, num_cpus=num_cpus, mask=EMULATOR_MASK)
            keys = [(e.function, e.index) for e in table]
            assert keys == sorted(set(keys))
            out1 = leaf(table, 0x1)
            assert field(out1.ebx, 31, 24) == vcpu
            assert field(out1.ebx, 23, 16) == 1 << core_shift
            assert out1.ecx & bits(31)
            assert out1.ecx & bits(13, 26, 27, 28) == 0  # cx16, xsave, osxsave, avx
            assert signature(leaf(table, 0x40000000)) == b"KVMKVMKVM\0\0\0"
            assert find_entry(table, 0x40000001) is not None
            for function in (0xB, 0x1F):
                if find_entry(supported, function) is None:
                    assert find_entry(table, function) is None
                    continue
                core = leaf(table, function, 1)
                assert (core.eax, core.ebx, core.edx) == (core_shift, num_cpus, vcpu)
            assert all(e.eax == e.ebx == e.ecx == e.edx == 0 for e in table if e.function == 0xD)
            assert leaf(table, 0x0).eax == max(e.function for e in table if e.function < 0x40000000)
    assert supported == pristine
