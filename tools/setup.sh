#!/usr/bin/env bash
# Set up pyxen on a Debian 12 machine (as root): system packages, then a virtualenv in .venv
# with pyxen and its pinned dependencies. Idempotent; fast when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v gcc >/dev/null || need+=(gcc)
command -v make >/dev/null || need+=(make)
command -v ld >/dev/null || need+=(binutils)
ldconfig -p 2>/dev/null | grep -q 'libatomic.so.1 ' || need+=(libatomic1)
# the software engine (patched Unicorn) is built from source; the guest image uses apt/dpkg
command -v cmake >/dev/null || need+=(cmake)
command -v ninja >/dev/null || need+=(ninja-build)
command -v patch >/dev/null || need+=(patch)
command -v g++ >/dev/null || need+=(g++)
# Debian's real xenstore clients, used by the xenstored tests
command -v xenstore-read >/dev/null || need+=(xenstore-utils)
# qcow2 (and other QEMU formats) disks: qemu-storage-daemon exports them as raw files (FUSE)
command -v qemu-storage-daemon >/dev/null || need+=(qemu-system-common)
command -v qemu-img >/dev/null || need+=(qemu-utils)
# network namespaces for the two-host migration tests and examples/migrate-pair.sh
command -v ip >/dev/null || need+=(iproute2)
command -v e2fsck >/dev/null || need+=(e2fsprogs)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv python3-pip)
if [ ${#need[@]} -gt 0 ]; then
    echo "pyxen setup: installing ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
# software engine: Unicorn 2.1.4 + pyxen's patch set, built once into ~/.cache/pyxen
.venv/bin/python -m pyxen.tcg.build
if [ ! -w /dev/kvm ]; then
    echo "pyxen setup: note: /dev/kvm is not usable here; KVM tests will be skipped" >&2
fi
