"""scripts/debroot.py without debootstrap: its grub.cfg, what makes a cache current, and the copy
of a cached image by the manifest's extents."""

from __future__ import annotations

import json
import os

from tests.support import scriptload

debroot = scriptload.load("debroot")


def _fake_cache(directory, *, recipe=None, extents=None):
    directory.mkdir()
    with open(directory / debroot.DISK, "wb") as f:
        f.truncate(8 << 20)
        f.seek(3 << 20)
        f.write(b"root" * 1024)
    for name in (debroot.VMLINUZ, debroot.INITRD):
        (directory / name).write_bytes(name.encode())
    manifest = {"recipe": recipe or debroot.recipe_digest(), "extents": extents or [[3 << 20, 4096]]}
    (directory / debroot.MANIFEST).write_text(json.dumps(manifest))
    return directory


def test_grub_cfg_talks_on_com1_and_boots_the_root_from_vda1():
    cfg = debroot.grub_cfg("/boot/vmlinuz-6.1.0-1-cloud-amd64", "/boot/initrd.img-6.1.0-1-cloud-amd64")
    assert "terminal_output serial" in cfg and "serial --unit=0" in cfg
    assert "linux /boot/vmlinuz-6.1.0-1-cloud-amd64 root=/dev/vda1 rw console=ttyS0" in cfg
    assert "initrd /boot/initrd.img-6.1.0-1-cloud-amd64" in cfg
    assert f"echo '{debroot.GRUB_MARKER} booting'" in cfg


def test_a_cache_is_current_only_for_this_recipe_with_all_its_files(tmp_path):
    assert debroot.is_current(_fake_cache(tmp_path / "a"))
    assert not debroot.is_current(_fake_cache(tmp_path / "b", recipe="an older recipe"))
    os.unlink(tmp_path / "a" / debroot.INITRD)
    assert not debroot.is_current(tmp_path / "a")
    assert not debroot.is_current(tmp_path / "none")


def test_the_copy_holds_the_manifests_extents_and_is_sparse(tmp_path):
    cache = _fake_cache(tmp_path / "cache")
    copy = debroot.copy_disk(tmp_path / "copy.img", cache)
    assert copy.read_bytes() == (cache / debroot.DISK).read_bytes()
    assert os.stat(copy).st_blocks * 512 < 1 << 20


def test_the_environment_moves_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PYVMM_DEBROOT_DIR", str(tmp_path / "elsewhere"))
    assert debroot.debroot_dir() == tmp_path / "elsewhere"
