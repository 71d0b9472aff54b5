"""Dropping root (vhostpci run --user): resolving the user, and the drop itself in a forked child."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from vhostpci_driver.privilege import Identity, PrivilegeError, drop, resolve


def test_resolve_names_and_numbers() -> None:
    root = resolve("root")
    assert (root.uid, root.gid, root.name) == (0, 0, "root") and 0 in root.groups
    assert resolve("0:0").uid == 0
    bare = resolve("54321")  # no entry: gid = uid, no other group
    assert (bare.uid, bare.gid, bare.groups) == (54321, 54321, ())
    assert resolve("54321:7").gid == 7
    with pytest.raises(PrivilegeError, match="no user named 'no-such-user'"):
        resolve("no-such-user")
    with pytest.raises(PrivilegeError, match="no group named"):
        resolve("root:no-such-group")
    with pytest.raises(PrivilegeError, match="name a user"):
        resolve(":0")


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping root needs root")
def test_drop_hands_over_its_files_not_shared_directories_and_cannot_regain_root(tmp_path: Path) -> None:
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("this system has no 'nobody' user")
    ident = Identity(nobody.pw_uid, nobody.pw_gid, (nobody.pw_gid,), "nobody")
    own = tmp_path / "run"
    own.mkdir(mode=0o755)
    sock = own / "x.sock"
    sock.write_text("")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: must never be taken over
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child drops; the test process keeps root
        try:
            os.close(r)
            drop(ident, [own, sock, shared])
            try:
                os.setuid(0)
                verdict = "regained"
            except PermissionError:
                verdict = f"dropped {os.getuid()} {os.getgid()} {os.getgroups()}"
            os.write(w, verdict.encode())
        finally:
            os._exit(0)
    os.close(w)
    verdict = os.read(r, 200).decode()
    os.close(r)
    os.waitpid(pid, 0)
    assert verdict == f"dropped {nobody.pw_uid} {nobody.pw_gid} [{nobody.pw_gid}]"
    assert (own.stat().st_uid, sock.stat().st_uid) == (nobody.pw_uid, nobody.pw_uid)
    assert shared.stat().st_uid == 0


def test_drop_as_the_same_user_is_nothing_and_to_another_needs_root() -> None:
    me = os.geteuid()
    drop(Identity(me, os.getegid(), (), "me"), [])  # already that user: a no-op even unprivileged
    if me != 0:
        with pytest.raises(PrivilegeError, match="only root"):
            drop(Identity(me + 1, me + 1, (), "other"), [])
