"""The fds a peer hands the server: what each must be before the server keeps it, and safe use after.

An fd that arrives by ``SCM_RIGHTS`` is a capability of unknown kind: a driver
VM can send a pipe where an eventfd belongs, a socket or ``/dev/zero`` where
its memory belongs, or a memfd it will truncate once the device VM maps it (a
later touch of the cut part is a SIGBUS in the server and in the toolkit). So
every fd is checked for the one kind its message slot allows (docs/security.md,
"Memory and eventfds"); the caller closes every fd of a message it refuses.

- **Memory** (protocol.md 7.1, ``vhost_pci_socket_region``): a regular file
  (memfd, tmpfs, hugetlbfs) opened read-write, with the whole range
  ``[mmap_offset, mmap_offset + memory_size)`` inside the file and both ends
  page-aligned, and sealed against shrinking (``F_SEAL_SHRINK``). Where the
  sender allowed sealing the server adds ``F_SEAL_SHRINK | F_SEAL_GROW |
  F_SEAL_SEAL`` itself (memfd_create(2), "File sealing"); the size is read after
  the seal, so it cannot change between the check and the map. A file that
  cannot be sealed is refused unless the server runs with
  ``--trust-driver-memory``.
- **Eventfds** (kick and call, protocol.md 6): only an eventfd
  (``anon_inode:[eventfd]``), made non-blocking, so a read or a write from the
  server's single loop never waits on a peer (eventfd(2): a write blocks when
  the counter would pass ``2**64 - 2``).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import select
import stat

from vhostpci_driver.errors import FailReason, ProtocolError

#: Linux 5.1 (memfd_create(2)); older Pythons' fcntl lacks the name.
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)
#: What the server adds to a sealable memory fd: no shrinking (the SIGBUS), no growing (the size it
#: checked is the size), and no more seals (a later F_SEAL_FUTURE_WRITE would break new mappings).
SEALS_ADDED = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
EVENTFD_LINK = "anon_inode:[eventfd]"


class PeerFdError(ProtocolError):
    """An fd is not of the kind its message slot allows; ``field`` names the slot."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field, message, FailReason.BAD_FD)


def fd_kind(fd: int) -> str:
    """A short name of what ``fd`` is (for messages): ``regular``, ``fifo``, ``socket``, an anon inode..."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        return f"unusable ({e.strerror})"
    for test, name in (
        (stat.S_ISREG, "regular file"),
        (stat.S_ISFIFO, "pipe"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISDIR, "directory"),
    ):
        if test(mode):
            return name
    with contextlib.suppress(OSError):
        return os.readlink(f"/proc/self/fd/{fd}")
    return "unknown"


def is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == EVENTFD_LINK
    except OSError:
        return False


def take_eventfd(fd: int, field: str) -> None:
    """Accept ``fd`` as an eventfd, non-blocking from now on; else :class:`PeerFdError`.

    ``O_NONBLOCK`` is a flag of the open file description, which the sender
    shares: its own reads and writes become non-blocking too (QEMU's and the
    simulator's eventfds are made with ``EFD_NONBLOCK`` anyway).
    """
    if not is_eventfd(fd):
        raise PeerFdError(field, f"a {fd_kind(fd)}, not an eventfd")
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    except OSError as e:
        raise PeerFdError(field, f"cannot be made non-blocking: {e.strerror}") from None


def signal_eventfd(fd: int) -> bool:
    """Add 1 to a peer's eventfd without ever blocking or raising; False when it did not take it.

    A counter the peer never drains (or filled on purpose) refuses the write:
    the peer already has a notification pending, so nothing is lost. The fd
    was made non-blocking when taken, but the peer shares that flag and may
    clear it, so the counter's room is asked first (``select``: an eventfd is
    writable while a write of 1 would not block).
    """
    try:
        if not select.select([], [fd], [], 0)[1]:
            return False
        os.eventfd_write(fd, 1)
    except (OSError, ValueError):
        return False
    return True


def drain_eventfd(fd: int) -> int:
    """Read and reset a peer's eventfd counter; 0 when there was nothing (or it failed)."""
    try:
        return os.eventfd_read(fd)
    except OSError:
        return 0


def take_memory_fd(fd: int, offset: int, size: int, field: str, *, trusted: bool = False) -> None:
    """Accept ``fd`` as ``size`` bytes of guest memory at ``offset``; else :class:`PeerFdError`.

    On success the file is sealed against shrinking (or ``trusted`` says a file
    that cannot be sealed is acceptable) and holds the whole range.
    """
    page = mmap.PAGESIZE
    if size <= 0 or offset < 0 or offset % page or size % page:
        raise PeerFdError(field, f"range {offset:#x}+{size:#x} is not page-aligned and non-empty")
    try:
        st = os.fstat(fd)
        access = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError as e:
        raise PeerFdError(field, f"unusable fd: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        # /dev/zero maps, but privately: nothing would be shared with the driver VM.
        raise PeerFdError(field, f"a {fd_kind(fd)}, not a shareable file (memfd, tmpfs, hugetlbfs)")
    if access != os.O_RDWR:
        raise PeerFdError(field, "not opened read-write: the window is mapped shared and writable")
    sealed = _seal(fd, field)
    if not sealed and not trusted:
        raise PeerFdError(
            field,
            "cannot be sealed against shrinking (a memfd needs MFD_ALLOW_SEALING); "
            "a truncation would SIGBUS the server and the device VM "
            "(vhostpci-host serve --trust-driver-memory accepts it)",
        )
    size_now = os.fstat(fd).st_size  # after the seal: it can no longer shrink below this
    if offset + size > size_now:
        raise PeerFdError(
            field, f"range {offset:#x}+{size:#x} passes the end of the file ({size_now:#x} bytes)"
        )


def _seal(fd: int, field: str) -> bool:
    """Seal ``fd`` against shrinking if it can be; True when it is sealed so now."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return False  # a file system without sealing (ext4, xfs, ...)
    if seals & (fcntl.F_SEAL_WRITE | F_SEAL_FUTURE_WRITE):
        raise PeerFdError(field, "sealed against writing: the window must be writable")
    if not seals & fcntl.F_SEAL_SEAL:
        try:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS_ADDED & ~seals)
        except OSError:
            return False
        return True
    return bool(seals & fcntl.F_SEAL_SHRINK)
