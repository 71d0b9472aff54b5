"""The ctypes declarations against the kernel's own header: sizes, offsets, ioctl numbers."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vhostpci_driver.errors import TransportError
from vhostpci_driver.pci import vfio_uapi as u

HEADER = Path("/usr/include/linux/vfio.h")


@pytest.fixture(scope="module")
def kernel_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not HEADER.exists():
        pytest.skip(
            "needs a C compiler and linux/vfio.h (Debian: gcc, linux-libc-dev) to read the header's values"
        )
    lines = []
    for st in u.STRUCTS:
        name = st.__name__
        lines.append(f'printf("sizeof.{name} %zu\\n", sizeof(struct {name}));')
        for field, _ in st._fields_:  # type: ignore[misc]
            lines.append(f'printf("offsetof.{name}.{field} %zu\\n", offsetof(struct {name}, {field}));')
    for name in u.IOCTLS:
        lines.append(f'printf("ioctl.{name} %lu\\n", (unsigned long){name});')
    for const in (
        "VFIO_API_VERSION",
        "VFIO_TYPE1v2_IOMMU",
        "VFIO_NOIOMMU_IOMMU",
        "VFIO_IRQ_SET_DATA_EVENTFD",
        "VFIO_IRQ_SET_ACTION_TRIGGER",
        "VFIO_REGION_INFO_FLAG_MMAP",
        "VFIO_REGION_INFO_CAP_SPARSE_MMAP",
        "VFIO_GROUP_FLAGS_VIABLE",
        "VFIO_DEVICE_FLAGS_PCI",
        "VFIO_DMA_MAP_FLAG_WRITE",
    ):
        lines.append(f'printf("const.{const} %lu\\n", (unsigned long){const});')
    src = tmp_path_factory.mktemp("uapi") / "uapi.c"
    src.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n#include <linux/vfio.h>\nint main(void){\n"
        + "\n".join(lines)
        + "\nreturn 0;}\n"
    )
    exe = src.with_suffix("")
    subprocess.run([cc, "-o", str(exe), str(src)], check=True, capture_output=True, timeout=60)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=10).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


@pytest.mark.parametrize("st", u.STRUCTS, ids=lambda s: s.__name__)
def test_structure_layout_matches_the_header(
    kernel_values: dict[str, int], st: type[ctypes.Structure]
) -> None:
    assert ctypes.sizeof(st) == kernel_values[f"sizeof.{st.__name__}"]
    for field, _ in st._fields_:  # type: ignore[misc]
        assert getattr(st, field).offset == kernel_values[f"offsetof.{st.__name__}.{field}"], field


def test_ioctl_numbers_match_the_header(kernel_values: dict[str, int]) -> None:
    assert len(u.IOCTLS) == 15
    for name, value in u.IOCTLS.items():
        assert value == kernel_values[f"ioctl.{name}"], name


def test_constants_match_the_header(kernel_values: dict[str, int]) -> None:
    for key, value in kernel_values.items():
        if key.startswith("const."):
            assert getattr(u, key[6:]) == value, key


def test_numbers_the_design_notes_quote() -> None:
    assert u.VFIO_GET_API_VERSION == 0x3B64 and u.VFIO_GROUP_GET_DEVICE_FD == 0x3B6A
    assert u.VFIO_IOMMU_MAP_DMA == 0x3B71 and u.VFIO_IOMMU_UNMAP_DMA == 0x3B72


def test_failed_ioctl_is_a_transport_error_naming_it(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(TransportError) as ei:
            u.ioctl(fd, u.VFIO_GET_API_VERSION)
        assert ei.value.register == "VFIO_GET_API_VERSION"
    finally:
        os.close(fd)
