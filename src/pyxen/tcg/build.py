"""Build pyxen's patched Unicorn (the software engine's CPU) into the cache directory.

Unicorn 2.1.4 is QEMU 5.0's TCG as a library. pyxen applies its own patch set
(``unicorn-2.1.4-sysvm.patch``: an opt-in "system VM" mode with guest-IDT exception delivery,
native SYSCALL, vectored external interrupts, race-free asynchronous stops, and exits for
trapped port I/O, MSRs, VMCALL, HLT and triple faults) to the pinned PyPI sdist and builds the
x86 library with cmake. The result lives outside git:
``$PYXEN_CACHE_DIR/unicorn/2.1.4-<patch hash>/libunicorn.so.2`` (default cache ``~/.cache/pyxen``).

Run as ``python -m pyxen.tcg.build`` (``tools/setup.sh`` does). Idempotent: a finished build
for the same sdist and patch is reused.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import resources
from pathlib import Path
from typing import Callable

from pyxen.errors import EngineUnavailable

UNICORN_VERSION = "2.1.4"
SDIST_NAME = f"unicorn-{UNICORN_VERSION}.tar.gz"
SDIST_SHA256 = "00567a70e323f749b419cd86bee4f9115beab7ebba32194581c090cbb7c59cff"
PATCH_NAME = f"unicorn-{UNICORN_VERSION}-sysvm.patch"
LIB_NAME = "libunicorn.so.2"


def cache_dir() -> Path:
    """pyxen's cache root: ``$PYXEN_CACHE_DIR`` or ``~/.cache/pyxen``."""
    env = os.environ.get("PYXEN_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "pyxen"


def patch_bytes() -> bytes:
    return resources.files("pyxen.tcg").joinpath(PATCH_NAME).read_bytes()


def build_id() -> str:
    """Names one build: the Unicorn version plus a hash of the sdist and the patch set."""
    h = hashlib.sha256(SDIST_SHA256.encode() + patch_bytes()).hexdigest()[:12]
    return f"{UNICORN_VERSION}-{h}"


def library_path(root: Path | None = None) -> Path:
    return (root or cache_dir()) / "unicorn" / build_id() / LIB_NAME


def find_library() -> Path | None:
    """The built library for the current patch set, or None. ``PYXEN_UNICORN_LIB`` overrides."""
    env = os.environ.get("PYXEN_UNICORN_LIB")
    if env:
        return Path(env) if Path(env).is_file() else None
    p = library_path()
    return p if p.is_file() else None


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    r = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        tail = "\n".join(r.stdout.splitlines()[-25:])
        raise EngineUnavailable(f"building the software engine: {what} failed "
                                f"(exit {r.returncode}):\n{tail}")


def _missing_tools() -> list[str]:
    need = {"cmake": "cmake", "ninja": "ninja-build", "cc": "gcc", "patch": "patch"}
    return [pkg for tool, pkg in need.items() if shutil.which(tool) is None]


def build(log: Callable[[str], None] = print, root: Path | None = None) -> Path:
    """Download, verify, patch and build; return the library path. Raises EngineUnavailable."""
    out = library_path(root)
    if out.is_file():
        return out
    missing = _missing_tools()
    if missing:
        raise EngineUnavailable("building the software engine needs " + ", ".join(missing)
                                + f": apt-get install {' '.join(missing)} (or run ./tools/setup.sh)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pyxen-unicorn-", dir=out.parent.parent) as tmp:
        work = Path(tmp)
        log(f"pyxen: building the software engine (Unicorn {UNICORN_VERSION} + pyxen patches); "
            "this takes a minute or two, once")
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
              ":all:", f"unicorn=={UNICORN_VERSION}", "-d", str(work)],
             work, "downloading the Unicorn sdist from PyPI")
        sdist = work / SDIST_NAME
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            raise EngineUnavailable(f"{SDIST_NAME}: sha256 {digest} does not match the pinned "
                                    f"{SDIST_SHA256}")
        with tarfile.open(sdist) as tf:
            tf.extractall(work, filter="data")
        src = work / f"unicorn-{UNICORN_VERSION}"
        (work / PATCH_NAME).write_bytes(patch_bytes())
        _run(["patch", "-p1", "--batch", "--forward", "-i", str(work / PATCH_NAME)], src,
             "applying the pyxen patch set")
        bdir = src / "src" / "build"
        _run(["cmake", "-G", "Ninja", "-S", str(src / "src"), "-B", str(bdir),
              "-DUNICORN_ARCH=x86", "-DCMAKE_BUILD_TYPE=Release", "-DUNICORN_BUILD_TESTS=OFF"],
             src, "cmake configure")
        _run(["ninja", "-C", str(bdir)], src, "compiling")
        tmp_out = out.with_suffix(".tmp")
        shutil.copy2(bdir / LIB_NAME, tmp_out)
        os.replace(tmp_out, out)
    log(f"pyxen: software engine built: {out}")
    return out


def main() -> int:
    try:
        build()
    except EngineUnavailable as e:
        print(f"pyxen: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
