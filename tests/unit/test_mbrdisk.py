"""scripts/mbrdisk.py: the MBR, the ext4 partition made at an offset, GRUB's embedding (its
offsets checked against Debian's own boot.img and diskboot.img), and the sparse copy by extents."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess

import pytest

from tests.support import scriptload

mbrdisk = scriptload.load("mbrdisk")
HAVE_GRUB = (mbrdisk.GRUB_DIR / "boot.img").is_file() and shutil.which("grub-mkimage") is not None
need_grub = pytest.mark.skipif(not HAVE_GRUB, reason="no grub-mkimage or /usr/lib/grub/i386-pc (grub-pc-bin)")


def test_partition_table_has_one_bootable_linux_partition_from_1_mib():
    table = mbrdisk.partition_table(4096 * 1024)
    assert len(table) == 512 - 0x1B8 and table[-2:] == b"\x55\xaa"
    boot, ptype, start, count = struct.unpack_from("<B3xB3xII", table, 6)
    assert (boot, ptype, start, count) == (0x80, 0x83, 2048, 4096 * 1024 - 2048)
    assert not any(table[6 + 16:-2])  # the other three entries are empty


def test_partition_table_refuses_a_disk_without_room():
    with pytest.raises(mbrdisk.DiskError):
        mbrdisk.partition_table(2048)


@need_grub
def test_debians_grub_images_have_the_fields_where_mbrdisk_patches_them():
    boot = (mbrdisk.GRUB_DIR / "boot.img").read_bytes()
    assert struct.unpack_from("<Q", boot, mbrdisk.KERNEL_SECTOR)[0] == 1
    assert boot[mbrdisk.BOOT_DRIVE] == 0xFF
    assert boot[mbrdisk.DRIVE_CHECK] == 0xEB  # a short jmp, the one grub-setup makes NOPs
    diskboot = (mbrdisk.GRUB_DIR / "diskboot.img").read_bytes()
    assert struct.unpack_from("<QHH", diskboot, mbrdisk.BLOCKLIST) == (2, 0, mbrdisk.LOAD_SEGMENT)


@need_grub
def test_boot_sector_and_core_as_grub_setup_would_write_them(tmp_path):
    core = mbrdisk.make_core(tmp_path / "core.img")
    sectors = -(-len(core) // 512)
    assert struct.unpack_from("<QHH", core, mbrdisk.BLOCKLIST) == (2, sectors - 1, 0x820)  # grub-mkimage's
    embedded = mbrdisk.embedded_core(core)
    assert len(embedded) == sectors * 512 and embedded[:len(core)] == core
    table = mbrdisk.partition_table(1 << 22)
    mbr = mbrdisk.boot_sector((mbrdisk.GRUB_DIR / "boot.img").read_bytes(), table)
    assert mbr[0x1B8:] == table and mbr[mbrdisk.DRIVE_CHECK:mbrdisk.DRIVE_CHECK + 2] == b"\x90\x90"
    with pytest.raises(mbrdisk.DiskError, match="blocklist"):
        mbrdisk.embedded_core(core[:512] + core[1024:])  # a count that does not match its size


@need_grub
def test_a_disk_grub_reads_its_partition_and_files_from(tmp_path):
    root = tmp_path / "root"
    (root / "boot" / "grub").mkdir(parents=True)
    (root / "boot" / "grub" / "grub.cfg").write_text("echo hello\n")
    (root / "etc").mkdir()
    (root / "etc" / "hostname").write_text("pyvmm-test\n")
    image = tmp_path / "disk.img"
    mbrdisk.make_disk(image, root, size=64 << 20, label="pyvmm-test")
    sectors = mbrdisk.install_grub(image, tmp_path)
    data = image.read_bytes()[:1 << 20]
    assert data[510:512] == b"\x55\xaa" and struct.unpack_from("<Q", data, 0x5C)[0] == 1
    assert 2 <= sectors < 2048 and struct.unpack_from("<QH", data, 512 + mbrdisk.BLOCKLIST) == (2, sectors - 1)
    sb = (1 << 20) + 1024  # ext4's superblock in the partition: its magic and label
    with open(image, "rb") as f:
        f.seek(sb)
        block = f.read(1024)
    assert struct.unpack_from("<H", block, 0x38)[0] == 0xEF53 and block[0x78:0x88].rstrip(b"\0") == b"pyvmm-test"
    if shutil.which("grub-fstest"):  # GRUB's own msdos and ext2 drivers on the image
        out = subprocess.run(["grub-fstest", str(image), "cat", "(loop0,msdos1)/etc/hostname"],
                             capture_output=True, text=True)
        assert out.stdout == "pyvmm-test\n", out.stderr
    with pytest.raises(mbrdisk.DiskError, match="where core.img goes"):
        mbrdisk.install_grub(image, tmp_path)  # already there: refused rather than written twice


def test_copy_by_extents_keeps_data_and_holes(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    with open(src, "wb") as f:
        f.truncate(32 << 20)
        f.seek(1 << 20)
        f.write(b"a" * 5000)
        f.seek(20 << 20)
        f.write(b"b" * 70000)
    extents = mbrdisk.data_extents(src)
    assert sum(length for _, length in extents) < 1 << 20  # holes seen (a file system with SEEK_HOLE)
    mbrdisk.copy_extents(src, dst, extents, os.path.getsize(src))
    assert dst.read_bytes() == src.read_bytes()
    assert os.stat(dst).st_blocks * 512 < 1 << 20
