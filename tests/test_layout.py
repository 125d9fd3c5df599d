"""The layout's rules, checked on the source: no import circle anywhere in the repository (imports inside
functions count: a lazy import hides a circle, it does not remove it), ``loaders`` never imports
``fastclr``, and docs/design.md names every module of the tree."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fastclr", "loaders", "benchmarks")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The repository modules ``name`` imports (any depth of the file), as module names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import a.b.c` of a module: the deepest known one
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(m, p, set(mods)) for m, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
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
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    assert cycles(graph()) == []


def test_the_circle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_loaders_never_imports_fastclr():
    bad = {m: sorted(t for t in ts if t.split(".")[0] == "fastclr")
           for m, ts in graph().items() if m.split(".")[0] == "loaders"}
    assert {m: t for m, t in bad.items() if t} == {}


def test_design_doc_names_every_module():
    """Every module of fastclr/ and loaders/ is in docs/design.md's layout: by file name, packages by
    their folder name."""
    doc = (ROOT / "docs" / "design.md").read_text()
    layout = doc[doc.index("## Layout"):doc.index("## Contracts")]
    missing = []
    for m, p in modules().items():
        if m.split(".")[0] not in ("fastclr", "loaders") or p.name == "__main__.py" or "." not in m:
            continue
        name = f"{p.parent.name}/" if p.name == "__init__.py" else p.name
        if name not in layout:
            missing.append(m)
    assert missing == [], f"docs/design.md's layout does not name: {missing}"
