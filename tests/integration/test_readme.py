"""The README's Python API example runs as printed (against a real device over vfio-user)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.integration.conftest import MAC_A, UUIDS
from vhostpci_host.harness import Rig

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_api_example_runs(rig: Rig) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    (example,) = [b for b in blocks if "VhostPciDevice" in b]
    assert len(example.strip().splitlines()) <= 20
    vm = rig.add_vm(MAC_A, vm_uuid=UUIDS[0])
    path = rig.server.device_socket(vm.uuid)
    code = example.replace('"vfio-user:/tmp/dev.sock"', f'"vfio-user:{path}"')
    code = code.replace("timeout=5", "timeout=2")
    scope: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), scope)  # our own README, on purpose
    dev = scope["dev"]
    assert dev.frontends == {}  # type: ignore[attr-defined]  # closed by the with-statement, as promised
    vm.read_event("ready", 10)  # and the driver VM got every answer it waited for
