"""pyxen's xenstored on a unix socket, driven by Debian's real xenstore-utils."""

from __future__ import annotations

import shutil
import subprocess
import threading

import pytest

from pyxen.xenstore.daemon import XenstoredDaemon

pytestmark = pytest.mark.skipif(shutil.which("xenstore-read") is None,
                                reason="xenstore-utils is not installed (tools/setup.sh installs it)")


@pytest.fixture
def daemon(tmp_path):
    state = tmp_path / "xenstore.json"
    started = []

    def start():
        d = XenstoredDaemon(tmp_path / "socket", state)
        t = threading.Thread(target=d.serve_forever, daemon=True)
        t.start()
        assert d.ready.wait(5)
        started.append((d, t))
        d.thread = t
        return d

    yield start
    for d, t in started:
        d.stop()
        t.join(5)


def xs(tmp_path, *args, check=True, timeout=10):
    env = {"XENSTORED_PATH": str(tmp_path / "socket"), "PATH": "/usr/bin:/bin"}
    return subprocess.run(list(args), env=env, capture_output=True, text=True, check=check,
                          timeout=timeout)


def test_write_read_ls_rm_with_the_real_client(daemon, tmp_path):
    daemon()
    xs(tmp_path, "xenstore-write", "/local/domain/7/name", "guest", "/local/domain/7/memory/target", "262144")
    assert xs(tmp_path, "xenstore-read", "/local/domain/7/name").stdout == "guest\n"
    ls = xs(tmp_path, "xenstore-ls", "/local/domain/7").stdout
    assert 'name = "guest"' in ls and 'target = "262144"' in ls
    xs(tmp_path, "xenstore-rm", "/local/domain/7/name")
    r = xs(tmp_path, "xenstore-read", "/local/domain/7/name", check=False)
    assert r.returncode != 0


def test_chmod_sets_permissions(daemon, tmp_path):
    daemon()
    xs(tmp_path, "xenstore-write", "/vm/x", "1")
    xs(tmp_path, "xenstore-chmod", "/vm/x", "n0", "r5")
    out = xs(tmp_path, "xenstore-ls", "-p", "/vm").stdout
    assert "n0" in out and "r5" in out


def test_watch_sees_a_write(daemon, tmp_path):
    daemon()
    env = {"XENSTORED_PATH": str(tmp_path / "socket"), "PATH": "/usr/bin:/bin"}
    w = subprocess.Popen(["xenstore-watch", "-n", "2", "/local/domain/3/control"], env=env,
                         stdout=subprocess.PIPE, text=True)
    try:
        # first line: the initial event on registration; then our write
        first = w.stdout.readline()
        assert first.startswith("/local/domain/3/control")
        xs(tmp_path, "xenstore-write", "/local/domain/3/control/shutdown", "poweroff")
        second = w.stdout.readline()
        assert second.startswith("/local/domain/3/control/shutdown")
        assert w.wait(10) == 0
    finally:
        w.kill()


def test_state_survives_a_restart(daemon, tmp_path):
    d = daemon()
    xs(tmp_path, "xenstore-write", "/local/domain/9/name", "survivor")
    d.stop()
    d.thread.join(5)
    daemon()
    assert xs(tmp_path, "xenstore-read", "/local/domain/9/name").stdout == "survivor\n"


def test_pyxs_client(daemon, tmp_path):
    pyxs = pytest.importorskip("pyxs")
    daemon()
    with pyxs.Client(unix_socket_path=str(tmp_path / "socket")) as c:
        c[b"/local/domain/5/name"] = b"five"
        assert c[b"/local/domain/5/name"] == b"five"
        assert c.list(b"/local/domain/5") == [b"name"]
        c.set_perms(b"/local/domain/5/name", [b"n0", b"r5"])
        assert c.get_perms(b"/local/domain/5/name") == [b"n0", b"r5"]
        c.transaction()
        c[b"/local/domain/5/data/a"] = b"1"
        c.commit()
        assert c[b"/local/domain/5/data/a"] == b"1"
        with pytest.raises(pyxs.PyXSError):
            c[b"/local/domain/5/nonexistent"]
