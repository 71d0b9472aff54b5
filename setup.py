"""The one thing setup.cfg cannot declare: the optional compiled helpers (docs/performance.md).

``vhostpci_driver._native`` is built at install when a C compiler and the Python
headers are there; when the build fails the package installs anyway and runs
on the pure-Python rings (``optional=True``). ``VHOSTPCI_NO_EXT=1`` skips the
build (CI proves the fallback that way); ``VHOSTPCI_SANITIZE=1`` builds it with
AddressSanitizer and UBSan for ``tools/fuzz --sanitize``, which preloads the ASan
runtime (linked with libFuzzer, as atheris documents): so the module is linked
without one of its own, and loads only under that preload.
"""

import os

from setuptools import Extension, setup

FLAGS = ["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-missing-field-initializers"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]

sanitize = os.environ.get("VHOSTPCI_SANITIZE") == "1"
native = Extension(
    "vhostpci_driver._native",
    ["vhostpci_driver/_native.c"],
    depends=["vhostpci_driver/_forward.c"],  # included by _native.c
    extra_compile_args=[*FLAGS, *SANITIZE, "-O1", "-g"] if sanitize else FLAGS,
    extra_link_args=["-fsanitize=undefined"] if sanitize else [],  # ASan: the preloaded runtime
    optional=not sanitize,  # a sanitizer build that fails must say so
)
# The simulated driver VM's per-frame ring work (a traffic source that is not the bottleneck;
# tools/vhostpci_host/frontend.py holds the pure reference and falls back to it), built the same way.
pktgen = Extension(
    "vhostpci_host._pktgen",
    ["tools/vhostpci_host/_pktgen.c"],
    extra_compile_args=native.extra_compile_args,
    extra_link_args=native.extra_link_args,
    optional=not sanitize,
)
setup(ext_modules=[] if os.environ.get("VHOSTPCI_NO_EXT") == "1" else [native, pktgen])
