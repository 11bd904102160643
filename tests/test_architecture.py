"""The layout rules of docs/ARCHITECTURE.md, checked on the source: which layer may import
which (the table is read from the document, so the two cannot drift apart), no import cycle,
no module over 500 lines without its reason written down, few top-level modules.

Every import counts, also one inside a function: a lazy import is still a dependency."""
from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "smsrepl"
DOC = ROOT / "docs" / "ARCHITECTURE.md"
MAX_LINES = 500
MAX_TOP_LEVEL = 12


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports_of(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The smsrepl modules ``name`` imports (``from smsrepl.x import y`` counts as smsrepl.x.y
    when that is a module, else as smsrepl.x)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "smsrepl")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "smsrepl":
                continue
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                found.add(sub if sub in known else mod)
    found.discard(name)
    return {m for m in found if m in known}


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def layers() -> list[tuple[str, list[str], set[str]]]:
    """(layer, its modules or packages, the layers it may import) from the document's table."""
    rows = []
    section = DOC.read_text().split("## Layers", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not line.lstrip().startswith("|") or set(cells[0]) <= set("-: ") or cells[0] == "layer":
            continue
        members = re.findall(r"`([\w.]+)`", cells[1])
        allowed = set(re.findall(r"\b([a-z]+)\b", cells[2])) - {"and", "itself", "none", "everything", "but"}
        if "everything" in cells[2]:
            allowed = {"*"} | {f"-{x}" for x in re.findall(r"but ([a-z]+)", cells[2])}
        rows.append((cells[0], members, allowed | {cells[0]}))
    return rows


def layer_of(module: str, table) -> str:
    best, best_len = None, -1
    for layer, members, _ in table:
        for m in members:
            full = "smsrepl" if m == "smsrepl" else f"smsrepl.{m}"
            if (module == full or module.startswith(full + ".")) and len(full) > best_len:
                best, best_len = layer, len(full)
    if best is None:
        raise AssertionError(f"{module} is in no layer of docs/ARCHITECTURE.md's table")
    return best


def may_import(src_layer: str, dst_layer: str, table) -> bool:
    allowed = next(a for layer, _, a in table if layer == src_layer)
    if "*" in allowed:
        return f"-{dst_layer}" not in allowed
    return dst_layer in allowed


def test_the_layer_table_is_read():
    table = layers()
    names = [layer for layer, _, _ in table]
    assert {"base", "wire", "data", "network", "cli"} <= set(names), names
    assert may_import("network", "data", table) and not may_import("data", "network", table)
    assert not may_import("wire", "network", table) and not may_import("agent", "cli", table)


def test_every_import_follows_the_layers():
    table = layers()
    bad = []
    for src, targets in graph().items():
        for dst in targets:
            a, b = layer_of(src, table), layer_of(dst, table)
            if not may_import(a, b, table):
                bad.append(f"{src} ({a}) imports {dst} ({b})")
    assert not bad, "imports the layers forbid:\n" + "\n".join(sorted(bad))


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_the_checks_catch_what_they_look_for():
    # the graph really sees function-level imports and cycles
    g = graph()
    assert "smsrepl.kernels" in g["smsrepl"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    table = layers()
    assert layer_of("smsrepl.transport.tls", table) == "network"
    assert not may_import(layer_of("smsrepl.blocks.device", table), layer_of("smsrepl.transport.tls", table), table)
    assert not may_import(layer_of("smsrepl.transport.tls", table), layer_of("smsrepl.cli", table), table)


def test_no_module_over_500_lines_without_its_reason():
    doc = DOC.read_text()
    reasons = doc.split("## Modules over 500 lines", 1)[1].split("\n## ", 1)[0] if "## Modules over 500 lines" in doc else ""
    long = []
    for name, path in modules().items():
        n = len(path.read_text().splitlines())
        rel = str(path.relative_to(PKG.parent))
        if n > MAX_LINES and not re.search(rf"`{re.escape(rel)}`[^\n]*\w{{20}}", reasons):
            long.append(f"{rel}: {n} lines")
    assert not long, "modules over 500 lines with no sentence in ARCHITECTURE.md:\n" + "\n".join(long)


def test_few_top_level_modules():
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL, top


@pytest.mark.parametrize("package", ["protocol", "blocks", "files", "control", "throttle"])
def test_lower_layers_open_no_network(package):
    network = {"socket", "ssl", "requests", "http", "urllib3", "selectors", "asyncio"}
    if package == "protocol":
        network |= {"os", "threading", "time", "select", "subprocess"}  # sans-I/O
    for path in (PKG / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = {(node.module or "").split(".")[0]}
            else:
                continue
            assert not names & network, f"{path.relative_to(PKG)} imports {names & network}"
