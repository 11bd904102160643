"""Only the C extension lives here; all metadata is in pyproject.toml."""
from setuptools import Extension, setup

NATIVE = "src/smsrepl/_native"

setup(
    ext_modules=[
        Extension(
            "smsrepl._native._core",
            sources=[f"{NATIVE}/_coremodule.c", f"{NATIVE}/blockscan.c", f"{NATIVE}/delta.c", f"{NATIVE}/fstree.c",
                     f"{NATIVE}/traceread.c", f"{NATIVE}/tracebinding.c", f"{NATIVE}/rangeread.c", f"{NATIVE}/filehash.c"],
            include_dirs=[NATIVE, f"{NATIVE}/vendor"],
            extra_compile_args=["-O3", "-std=c11", "-pthread", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            extra_link_args=["-pthread"],
        )
    ],
)
