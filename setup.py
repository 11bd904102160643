"""Only the C extension lives here; all metadata is in pyproject.toml.

SMSREPL_WERROR=1 in the environment makes every compiler warning an error (CI sets it);
tests/native/test_build_warnings.py compiles each source with these flags plus -Werror."""
import os

from setuptools import Extension, setup

NATIVE = "src/smsrepl/_native"
SOURCES = ["_coremodule.c", "blockscan.c", "delta.c", "filehash.c", "rangeread.c", "traceread.c", "tracebinding.c",
           "fstree_record.c", "fstree_cache.c", "fstree_scan.c", "fstree_diff.c", "fstree_read.c", "fstree_write.c",
           "fstree_binding.c", "linkfwd.c", "linkbinding.c"]
CFLAGS = ["-O3", "-std=c11", "-pthread", "-Wall", "-Wextra"]

setup(
    ext_modules=[
        Extension(
            "smsrepl._native._core",
            sources=[f"{NATIVE}/{name}" for name in SOURCES],
            include_dirs=[NATIVE, f"{NATIVE}/vendor"],
            extra_compile_args=CFLAGS + (["-Werror"] if os.environ.get("SMSREPL_WERROR") == "1" else []),
            extra_link_args=["-pthread"],
        )
    ],
)
