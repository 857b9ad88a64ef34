#!/usr/bin/env bash
# Prepare a Debian 12 machine for pyvmm work, as root:
#   1. install the Debian packages pyvmm and its tests use,
#   2. create .venv at the repository root and install pyvmm into it (editable, with test extras),
#   3. build the guest kits (scripts/guestkit.py build: the default one, and the 6.12 one) and the
#      Debian 12 root disk image of tests/linux/test_debian_root.py (scripts/debroot.py build).
# Each step is skipped when already done, so running it again is quick and quiet.
# Set PYTHON to choose the interpreter for the virtual environment (default: python3).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
venv=$repo/.venv
stamp=$venv/.pyvmm-setup

packages=(
    python3 python3-venv python3-pip gcc binutils make busybox-static fio iperf3 socat strace
    qemu-system-x86 iproute2 iputils-ping lz4 zstd xz-utils bzip2 dpkg-dev cpio libc6-dev linux-libc-dev acpica-tools
    seabios ipxe-qemu dnsmasq-base grub-pc-bin xorriso mtools e2fsprogs debootstrap
)

say() { echo "setup: $*" >&2; }

is_installed() {
    [[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null) == installed ]]
}

install_packages() {
    local missing=() package
    for package in "${packages[@]}"; do
        is_installed "$package" || missing+=("$package")
    done
    ((${#missing[@]} == 0)) && return
    if ((EUID != 0)); then
        say "run as root to install: ${missing[*]}"
        exit 1
    fi
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 \
        "${missing[@]}" >/dev/null
}

make_venv() {
    if [[ -x $venv/bin/python ]] && "$venv/bin/python" -c '' 2>/dev/null; then
        return
    fi
    say "creating $venv"
    rm -rf "$venv"
    "$python" -m venv "$venv"
}

# Editable, as a plain path in a .pth file (editable_mode=compat): setuptools' default import hook
# for editable installs costs every Python start ~20 ms (importlib.util, urllib, fnmatch...).
install_pyvmm() {
    local want
    want="$(sha256sum "$repo/pyproject.toml" | cut -d' ' -f1) compat"
    [[ -f $stamp && $(<"$stamp") == "$want" ]] && return
    say "installing pyvmm into $venv"
    (cd "$repo" && "$venv/bin/python" -m pip install -q --disable-pip-version-check \
        --config-settings editable_mode=compat -e '.[test]')
    echo "$want" >"$stamp"
}

install_packages
make_venv
install_pyvmm
"$venv/bin/python" "$repo/scripts/guestkit.py" build >/dev/null
"$venv/bin/python" "$repo/scripts/guestkit.py" build --kernel 6.12 >/dev/null  # (the 6.12 kernel tests)
"$venv/bin/python" "$repo/scripts/debroot.py" build >/dev/null  # (test_debian_root.py; minutes the first time)
