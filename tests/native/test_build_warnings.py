"""The C sources compile without a single warning under the flags setup.py builds them with,
plus -Werror; the kernels compile without Python's headers (only the bindings include them);
setup.py adds -Werror itself when SMSREPL_WERROR=1 (CI).

The flags are the ones setup.py hands to setuptools (its setup() is run with setup()
replaced), after the interpreter's own CFLAGS, as a build does."""
from __future__ import annotations

import re
import runpy
import shlex
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

setuptools = pytest.importorskip("setuptools")

ROOT = Path(__file__).resolve().parents[2]
NATIVE = ROOT / "src" / "smsrepl" / "_native"
#: the files that may include Python.h: the module and the thin bindings
BINDINGS = {"_coremodule.c", "tracebinding.c", "fstree_binding.c", "tracebinding.h", "fstree_binding.h",
            "linkbinding.c", "linkbinding.h"}


def _extension(monkeypatch, werror: str | None) -> setuptools.Extension:
    got = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: got.update(kw))
    if werror is None:
        monkeypatch.delenv("SMSREPL_WERROR", raising=False)
    else:
        monkeypatch.setenv("SMSREPL_WERROR", werror)
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"))
    [ext] = got["ext_modules"]
    return ext


def _compiler() -> list[str]:
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")
    if not shutil.which(cc[0]):
        cc = ["cc"]
    if not shutil.which(cc[0]):
        pytest.skip("no C compiler")
    return cc


def _compile(cc: list[str], flags: list[str], source: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*cc, *flags, "-c", str(source), "-o", str(out)], capture_output=True, text=True,
                          timeout=600)


def test_setup_builds_every_source_and_adds_werror_only_when_asked(monkeypatch):
    ext = _extension(monkeypatch, None)
    built = {Path(s).name for s in ext.sources}
    assert built == {p.name for p in NATIVE.glob("*.c")}, "a .c file under _native/ that setup.py does not build"
    assert "-Werror" not in ext.extra_compile_args
    assert {"-Wall", "-Wextra"} <= set(ext.extra_compile_args)
    assert not [f for f in ext.extra_compile_args if f.startswith("-Wno-")]
    assert "-Werror" in _extension(monkeypatch, "1").extra_compile_args
    assert "-Werror" not in _extension(monkeypatch, "0").extra_compile_args


def test_every_source_compiles_without_a_warning(monkeypatch, tmp_path):
    ext = _extension(monkeypatch, "1")
    cc = _compiler()
    flags = (shlex.split(sysconfig.get_config_var("CFLAGS") or "") + shlex.split(sysconfig.get_config_var("CCSHARED") or "")
             + [f"-I{ROOT / d}" for d in ext.include_dirs] + [f"-I{sysconfig.get_paths()['include']}"]
             + ext.extra_compile_args)
    failed = {}
    for source in ext.sources:
        r = _compile(cc, flags, ROOT / source, tmp_path / (Path(source).stem + ".o"))
        if r.returncode or "warning" in r.stderr:
            failed[source] = r.stderr
    assert not failed, "\n".join(f"{s}:\n{err}" for s, err in failed.items())


def test_kernels_need_no_python_headers(monkeypatch, tmp_path):
    ext = _extension(monkeypatch, "1")
    cc = _compiler()
    flags = [f"-I{ROOT / d}" for d in ext.include_dirs] + ext.extra_compile_args
    kernels = [p for p in sorted(NATIVE.glob("*.[ch]")) if p.name not in BINDINGS]
    assert {"fstree.h", "fstree_scan.c", "fstree_cache.c", "blockscan.c", "delta.c"} <= {p.name for p in kernels}
    for path in kernels:
        assert not re.search(r'^\s*#\s*include\s*[<"]Python\.h', path.read_text(), re.M), \
            f"{path.name} includes Python.h: only the bindings may"
    failed = {}
    for source in (p for p in kernels if p.suffix == ".c"):
        r = _compile(cc, flags, source, tmp_path / (source.stem + ".o"))
        if r.returncode:
            failed[source.name] = r.stderr
    assert not failed, "\n".join(f"{s}:\n{err}" for s, err in failed.items())
