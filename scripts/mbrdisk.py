"""A bootable raw disk image without loop devices or mounts: an MBR partition table, one ext4
partition made from a directory (`mkfs.ext4 -d DIR -E offset=...`), and GRUB for BIOS embedded in
the gap before the partition, as `grub-install` would put it there.

    import mbrdisk
    mbrdisk.make_disk(Path("disk.img"), root_dir, size=2 << 30, label="pyvmm-root")
    mbrdisk.install_grub(Path("disk.img"), Path("work"))   # boot.img + core.img, prefix (hd0,msdos1)/boot/grub

GRUB's layout (GRUB 2.06 sources: include/grub/i386/pc/boot.h, grub-core/boot/i386/pc/diskboot.S,
util/mkimage.c, util/setup.c; checked against Debian's /usr/lib/grub/i386-pc images):
- sector 0: boot.img's code up to 0x1B8 (the partition table and 0x55AA follow), with the u64 at
  0x5C (GRUB_BOOT_MACHINE_KERNEL_SECTOR) = the sector of core.img, the byte at 0x64 (BOOT_DRIVE) =
  0xFF (use the drive the BIOS passes in DL), and the 2-byte jump at 0x66 (DRIVE_CHECK) made two
  NOPs, as grub-setup does for a hard disk;
- sectors 1..: core.img (`grub-mkimage -O i386-pc`: diskboot.img, then the rest).  diskboot.img's
  last 12 bytes (0x1F4, GRUB_BOOT_MACHINE_LIST_SIZE) are the first blocklist entry: u64 start
  sector, u16 sector count, u16 load segment (0x820); the 12 bytes before it are the terminator
  (all zeros).  grub-mkimage leaves start=2 and count=the rest's sectors; setup.c's embedding writes
  the same values for a core.img at sector 1, and they are checked here.
Only the standard library is used.
"""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

SECTOR = 512
PART_START = 2048  # the first partition's sector: 1 MiB, leaving GRUB sectors 1..2047
GRUB_DIR = Path("/usr/lib/grub/i386-pc")  # Debian's grub-pc-bin
GRUB_MODULES = ("biosdisk", "part_msdos", "ext2", "normal", "linux", "serial", "terminal", "echo",
                "configfile", "search", "test", "boot")
GRUB_PREFIX = "(hd0,msdos1)/boot/grub"

KERNEL_SECTOR = 0x5C  # boot.img: u64, the sector core.img starts at
BOOT_DRIVE = 0x64  # boot.img: the drive to read core.img from (0xFF: DL as the BIOS gave it)
DRIVE_CHECK = 0x66  # boot.img: a 2-byte jump; grub-setup makes it NOPs for hard disks
NT_MAGIC = 0x1B8  # the disk signature; the partition table follows at 0x1BE
BLOCKLIST = SECTOR - 12  # core.img: its first blocklist entry, at the end of diskboot.img
LOAD_SEGMENT = 0x820  # where diskboot.img loads the rest of core.img (0x8000 + 0x200) >> 4


class DiskError(Exception):
    """A failed step, in one line."""


def _run(args: list[str]) -> None:
    try:
        r = subprocess.run(args, capture_output=True, text=True)
    except FileNotFoundError:
        raise DiskError(f"{args[0]} not found") from None
    if r.returncode != 0:
        lines = [l for l in (r.stderr or r.stdout).splitlines() if l.strip()]
        raise DiskError(f"{args[0]} failed: {lines[-1] if lines else r.returncode}")


def partition_table(total_sectors: int, signature: int = 0x70796D6D) -> bytes:
    """The 72 bytes at 0x1B8: the disk signature, then one bootable Linux partition (type 0x83)
    from PART_START to the end, in LBA (CHS fields 0xFFFFFE: past 8 GiB, as tools write them)."""
    count = total_sectors - PART_START
    if count <= 0:
        raise DiskError("the disk is too small for its partition")
    entry = struct.pack("<B3sB3sII", 0x80, b"\xfe\xff\xff", 0x83, b"\xfe\xff\xff", PART_START, count)
    return struct.pack("<IH", signature, 0) + entry + bytes(48) + b"\x55\xaa"


def make_disk(image: Path, root: Path, *, size: int, label: str) -> None:
    """A sparse `size`-byte image: an MBR with one partition holding ext4 made from `root`."""
    if size % SECTOR:
        raise DiskError("the disk size is not a whole number of sectors")
    with open(image, "wb") as f:
        f.truncate(size)
    fs_kib = (size - PART_START * SECTOR) // 1024
    _run(["mkfs.ext4", "-q", "-F", "-L", label, "-d", str(root), "-E", f"offset={PART_START * SECTOR}",
          str(image), f"{fs_kib}k"])
    with open(image, "r+b") as f:
        f.seek(NT_MAGIC)
        f.write(partition_table(size // SECTOR))


def boot_sector(boot_img: bytes, table: bytes, core_sector: int = 1) -> bytes:
    """Sector 0: boot.img's code patched as grub-setup does, with the disk's partition table."""
    if len(boot_img) != SECTOR or len(table) != SECTOR - NT_MAGIC:
        raise DiskError("boot.img or the partition table has the wrong size")
    mbr = bytearray(boot_img[:NT_MAGIC]) + table
    struct.pack_into("<Q", mbr, KERNEL_SECTOR, core_sector)
    mbr[BOOT_DRIVE] = 0xFF
    mbr[DRIVE_CHECK:DRIVE_CHECK + 2] = b"\x90\x90"
    return bytes(mbr)


def embedded_core(core_img: bytes, core_sector: int = 1) -> bytes:
    """core.img padded to whole sectors, its blocklist saying where its other sectors lie."""
    sectors = -(-len(core_img) // SECTOR)
    if sectors < 2 or core_sector + sectors > PART_START:
        raise DiskError(f"core.img ({len(core_img)} bytes) does not fit before the partition")
    core = bytearray(core_img) + bytes(sectors * SECTOR - len(core_img))
    start, count, segment = struct.unpack_from("<QHH", core, BLOCKLIST)
    if segment != LOAD_SEGMENT or count != sectors - 1 or any(core[BLOCKLIST - 12:BLOCKLIST]):
        raise DiskError(f"core.img's blocklist is not grub-mkimage's (start {start}, count {count}, "
                        f"segment {segment:#x})")
    struct.pack_into("<QHH", core, BLOCKLIST, core_sector + 1, sectors - 1, LOAD_SEGMENT)
    return bytes(core)


def make_core(out: Path, *, prefix: str = GRUB_PREFIX) -> bytes:
    """grub-mkimage's core.img for BIOS disks with GRUB_MODULES built in."""
    _run(["grub-mkimage", "-O", "i386-pc", "-d", str(GRUB_DIR), "-p", prefix, "-o", str(out),
          *GRUB_MODULES])
    return out.read_bytes()


def install_grub(image: Path, work: Path) -> int:
    """Embed GRUB in `image` (made by make_disk): boot.img in sector 0, core.img from sector 1.
    Returns core.img's size in sectors."""
    core = embedded_core(make_core(work / "core.img"))
    boot_img = (GRUB_DIR / "boot.img").read_bytes()
    with open(image, "r+b") as f:
        f.seek(NT_MAGIC)
        table = f.read(SECTOR - NT_MAGIC)
        if table[-2:] != b"\x55\xaa":
            raise DiskError(f"{image} has no partition table")
        f.seek(SECTOR)
        if any(f.read(len(core))):
            raise DiskError(f"{image} has data where core.img goes")
        f.seek(0)
        f.write(boot_sector(boot_img, table))
        f.write(core)
    return len(core) // SECTOR


def data_extents(path: Path) -> list[tuple[int, int]]:
    """The (offset, length) ranges of `path` that hold data (SEEK_DATA/SEEK_HOLE)."""
    extents = []
    with open(path, "rb") as f:
        fd, end, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start, pos - start))
    return extents


def copy_extents(src: Path, dst: Path, extents: list[tuple[int, int]], size: int) -> None:
    """A sparse copy of `src` holding only `extents` (where a file system cannot say where its
    holes are, as 9p cannot, this reads the data alone)."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.truncate(size)
        for offset, length in extents:
            done = 0
            while done < length:
                block = os.pread(fin.fileno(), min(length - done, 1 << 22), offset + done)
                if not block:
                    raise DiskError(f"{src} ends before its data does")
                done += os.pwrite(fout.fileno(), block, offset + done)
