"""The architecture stays visible: which qbayes package may import which (arrows only point down
the table of ../shared/DESIGN.md), no import cycle between modules, no file over 400 lines."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "qbayes"

# package -> the qbayes packages it may import (any import, including ones inside functions)
ALLOWED = {
    "errors": set(),
    "paths": set(),
    "formats": {"errors"},
    "spec": {"formats", "errors"},
    "ranges": {"formats", "spec", "errors"},
    "observers": {"formats", "spec", "errors"},  # activation ranges: the streaming sibling of ranges
    "curvature": {"errors"},
    "algorithms": {"formats", "ranges", "spec", "curvature", "errors"},
    "kernels": {"formats", "paths", "errors"},
    "transforms": {"nn", "formats", "errors"},  # rewrites of float modules (nn: module surgery)
    "nn": {"formats", "kernels", "spec", "observers", "errors"},
    # the model seam: everything that runs a model (calibration, criteria, posteriors) goes through it
    "models": {"nn", "curvature", "formats", "spec", "paths", "errors"},
    "calibrate": {"algorithms", "curvature", "models", "nn", "formats", "spec", "errors"},
    "mixed": {"algorithms", "curvature", "models", "nn", "formats", "spec", "errors"},
    "bayes": {"curvature", "models", "errors"},
    "data": {"errors"},
    "eval": {"data", "errors"},
    "io": {"nn", "models", "formats", "spec", "errors"},  # models: the families a checkpoint may name
    "fastdecode": {"nn", "kernels", "errors"},
    "generate": {"fastdecode", "errors"},
    "export": {"nn", "kernels", "formats", "fastdecode", "errors"},
    "api": {"algorithms", "calibrate", "models", "nn", "formats", "spec", "errors", "transforms"},
    # diffusion models: schedules, samplers, posterior samplers for inverse problems, and their quantization
    "diffusion": {"api", "calibrate", "models", "nn", "transforms", "observers", "formats", "spec", "data", "eval",
                  "errors"},
    "benchmarks": {"algorithms", "kernels", "nn", "formats", "spec", "errors"},
    "cli": None,  # the top: may import anything below it
    "__init__": {"api", "io", "spec", "errors"},
    "__main__": None,
}


def _modules():
    for f in sorted(ROOT.rglob("*.py")):
        rel = f.relative_to(ROOT)
        yield f, rel, ".".join(("qbayes", *rel.with_suffix("").parts)).removesuffix(".__init__")


def _imports(f: Path, rel: Path, top_level_only: bool):
    """Fully qualified qbayes modules (or packages) imported by ``f``."""
    tree = ast.parse(f.read_text())
    pkg = ["qbayes", *rel.parts[:-1]]
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                mod = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "qbayes":
                mod = node.module.split(".")
            else:
                continue
            for a in node.names:
                yield ".".join(mod), ".".join(mod + [a.name])
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "qbayes":
                    yield a.name, a.name


def test_packages_import_only_what_the_design_allows():
    bad = []
    for f, rel, _ in _modules():
        top = rel.parts[0].removesuffix(".py")
        assert top in ALLOWED, f"new top-level module {top}: add it to ALLOWED (and DESIGN.md)"
        allowed = ALLOWED[top]
        if allowed is None:
            continue
        for mod, _ in _imports(f, rel, top_level_only=False):
            parts = mod.split(".")
            target = parts[1] if len(parts) > 1 else None
            if target and target != top and target not in allowed:
                bad.append(f"{rel} imports qbayes.{target}")
    assert not bad, "\n".join(bad)


def test_no_import_cycle_between_modules():
    names = {m for _, _, m in _modules()}
    graph = {}
    for f, rel, m in _modules():
        deps = set()
        for mod, sub in _imports(f, rel, top_level_only=True):
            dep = sub if sub in names else mod
            while dep not in names and "." in dep:
                dep = dep.rsplit(".", 1)[0]
            if dep in names and dep != m and not m.startswith(dep + "."):  # a package importing its own parts is fine
                deps.add(dep)
        graph[m] = deps
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for d in graph.get(node, ()):
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(d):] + [d]) if d in path else d)
            if d not in state:
                visit(d, path + [d])
        state[node] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_no_file_over_400_lines():
    long = {str(f.relative_to(ROOT)): n for f, _, _ in _modules() if (n := len(f.read_text().splitlines())) > 400}
    assert not long, long


def test_no_bench_script_shadows_an_installed_package():
    """``python bench/x.py`` puts bench/ first on sys.path, so a script named like a package a
    dependency imports replaces it (bench/kernels.py once hid Hugging Face's ``kernels`` package
    and broke the GGUF conversion on a fresh cache)."""
    import subprocess
    import sys

    stems = sorted(p.stem for p in (ROOT.parent / "bench").glob("*.py"))
    code = ("import importlib.util, sys\n"
            f"print([s for s in {stems!r} if importlib.util.find_spec(s) is not None])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert r.stdout.strip() == "[]", f"bench scripts named like installed modules: {r.stdout.strip()}"
