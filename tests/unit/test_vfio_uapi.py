"""The ctypes declarations against the kernel's own header: sizes, offsets, ioctl numbers."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vhostpci_driver.errors import TransportError
from vhostpci_driver.pci import iommufd_uapi as iu
from vhostpci_driver.pci import vfio_uapi as u
from vhostpci_driver.spec import vfio as sv

HEADER = Path("/usr/include/linux/vfio.h")
#: where each group of declarations comes from, and the C guard that says the header has it
GROUPS = (
    ("vfio", "1", u.STRUCTS, [n for n in u.IOCTLS if n not in u.CDEV_IOCTLS]),
    ("vfio-cdev", "defined(VFIO_DEVICE_BIND_IOMMUFD)", u.CDEV_STRUCTS, list(u.CDEV_IOCTLS)),
    ("iommufd", "HAVE_IOMMUFD", iu.STRUCTS, list(iu.IOCTLS)),
)
CONSTANTS = {
    "1": (
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
    ),
    "HAVE_IOMMUFD": ("IOMMU_IOAS_MAP_FIXED_IOVA", "IOMMU_IOAS_MAP_WRITEABLE", "IOMMU_IOAS_MAP_READABLE"),
}
ALL_STRUCTS = [st for _, _, structs, _ in GROUPS for st in structs]


@pytest.fixture(scope="module")
def kernel_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """Every size, offset, ioctl number and constant the installed headers declare.

    The cdev and iommufd declarations came with Linux 6.6; an older header (this
    project's Debian 12 host has 6.1) lacks them, and their tests say so and skip.
    The VM tier runs this file in a guest with Linux 7.2's headers and requires
    all of them (tests/vm/test_in_guest.py).
    """
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not HEADER.exists():
        pytest.skip(
            "needs a C compiler and linux/vfio.h (Debian: gcc, linux-libc-dev) to read the header's values"
        )
    lines = []
    for _, guard, structs, ioctls in GROUPS:
        lines.append(f"#if {guard}")
        for st in structs:
            name = st.__name__
            lines.append(f'printf("sizeof.{name} %zu\\n", sizeof(struct {name}));')
            for field, _ in st._fields_:  # type: ignore[misc]
                lines.append(f'printf("offsetof.{name}.{field} %zu\\n", offsetof(struct {name}, {field}));')
        lines += [f'printf("ioctl.{name} %lu\\n", (unsigned long){name});' for name in ioctls]
        lines += [f'printf("const.{c} %lu\\n", (unsigned long){c});' for c in CONSTANTS.get(guard, ())]
        lines.append("#endif")
    src = tmp_path_factory.mktemp("uapi") / "uapi.c"
    src.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n#include <linux/vfio.h>\n"
        "#if __has_include(<linux/iommufd.h>)\n#include <linux/iommufd.h>\n#define HAVE_IOMMUFD 1\n"
        "#else\n#define HAVE_IOMMUFD 0\n#endif\nint main(void){\n" + "\n".join(lines) + "\nreturn 0;}\n"
    )
    exe = src.with_suffix("")
    subprocess.run([cc, "-o", str(exe), str(src)], check=True, capture_output=True, timeout=60)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=10).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def _declared(kernel_values: dict[str, int], key: str) -> int:
    if key not in kernel_values:
        pytest.skip(
            f"the installed header predates {key.split('.')[1]} "
            "(iommufd: Linux 6.2, the cdev: 6.6); the VM tier checks it"
        )
    return kernel_values[key]


@pytest.mark.parametrize("st", ALL_STRUCTS, ids=lambda s: s.__name__)
def test_structure_layout_matches_the_header(
    kernel_values: dict[str, int], st: type[ctypes.Structure]
) -> None:
    declared = _declared(kernel_values, f"sizeof.{st.__name__}")
    assert ctypes.sizeof(st) in (declared, declared - u.HEADER_TAILS.get(st.__name__, 0))
    for field, _ in st._fields_:  # type: ignore[misc]
        assert getattr(st, field).offset == kernel_values[f"offsetof.{st.__name__}.{field}"], field


@pytest.mark.parametrize("group", GROUPS, ids=lambda g: g[0])
def test_ioctl_numbers_match_the_header(
    kernel_values: dict[str, int], group: tuple[str, str, object, list[str]]
) -> None:
    assert len(u.IOCTLS) == 18 and len(iu.IOCTLS) == 5
    table = {**u.IOCTLS, **iu.IOCTLS}
    for name in group[3]:
        assert table[name] == _declared(kernel_values, f"ioctl.{name}"), name


def test_constants_match_the_header(kernel_values: dict[str, int]) -> None:
    for key, value in kernel_values.items():
        if key.startswith("const."):
            assert getattr(sv if key.startswith("const.VFIO") else iu, key[6:]) == value, key


def test_the_cli_offers_every_backend_open_function_takes() -> None:
    from vhostpci_driver import cli  # noqa: PLC0415
    from vhostpci_driver.pci.open import BACKENDS  # noqa: PLC0415

    assert cli.PCI_BACKENDS == BACKENDS and set(cli.WATCH_DRIVERS) == set(BACKENDS)


def test_numbers_the_design_notes_quote() -> None:
    assert u.VFIO_GET_API_VERSION == 0x3B64 and u.VFIO_GROUP_GET_DEVICE_FD == 0x3B6A
    assert u.VFIO_IOMMU_MAP_DMA == 0x3B71 and u.VFIO_IOMMU_UNMAP_DMA == 0x3B72


def test_failed_ioctl_is_a_transport_error_naming_it(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(TransportError) as ei:
            u.ioctl(fd, u.VFIO_GET_API_VERSION)
        assert ei.value.register == "VFIO_GET_API_VERSION"
        with pytest.raises(TransportError) as ei:
            u.ioctl(fd, iu.IOMMU_IOAS_MAP, iu.iommu_ioas_map())
        assert ei.value.register == "IOMMU_IOAS_MAP"
    finally:
        os.close(fd)
