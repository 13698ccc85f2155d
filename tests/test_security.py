"""Security properties, each checked by behaviour where it can be: no shell anywhere, config values
with shell syntax stay data, the serving API key is compared in constant time and never reaches
Ray's logs, nothing pickled is ever loaded, and the local Ray that rankray starts keeps token auth."""
from __future__ import annotations

import ast
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from raycluster.cli import main
from serving.auth import ApiKeyGuard
from serving.schema import RequestError

from tests.helpers import API_KEY_ENV, SMALL_FEATURES, free_port as _free_port, untrained_bundle as make_bundle, small_table

KEY_ENV = API_KEY_ENV

ROOT = Path(__file__).resolve().parents[1]
SHELL_CALLS = {("os", "system"), ("os", "popen"), ("subprocess", "getoutput"), ("subprocess", "getstatusoutput")}
UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("cloudpickle", "load"),
              ("cloudpickle", "loads"), ("dill", "load"), ("dill", "loads"), ("joblib", "load"), ("torch", "load"),
              ("pd", "read_pickle"), ("pandas", "read_pickle")}


# ---------------------------------------------------------------- static scans

def _project_files() -> list[Path]:
    """Every Python file of the project: the packages, tests, benchmarks; not .venv or other hidden dirs."""
    return sorted(p for p in ROOT.rglob("*.py")
                  if not any((part.startswith(".") and part != ".ci") or part in ("build", "__pycache__")
                             for part in p.relative_to(ROOT).parts[:-1]))


def _calls(tree: ast.AST, wanted: set[tuple[str, str]]) -> list[tuple[int, str]]:
    """Calls of module.func (also `from module import func` and `import module as m`)."""
    alias: dict[str, str] = {}
    direct: dict[str, tuple[str, str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                alias[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                if (node.module, a.name) in wanted:
                    direct[a.asname or a.name] = (node.module, a.name)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
            key = (alias.get(f.value.id, f.value.id), f.attr)
            if key in wanted:
                found.append((node.lineno, ".".join(key)))
        elif isinstance(f, ast.Name) and f.id in direct:
            found.append((node.lineno, ".".join(direct[f.id])))
    return found


def _shell_uses(source: str) -> list[tuple[int, str]]:
    tree = ast.parse(source)
    found = _calls(tree, SHELL_CALLS)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                # shell=False is fine; shell=True or shell=<anything computed> is not
                if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    found.append((node.lineno, "shell=" + ast.unparse(kw.value)))
    return found


def test_scanner_finds_every_kind_of_shell_use():
    """The scanner itself: each form below is found (so an empty result below means something)."""
    snippet = textwrap.dedent("""
        import os, subprocess as sp
        from os import popen as po
        from subprocess import getoutput
        os.system("ls")
        po("ls")
        sp.run("ls", shell=True)
        sp.Popen(["ls"], shell=flag)
        getoutput("ls")
        sp.run(["ls"], shell=False)
    """)
    assert [w for _, w in _shell_uses(snippet)] == ["os.system", "os.popen", "subprocess.getoutput",
                                                     "shell=True", "shell=flag"]


def test_no_shell_anywhere_in_the_project():
    files = _project_files()
    assert len(files) > 40 and {ROOT / "training" / "data.py", ROOT / "tests" / "conftest.py",
                                ROOT / ".ci" / "audit_check.py"} <= set(files)
    assert not any(".venv" in p.parts for p in files)
    found = {str(p.relative_to(ROOT)): hits for p in files if (hits := _shell_uses(p.read_text()))}
    assert found == {}, found


def test_nothing_that_loads_models_or_data_can_unpickle():
    """Bundles, checkpoints, preprocessors and configs are read with safetensors/JSON/safe YAML only."""
    assert [w for _, w in _calls(ast.parse("import torch, pickle as pk\npk.loads(b)\ntorch.load(f)"), UNPICKLERS)] \
        == ["pickle.loads", "torch.load"]
    found = {}
    for pkg in ("raycluster", "training", "serving", "tune"):
        for p in sorted((ROOT / pkg).rglob("*.py")):
            tree = ast.parse(p.read_text())
            hits = _calls(tree, UNPICKLERS)
            hits += [(n.lineno, "allow_pickle") for n in ast.walk(tree) if isinstance(n, ast.keyword)
                     and n.arg == "allow_pickle" and not (isinstance(n.value, ast.Constant) and n.value.value is False)]
            hits += [(n.lineno, "yaml.load") for n in ast.walk(tree) if isinstance(n, ast.Call)
                     and isinstance(n.func, ast.Attribute) and n.func.attr in ("load", "load_all")
                     and isinstance(n.func.value, ast.Name) and n.func.value.id == "yaml"
                     and not any(k.arg == "Loader" and ast.unparse(k.value) == "_Loader" for k in n.keywords)]
            if hits:
                found[str(p.relative_to(ROOT))] = hits
    assert found == {}, found
    from training import config

    assert issubclass(config._Loader, yaml.SafeLoader)  # the one yaml.load uses a SafeLoader
    with pytest.raises(yaml.constructor.ConstructorError):
        config.parse_yaml("!!python/object/apply:os.system ['true']")


# ---------------------------------------------------------------- Ray token auth

def test_local_ray_from_ensure_ray_requires_the_token(tmp_path):
    """A fresh process, RAY_AUTH_MODE unset, starts Ray the way every rankray command does: its
    dashboard (jobs API) refuses requests without the token and accepts them with it."""
    port = _free_port()
    script = textwrap.dedent(f"""
        import json, os, urllib.request, urllib.error
        import raycluster
        raycluster.use_token_auth()
        mode = os.environ.get("RAY_AUTH_MODE")
        import ray
        from training.config import load_config
        from raycluster.rayinit import ensure_ray
        cfg = load_config(raw={{"data": {{"source": "x"}}, "features": {SMALL_FEATURES!r},
                               "ray": {{"num_cpus": 1, "dashboard_port": {port}}}}})
        url = ensure_ray(cfg)
        token = os.environ.get("RAY_AUTH_TOKEN") or open(os.path.expanduser("~/.ray/auth_token")).read().strip()

        def get(headers, tries=60):
            try:
                return urllib.request.urlopen(urllib.request.Request(url + "/api/jobs/", headers=headers),
                                              timeout=60).status
            except urllib.error.HTTPError as e:
                return e.code
            except OSError:  # the dashboard may still be starting
                if tries == 0:
                    raise
                import time
                time.sleep(1)
                return get(headers, tries - 1)

        out = {{"mode": mode, "url": url, "none": get({{}}), "wrong": get({{"Authorization": "Bearer " + ("y" if token[0] == "x" else "x") + token[1:]}}),
               "right": get({{"Authorization": "Bearer " + token}})}}
        ray.shutdown()
        print("RESULT " + json.dumps(out))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=False, timeout=300)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads(line[0][len("RESULT "):])
    assert out["mode"] == "token"  # set by use_token_auth(), as every entry point does before ray is imported
    assert out["url"] == f"http://127.0.0.1:{port}"  # the dashboard on loopback only
    assert out["none"] == 401 and out["wrong"] in (401, 403) and out["right"] == 200, out  # 403: wrong token


# ---------------------------------------------------------------- config values are data

def test_shell_syntax_in_run_name_is_rejected_naming_the_key(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"source": "x"}, "features": SMALL_FEATURES}))
    for name in ("x; touch pwned", "$(touch pwned)", '"`touch pwned`"', "a && touch pwned", "x|tee pwned", "../etc"):
        assert main(["profile", "--config", str(cfg), "--set", f"run.name={name}"]) == 2
        err = capsys.readouterr().err
        assert "run.name: String should match pattern" in err and repr(name.strip('"')) in err, err
    # not even YAML: a clear error naming the key, not a traceback
    assert main(["profile", "--config", str(cfg), "--set", "run.name=`touch pwned`"]) == 2
    assert "error: --set run.name: '`touch pwned`' is not a YAML value" in capsys.readouterr().err
    assert main(["profile", "--config", str(cfg), "--set", "run.name=.."]) == 2  # one component, never up
    assert "run.name '..' would write outside run.dir" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [cfg]


# ---------------------------------------------------------------- API key

def test_api_key_compare_is_constant_time(monkeypatch):
    import hmac

    from serving import auth

    # the module compares with compare_digest and nothing else
    tree = ast.parse(inspect.getsource(auth))
    digests = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == "hmac.compare_digest"]
    assert len(digests) == 1
    equal = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Compare)
             and any(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for op in n.ops)
             and any(t in ast.unparse(n) for t in ("_key", "token", "authorization"))]
    assert equal == [], equal  # no == (early exit on the first wrong byte) on the key or the token

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    key = "k3y-" + "x" * 28
    guard = ApiKeyGuard(key)
    for header in ("Bearer " + key[:-1] + "y", "Bearer " + key[:-1], "Bearer " + key + "x", "Bearer ", "Bearer",
                   "Basic " + key, key, None, "Bearer " + key.upper()):
        with pytest.raises(RequestError) as e:
            guard.check(header)
        assert e.value.status == 401 and key not in e.value.message
    guard.check("Bearer " + key)
    guard.check("bearer  " + key + " ")
    # every check that got as far as a token went through compare_digest, with the key as bytes
    assert len(calls) == 8 and all(b == key.encode() for _, b in calls)
    assert key not in repr(guard) and ApiKeyGuard(None).check(None) is None


def _session_files() -> list[Path]:
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    assert session.is_dir()
    return [p for p in session.rglob("*") if p.is_file() and not p.is_symlink()]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, serve_url):
    """A real Serve app of a real bundle with `serve.api_key_env`: the key is in the environment of the
    Ray that runs the replicas (set before the shared Ray started, as in production), never in a config
    or deployment argument."""
    import httpx
    from ray import serve

    from serving.app import build_app
    from training.bundle import load_bundle
    from training.config import ServeConfig

    bundle = make_bundle(str(tmp_path_factory.mktemp("security") / "model"))
    serve.run(build_app(bundle, ServeConfig(api_key_env=KEY_ENV), num_cpus=0.5), name="secured",
              route_prefix="/secured")
    with httpx.Client(base_url=f"{serve_url}/secured", timeout=60) as http:
        yield {"http": http, "key": os.environ[KEY_ENV], "rows": load_bundle(bundle)[2]["samples"]["rows"]}
    serve.delete("secured")


def test_api_key_never_reaches_the_logs(guarded):
    import time

    from ray import serve

    http, key = guarded["http"], guarded["key"]
    body = {"rows": guarded["rows"][:3]}
    wrong = key[:-2] + ("zz" if not key.endswith("zz") else "yy")
    request_ids = []
    for auth, status in ((None, 401), (f"Bearer {wrong}", 401), (f"Bearer {key}", 200), (key, 401),
                         (f"Bearer {key[:-1]}", 401), (f"Bearer {key}", 200)):
        headers = {"Authorization": auth} if auth else {}
        r = http.post("/predict", json=body, headers=headers)
        assert r.status_code == status, (auth is not None, r.status_code, r.text)
        assert key not in r.text and key not in str(r.headers)
        request_ids.append(r.headers["x-request-id"])
    assert key not in str(serve.status())  # what `serve status` and the dashboard show
    info = http.get("/model", headers={"Authorization": f"Bearer {key}"}).json()
    assert info["auth"] is True and key not in json.dumps(info)
    deadline = time.time() + 60
    while True:  # every request is in the access logs: the logs are written, and these are the ones scanned
        logs = {p: p.read_bytes() for p in _session_files()}
        if all(any(i.encode() in b for b in logs.values()) for i in request_ids) or time.time() > deadline:
            break
        time.sleep(2)
    missing = [i for i in request_ids if not any(i.encode() in b for b in logs.values())]
    assert missing == [], "requests not found in the logs: nothing useful was scanned"
    assert any("serve" in p.parts for p in logs) and sum(len(b) for b in logs.values()) > 10_000
    for secret in (key, wrong, key[:-1]):
        leaks = [str(p) for p, b in logs.items() if secret.encode() in b]
        assert leaks == [], leaks


# ---------------------------------------------------------------- config values are data (on a real Ray)

@pytest.fixture
def shell_named_source(tmp_path, monkeypatch):
    """A real data directory whose name is shell syntax: if anything ran it through a shell, files
    named pwned* would appear in the working directory (here: tmp_path)."""
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "logs; touch pwned1 && $(touch pwned2) `touch pwned3` | tee pwned4 #"
    d.mkdir()
    pq.write_table(small_table(600), d / "part-0.parquet")
    yield d
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("pwned")]
    assert not [p.name for p in ROOT.iterdir() if p.name.startswith("pwned")]


@pytest.mark.usefixtures("ray_local")
def test_shell_syntax_in_data_source_is_plain_data(shell_named_source, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run": {"dir": str(tmp_path / "runs"), "name": "sec"},
                                   "data": {"source": str(shell_named_source)}, "features": SMALL_FEATURES}))
    assert main(["profile", "--config", str(cfg)]) == 0  # the directory is read like any other
    assert "rows 600" in capsys.readouterr().out
    missing = str(shell_named_source) + "-nope; touch pwned5"
    cfg.write_text(yaml.safe_dump({"run": {"dir": str(tmp_path / "runs"), "name": "sec"},
                                   "data": {"source": missing}, "features": SMALL_FEATURES}))
    assert main(["profile", "--config", str(cfg)]) == 2
    assert f"error: data source {missing}: no such file or directory" in capsys.readouterr().err


# ---------------------------------------------------------------- dependency audit (make audit)

def test_audit_fails_only_on_fixable_vulnerabilities_or_unaudited_packages(tmp_path):
    """`make audit`'s judge of pip-audit's JSON report (the service itself is not reachable here)."""
    cmd = [sys.executable, str(ROOT / ".ci" / "audit_check.py"), str(tmp_path / "r.json")]

    def run(deps: list[dict]) -> subprocess.CompletedProcess:
        (tmp_path / "r.json").write_text(json.dumps({"dependencies": deps, "fixes": []}))
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)

    clean = {"name": "a", "version": "1.0", "vulns": []}
    unfixed = {"name": "b", "version": "2.0", "vulns": [{"id": "GHSA-1", "fix_versions": [], "aliases": []}]}
    fixable = {"name": "c", "version": "3.0", "vulns": [{"id": "PYSEC-9", "fix_versions": ["3.1"], "aliases": []}]}
    skipped = {"name": "d", "skip_reason": "Dependency not found on PyPI and could not be audited: d (4.0)"}
    ok = run([clean, unfixed])
    assert ok.returncode == 0 and "b 2.0: GHSA-1 (no fix released)" in ok.stdout, ok.stdout
    bad = run([clean, unfixed, fixable])
    assert bad.returncode == 1 and "c 3.0: PYSEC-9 (fixed in 3.1)" in bad.stdout, bad.stdout
    blind = run([clean, skipped])
    assert blind.returncode == 1 and "1 packages could not be audited" in blind.stdout, blind.stdout
    (tmp_path / "r.json").unlink()
    assert subprocess.run(cmd, capture_output=True, timeout=60, check=False).returncode == 1
    makefile = (ROOT / "Makefile").read_text()
    assert "\naudit: " in makefile and ".ci/audit_check.py" in makefile
