"""The house rules, read from the source: which package may import which, no import circles, and importing
any module changes nothing in the process (no environment variables, no Ray, no logging set-up)."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("training", "tune", "serving", "raycluster")
# what each floor may import besides itself: training is the ground, raycluster the top
ALLOWED = {"training": set(), "tune": {"training"}, "serving": {"training"},
           "raycluster": {"training", "tune", "serving"}}


def _modules() -> dict[str, Path]:
    """Module name -> file (a package's __init__ under the package's name)."""
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for pkg in PACKAGES for p in sorted((ROOT / pkg).glob("*.py"))}


def _imports(path: Path, module: str) -> set[str]:
    """Every project module `path` imports, at the top or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package
                base = ".".join(module.split(".")[:-node.level] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n.split(".")[0] in PACKAGES}
    mods = _modules()
    return {n if n in mods else n.rsplit(".", 1)[0] for n in out} & set(mods) - {module} | (
        {n for n in out if n in PACKAGES} - {module.split(".")[0]})


def test_floors_import_only_what_is_below_them():
    bad = []
    for module, path in _modules().items():
        pkg = module.split(".")[0]
        for target in _imports(path, module):
            other = target.split(".")[0]
            if other != pkg and other not in ALLOWED[pkg]:
                bad.append(f"{module} imports {target}")
    assert not bad, bad


def test_no_import_circles():
    graph = {m: {t for t in _imports(p, m) if t in _modules()} for m, p in _modules().items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(trail[trail.index(t):] + [t] if t in trail else [m, t])
            elif t not in state:
                visit(t, trail + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_the_rules_see_real_imports():
    """The reader is not vacuous: it finds the imports that make the floors."""
    mods = _modules()
    assert "training.config" in _imports(mods["tune.search"], "tune.search")
    assert "serving.app" in _imports(mods["raycluster.serve"], "raycluster.serve")  # a function-level import
    assert "training.scoring" in _imports(mods["serving.core"], "serving.core")


# third-party packages are imported first: what importing them does (Ray sets RAY_CLIENT_MODE) is theirs
SCRIPT = """
import json, logging, os, sys, threading
import ray, ray.data, ray.train, ray.train.torch, ray.tune, ray.serve, torch, fastapi
mods = json.loads(sys.argv[1])
env, handlers, threads = dict(os.environ), list(logging.getLogger().handlers), threading.active_count()
changed = []
for m in mods:
    __import__(m)
    if dict(os.environ) != env:
        changed.append(f"{m}: environment {sorted(set(os.environ.items()) ^ set(env.items()))}")
        env = dict(os.environ)
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        changed.append(f"{m}: Ray started")
    if list(logging.getLogger().handlers) != handlers:
        changed.append(f"{m}: root logging handlers")
        handlers = list(logging.getLogger().handlers)
print(json.dumps(changed))
"""


def test_importing_any_module_changes_no_process_state():
    mods = sorted(m for m in _modules() if not m.endswith("__main__"))  # running that one is its purpose
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("RAY_AUTH_MODE",)}
    out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(mods)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
