"""The import order of unclip_lite/: lower modules never import higher ones.

LEVELS below lists the package bottom to top, as in docs/ARCHITECTURE.md. A module may import
only modules on LOWER levels; two modules on the same level are peers and never import each
other. Every import counts: at module level, inside functions and classes, under `if`. The studies
(studies/*.py) are peers; studies/__init__.py sits above them (it may re-export them) and
outside modules see the `studies` package at the studies level.
unclip_lite/__init__.py imports nothing from the package, so anything may import it.

To add a module, place it in LEVELS; a module LEVELS does not place fails the test, and so
does a name in LEVELS with no file. The files are only parsed (ast), never imported.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import NamedTuple

PACKAGE = "unclip_lite"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

LEVELS = [  # (label, modules), bottom to top; studies submodules as "studies.<name>"
    ("package docstring", ["__init__"]),
    ("configs", ["config"]),
    ("runtime", ["runtime"]),
    ("artifacts", ["checkpoint"]),
    ("pixels and numbers", ["images", "stats"]),
    ("the worlds", ["shapes", "icons"]),
    ("readers and datasets", ["geometry", "data"]),
    ("networks", ["diffusion", "unet", "transformer", "clip_model"]),
    ("prior networks", ["prior_nets"]),
    ("training loop", ["train"]),
    ("stage plumbing", ["stage"]),
    ("judge", ["judge"]),
    ("CLIP stage", ["clip"]),
    ("generative stages", ["decoder", "upsampler", "prior"]),
    ("cascade", ["pipeline"]),
    ("manipulations", ["manipulate"]),
    ("studies", ["studies.embeddings", "studies.stages", "studies.latents", "studies.claims", "studies.judge_free"]),
    ("studies package", ["studies.__init__"]),
    ("course order", ["build"]),
    ("front ends", ["widgets", "plotting"]),
    ("entry points", ["course", "commands"]),
    ("main", ["__main__"]),
]
RANK = {m: (i, label) for i, (label, mods) in enumerate(LEVELS) for m in mods}


class Edge(NamedTuple):
    file: str  # e.g. "unclip_lite/studies/claims.py"
    line: int
    src: str  # importing module, e.g. "studies.claims"
    dst: str  # imported module, e.g. "studies.latents", "__init__"


def module_name(relpath: str) -> str:
    return relpath.removesuffix(".py").replace("/", ".")


def collect_imports(sources: dict[str, str]) -> list[Edge]:
    """Every import of a package module in `sources` ({path relative to the package: text})."""
    known = {module_name(p) for p in sources} | set(RANK)
    packages = {()} | {tuple(m.split(".")[:-1]) for m in known if m.endswith("__init__")}

    def key(parts: list[str]) -> str:
        return ".".join([*parts, "__init__"]) if tuple(parts) in packages else ".".join(parts)

    edges = []
    for relpath, text in sorted(sources.items()):
        src, pkg = module_name(relpath), relpath.split("/")[:-1]
        try:
            tree = ast.parse(text, filename=relpath)
        except SyntaxError as e:
            raise AssertionError(f"{PACKAGE}/{relpath}:{e.lineno}: cannot parse: {e.msg}") from e
        for node in ast.walk(tree):
            found = []
            if isinstance(node, ast.Import):
                found = [key(a.name.split(".")[1:]) for a in node.names
                         if a.name == PACKAGE or a.name.startswith(PACKAGE + ".")]
            elif isinstance(node, ast.ImportFrom):
                mod = node.module.split(".") if node.module else []
                if node.level:  # relative: "." is this package, ".." its parent
                    if node.level - 1 > len(pkg):
                        continue
                    base = pkg[:len(pkg) - node.level + 1] + mod
                elif mod[:1] == [PACKAGE]:
                    base = mod[1:]
                else:
                    continue
                for a in node.names:  # `from .x import y`: y may itself be a module x.y
                    sub = key([*base, a.name])
                    found.append(sub if a.name != "*" and sub in known else key(base))
            for dst in dict.fromkeys(found):
                edges.append(Edge(f"{PACKAGE}/{relpath}", node.lineno, src, dst))
    return sorted(edges)


def layering_violations(edges: list[Edge], existing: set[str]) -> list[str]:
    problems = []
    for e in edges:
        where = f"{e.file}:{e.line}: {e.src}"
        if e.dst not in RANK and e.dst not in existing:
            hint = " (inside studies/, `..` names the package)" if e.dst.startswith("studies.") else ""
            problems.append(f"{where} imports {e.dst}, which is neither in LEVELS nor a file{hint}")
        if e.src == e.dst or e.src not in RANK or e.dst not in RANK:
            continue  # unplaced modules are reported by test_every_module_is_placed
        (s, s_label), (d, d_label) = RANK[e.src], RANK[e.dst]
        if d > s:
            problems.append(f"{where} ({s_label}) imports {e.dst} ({d_label}), a HIGHER level")
        elif d == s:
            problems.append(f"{where} imports {e.dst}, a peer on the same level {s_label}")
    return problems


def find_cycles(edges: list[Edge]) -> list[str]:
    """Depth-first search; each back edge closes one cycle, reported as a path."""
    graph: dict[str, dict[str, Edge]] = {}
    for e in edges:
        if e.src != e.dst:
            graph.setdefault(e.src, {}).setdefault(e.dst, e)
    done, stack, cycles = set(), [], []

    def visit(node: str) -> None:
        stack.append(node)
        for nxt, e in sorted(graph.get(node, {}).items()):
            if nxt in stack:
                loop = stack[stack.index(nxt):] + [nxt]
                steps = (f"{a} ({graph[a][b].file}:{graph[a][b].line})" for a, b in zip(loop, loop[1:]))
                cycles.append(" -> ".join(steps) + f" -> {nxt}")
            elif nxt not in done:
                visit(nxt)
        stack.pop()
        done.add(node)

    for node in sorted(graph):
        if node not in done:
            visit(node)
    return cycles


@functools.cache
def real_sources() -> dict[str, str]:
    return {p.relative_to(ROOT).as_posix(): p.read_text(encoding="utf-8")
            for p in sorted(ROOT.rglob("*.py")) if "__pycache__" not in p.parts}


def real_edges() -> list[Edge]:
    return collect_imports(real_sources())


def test_lower_modules_never_import_higher_ones():
    problems = layering_violations(real_edges(), {module_name(p) for p in real_sources()})
    assert not problems, f"{len(problems)} imports break the order:\n" + "\n".join(problems)


def test_package_init_imports_nothing_from_the_package():
    bad = [f"{e.file}:{e.line}: imports {e.dst}" for e in real_edges() if e.src == "__init__"]
    assert not bad, "unclip_lite/__init__.py must import nothing from the package:\n" + "\n".join(bad)


def test_every_module_is_placed():
    listed = [m for _, mods in LEVELS for m in mods]
    assert len(listed) == len(set(listed)), "a module appears twice in LEVELS"
    unplaced = [f"{PACKAGE}/{p}" for p in real_sources() if module_name(p) not in RANK]
    assert not unplaced, "place these modules in LEVELS (tests/test_architecture.py):\n" + "\n".join(unplaced)


def test_every_placed_module_exists():
    existing = {module_name(p) for p in real_sources()}
    missing = [f"{m} ({label})" for m, (_, label) in RANK.items() if m not in existing]
    assert not missing, "LEVELS names modules with no file under unclip_lite/:\n" + "\n".join(missing)


def test_import_graph_has_no_cycles():
    cycles = find_cycles(real_edges())
    assert not cycles, f"{len(cycles)} import cycles:\n" + "\n".join(cycles)


def test_the_scan_sees_the_imports():
    assert len(real_edges()) > 30, "the scan found almost no package imports: is it parsing the files?"


def test_checker_on_synthetic_sources():
    sources = {
        "__init__.py": '"""Only a docstring."""\n',
        "config.py": "import json\n\ndef load():\n    from .pipeline import UnCLIP  # upward\n",
        "pipeline.py": "from . import config, clip\nclass A:\n    import unclip_lite.runtime as rt\n",
        "clip.py": "from unclip_lite import config\nfrom unclip_lite.checkpoint import save\n",
        "studies/__init__.py": "from . import claims\n",
        "studies/stages.py": "from .. import pipeline\nif True:\n    from .claims import verdict\n",
        "studies/claims.py": "from .stages import x\nfrom ..config import y\n",
        "build.py": "from .studies import claims\nfrom . import studies\nfrom .checkpoint import z\n",
    }
    edges = collect_imports(sources)
    assert {(e.src, e.line, e.dst) for e in edges} == {
        ("config", 4, "pipeline"), ("pipeline", 1, "config"), ("pipeline", 1, "clip"),
        ("pipeline", 3, "runtime"), ("clip", 1, "config"), ("clip", 2, "checkpoint"),
        ("studies.__init__", 1, "studies.claims"), ("studies.stages", 1, "pipeline"),
        ("studies.stages", 3, "studies.claims"), ("studies.claims", 1, "studies.stages"),
        ("studies.claims", 2, "config"), ("build", 1, "studies.claims"),
        ("build", 2, "studies.__init__"), ("build", 3, "checkpoint"),
    }
    problems = layering_violations(edges, {module_name(p) for p in sources})
    assert len(problems) == 3, problems  # the upward import in a function, and two studies importing a peer
    assert problems[0].startswith("unclip_lite/config.py:4: config (configs) imports pipeline (cascade), a HIGHER level")
    assert sum("a peer on the same level studies" in p for p in problems) == 2, problems
    cycles = find_cycles(edges)
    assert any("config (unclip_lite/config.py:4) -> pipeline" in c for c in cycles), cycles
    assert any("studies.claims" in c and "studies.stages" in c for c in cycles), cycles
