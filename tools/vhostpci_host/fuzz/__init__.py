"""Coverage-guided fuzz targets for every parser that faces a peer (run them with ``tools/fuzz``).

Each target is a plain ``def target(data: bytes) -> None`` that raises only on a
finding (see :mod:`.contract`), so atheris drives it in ``tools/fuzz`` and pytest
replays the kept corpus through it (tests/unit/test_fuzz_corpus.py) without atheris.
"""

from __future__ import annotations

from vhostpci_host.fuzz import peer_fds, ring, ring_diff, vfio_user, wire
from vhostpci_host.fuzz.contract import InvariantError, Target

TARGETS: dict[str, Target] = {
    t.name: t
    for t in (wire.CTRL, wire.SOCK, vfio_user.TARGET, ring.TARGET, ring_diff.TARGET, peer_fds.TARGET)
}

__all__ = ["TARGETS", "InvariantError", "Target"]
