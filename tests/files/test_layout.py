"""files/'s layout: small modules with one job each, imported without cycles, and the round's
target interface (files.target) implemented by both kinds of target."""
import ast
import pathlib

import smsrepl.files
from smsrepl.files.local import LocalTarget
from smsrepl.files.remote import RemoteTarget
from smsrepl.files.target import DirRoundTarget, RoundTarget

FILES = pathlib.Path(smsrepl.files.__file__).parent


def _imports() -> dict[str, set[str]]:
    """files/ module -> the files/ modules it imports anywhere (a function's lazy import and a
    type checker's import count too)."""
    mods = {p.stem for p in FILES.glob("*.py")}
    edges = {}
    for p in FILES.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module.startswith("smsrepl.files."):
                    deps.add(node.module.split(".")[2])
                elif node.module == "smsrepl.files":
                    deps |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[2] for a in node.names if a.name.startswith("smsrepl.files.")}
        edges[p.stem] = deps - {p.stem}
    return edges


def test_no_import_cycle_among_files_modules():
    edges = _imports()
    done: set[str] = set()

    def visit(mod: str, path: list[str]) -> None:
        for dep in sorted(edges.get(mod, ())):
            assert dep not in path, "import cycle: " + " -> ".join(path[path.index(dep):] + [dep])
            if dep not in done:
                visit(dep, path + [dep])
        done.add(mod)

    for mod in sorted(edges):
        visit(mod, [mod])


def test_files_modules_are_small_and_say_what_they_are():
    for p in sorted(FILES.glob("*.py")):
        lines = p.read_text().count("\n")
        assert lines <= 500, f"{p.name}: {lines} lines"
        if p.stem != "__init__":
            assert ast.get_docstring(ast.parse(p.read_text())), f"{p.name}: no docstring"


def test_both_targets_implement_the_round_interface():
    # explicit subclasses: a type checker holds each to the protocol (issubclass() does not take
    # protocols with attributes)
    assert RoundTarget in LocalTarget.__mro__ and DirRoundTarget not in LocalTarget.__mro__
    assert DirRoundTarget in RemoteTarget.__mro__
    for cls in (LocalTarget, RemoteTarget):  # every call explicit: no delegation by attribute lookup
        assert "__getattr__" not in vars(cls)
        for name in ("existing", "content_digest", "paths", "set_root_meta", "mkdir", "symlink", "special",
                     "hardlink", "set_meta", "open_file", "delete", "finish"):
            assert name in vars(cls), f"{cls.__name__}.{name}"
    for name in ("dir_records", "gone", "below", "read_files"):
        assert name in vars(RemoteTarget), name
