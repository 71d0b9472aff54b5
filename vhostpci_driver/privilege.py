"""Dropping root once the functions are bound and open (docs/security.md, "Least privilege").

Binding a function to vfio-pci writes sysfs and needs root; serving it needs
only the fds already open (the VFIO container, group and device, the DMA
memfd, the status socket) plus, for functions hot-plugged later, the
``/dev/vfio/N`` nodes that the udev rule gives to the service's group. So
``vhostpci run --user`` opens everything as root, hands the status sockets to
the service's user and group, and then gives up root for good: supplementary
groups, then the gid, then the uid (the order matters: after setuid the
process may no longer change its groups). A process that could regain uid 0
afterwards has not dropped anything, so that is checked, not assumed.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from vhostpci_driver.errors import VhostPciError


class PrivilegeError(VhostPciError):
    """The service cannot become the user it was asked to run as."""


@dataclass(frozen=True)
class Identity:
    """Who the service becomes: a uid, its primary gid and its supplementary groups."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    name: str


def _group_id(spec: str) -> int:
    if spec.isdigit():
        return int(spec)
    try:
        return grp.getgrnam(spec).gr_gid
    except KeyError:
        raise PrivilegeError(f"no group named {spec!r}") from None


def resolve(spec: str) -> Identity:
    """``USER``, ``USER:GROUP``, ``UID`` or ``UID:GID`` -> an :class:`Identity`.

    A name brings its primary group and supplementary groups from the user
    database; a bare uid with no entry gets gid = uid and no other group.
    """
    user, _, group = spec.partition(":")
    if not user:
        raise PrivilegeError(f"--user {spec!r}: name a user (USER or USER:GROUP)")
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        if not user.isdigit():
            raise PrivilegeError(f"no user named {user!r} (create it: useradd --system {user})") from None
        uid = int(user)
        gid = _group_id(group) if group else uid
        return Identity(uid, gid, (), user)
    gid = _group_id(group) if group else entry.pw_gid
    groups = tuple(sorted({gid, *os.getgrouplist(entry.pw_name, entry.pw_gid)}))
    return Identity(entry.pw_uid, gid, groups, entry.pw_name)


def drop(ident: Identity, handed_over: list[Path]) -> None:
    """Give ``handed_over`` (status sockets, the run directory) to ``ident``, then become it."""
    if os.geteuid() == ident.uid:
        return  # already that user: nothing to drop
    if os.geteuid() != 0:
        raise PrivilegeError(f"--user {ident.name}: only root can change to another user")
    for path in handed_over:
        try:
            mode = path.lstat().st_mode
            if stat.S_ISDIR(mode) and mode & (stat.S_ISVTX | stat.S_IWOTH):
                continue  # a shared directory (/tmp): never take it over; it is writable anyway
            os.chown(path, ident.uid, ident.gid)
        except OSError as e:
            raise PrivilegeError(f"cannot hand {path} to {ident.name}: {e.strerror}") from None
    try:
        os.setgroups(list(ident.groups))
        os.setgid(ident.gid)
        os.setuid(ident.uid)
    except OSError as e:
        raise PrivilegeError(f"cannot become {ident.name} ({ident.uid}:{ident.gid}): {e.strerror}") from None
    if ident.uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            return
        raise PrivilegeError(f"root could be regained after becoming {ident.name}; refusing to serve")
