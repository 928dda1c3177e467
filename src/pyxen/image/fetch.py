"""Fetching and unpacking Debian packages with the host's apt-get and dpkg-deb.

Every failure is an :class:`~pyxen.errors.ImageError` naming the command and its stderr. When a
lookup or download fails, ``apt-get update`` is run once and the step retried (fresh hosts and
containers often have no or stale package lists).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from pyxen.errors import ImageError

Progress = Callable[[str], object]


def run(cmd: Sequence[str], *, cwd: Path | None = None, what: str) -> str:
    """Run ``cmd``; its stdout, or ImageError("<what>: `cmd` failed ... stderr")."""
    try:
        p = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ImageError(f"{what}: `{cmd[0]}` not found (building the guest image needs a "
                         "Debian-based host with apt-get and dpkg-deb)") from None
    except OSError as e:
        raise ImageError(f"{what}: cannot run `{cmd[0]}`: {e.strerror}") from e
    if p.returncode != 0:
        tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-6:])
        raise ImageError(f"{what}: `{' '.join(cmd)}` failed (exit {p.returncode})"
                         + (f":\n{tail}" if tail else ""))
    return p.stdout


def _apt_options() -> list[str]:
    # As root, apt drops to the _apt user for downloads and warns when it cannot write to
    # the (private) target directory; downloading as root is what happens anyway.
    return ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []


def parse_depends(text: str, prefix: str) -> str:
    """First ``Depends:`` target starting with ``prefix`` in ``apt-cache depends`` output."""
    for line in text.splitlines():
        key, _, value = line.strip().lstrip("|").partition(":")
        value = value.strip()
        if key == "Depends" and value.startswith(prefix) and not value.startswith("<"):
            return value
    raise ImageError(f"apt-cache depends: no dependency starting with {prefix!r} in:\n{text}")


class Apt:
    """apt lookups and downloads; runs ``apt-get update`` at most once, on first failure."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.updated = False

    def update(self) -> None:
        self.progress("running apt-get update")
        run(["apt-get", *_apt_options(), "-q", "update"], what="apt-get update")
        self.updated = True

    def _retrying(self, step: Callable[[], str]) -> str:
        try:
            return step()
        except ImageError:
            if self.updated:
                raise
        self.update()
        return step()

    def resolve_dependency(self, metapackage: str, prefix: str) -> str:
        """The real package a metapackage depends on (``linux-image-cloud-amd64`` ->
        ``linux-image-6.1.0-NN-cloud-amd64``)."""
        return self._retrying(lambda: parse_depends(
            run(["apt-cache", "depends", metapackage], what=f"resolving {metapackage}"),
            prefix))

    def candidate_version(self, package: str) -> str:
        """The version ``apt-get download`` would fetch (``apt-cache show``, no network)."""
        def step() -> str:
            out = run(["apt-cache", "show", "--no-all-versions", package],
                      what=f"looking up {package}")
            for line in out.splitlines():
                if line.startswith("Version:"):
                    return line.partition(":")[2].strip()
            raise ImageError(f"apt-cache show {package}: no Version field")
        return self._retrying(step)

    def download(self, packages: Sequence[str], dest: Path) -> dict[str, Path]:
        """``apt-get download`` the packages into ``dest``; package name -> .deb path."""
        self.progress("downloading " + ", ".join(packages))
        self._retrying(lambda: run(["apt-get", *_apt_options(), "-q", "download", *packages],
                                   cwd=dest, what="downloading " + ", ".join(packages)))
        debs = {deb.name.split("_", 1)[0]: deb for deb in sorted(dest.glob("*.deb"))}
        missing = [p for p in packages if p not in debs]
        if missing:
            raise ImageError(f"apt-get download left no .deb for {', '.join(missing)} "
                             f"in {dest}")
        return {p: debs[p] for p in packages}


def deb_fields(deb: Path, *fields: str) -> dict[str, str]:
    """Control fields of a .deb (``dpkg-deb -f``)."""
    out = run(["dpkg-deb", "-f", str(deb), *fields], what=f"reading {deb.name}")
    if len(fields) == 1:
        return {fields[0]: out.strip()}
    values = {}
    for line in out.splitlines():
        key, _, value = line.partition(":")
        values[key.strip()] = value.strip()
    return values


def extract(deb: Path, dest: Path) -> Path:
    """``dpkg-deb -x`` ``deb`` into ``dest``; returns ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    run(["dpkg-deb", "-x", str(deb), str(dest)], what=f"extracting {deb.name}")
    return dest
