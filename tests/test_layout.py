"""The package's shape: imports run one way, only backends know backend names, light commands stay light, and the
shipped configs and callbacks reach an installed package one way each."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
#: Source folders and the package each becomes once installed (pyproject's package-dir).
PACKAGES = {ROOT / "fff_lightning": "fff_lightning", ROOT / "callbacks": "fff_lightning.callbacks",
            ROOT / "configs": "fff_lightning.configs"}  # fmt: skip


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for f in folder.rglob("*.py"):
            parts = [package, *f.relative_to(folder).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its file (inside functions too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    named = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            named |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            named |= {base} | {f"{base}.{a.name}" for a in node.names}
    out = set()
    for target in named:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name and not name.startswith(target + "."):
            out.add(target)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_module_of_the_package_imports_itself_back_through_others():
    mods = modules()
    graph = {n: imports_of(n, p, set(mods)) for n, p in mods.items()}
    assert {"fff_lightning.cli", "fff_lightning.backends.unsloth", "fff_lightning.callbacks.budget"} <= set(graph)
    assert "fff_lightning.adapters" in graph["fff_lightning.budget"]  # the graph sees imports inside functions
    assert cycles(graph) == []
    # cli.py is the top: no module of the package imports it.
    assert [n for n, deps in graph.items() if "fff_lightning.cli" in deps and n != "fff_lightning.__main__"] == []


def folder_of(name: str) -> str:
    """A module's node in the folder graph: a subpackage (``fff_lightning.backends``) stands for all its modules;
    a module of the package's top folder stands for itself."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else name


def test_no_import_circle_between_folders_and_no_import_runs_back_up():
    """Collapse each subpackage (backends, data, bench, kinds, callbacks) into one node: the graph stays acyclic,
    so no module of a subpackage imports (even inside a function) a module that imports that subpackage."""
    mods = modules()
    graph = {}
    for n, p in mods.items():
        deps = {folder_of(d) for d in imports_of(n, p, set(mods))} - {folder_of(n)}
        graph.setdefault(folder_of(n), set()).update(deps)
        for d in deps:
            graph.setdefault(d, set())
    assert {"fff_lightning.kinds", "fff_lightning.backends", "fff_lightning.spec"} <= set(graph)
    assert (
        "fff_lightning.kinds" in graph["fff_lightning.spec"]
        and "fff_lightning.kinds" in graph["fff_lightning.backends"]
    )
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle_hidden_in_a_function(tmp_path):
    (tmp_path / "a.py").write_text("import p.b\n")
    (tmp_path / "b.py").write_text("def f():\n    from p import a\n")
    mods = {"p.a": tmp_path / "a.py", "p.b": tmp_path / "b.py"}
    graph = {n: imports_of(n, f, set(mods)) for n, f in mods.items()}
    assert cycles(graph) == [["p.a", "p.b"]]


def test_only_the_backends_compare_a_backends_name():
    names = {"tiny", "hf", "unsloth"}
    offenders = []
    for name, path in modules().items():
        if name.startswith("fff_lightning.backends"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                consts = [c for c in (node.left, *node.comparators) if isinstance(c, ast.Constant)]
                consts += [e for c in node.comparators if isinstance(c, ast.Tuple | ast.List | ast.Set)
                           for e in c.elts if isinstance(e, ast.Constant)]  # fmt: skip
                if any(c.value in names for c in consts):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


@pytest.mark.parametrize("argv", [["--help"], ["budget", "--help"], ["configs"], ["sweep", "--help"]])
def test_help_and_light_commands_import_no_torch(argv):
    code = ("import sys, runpy; sys.argv = ['fff_lightning', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('fff_lightning', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'lightning', 'transformers') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout[-500:]


def test_shipped_configs_by_name_and_copied_out(tmp_path):
    from fff_lightning import config_files
    from fff_lightning.run_config import describe_run

    names = config_files.names()
    assert {"quickstart", "step2", "step2_lora", "step1_i", "overlays/packed"} <= set(names)
    assert describe_run("tiny").model.base.backend == "tiny"
    run = describe_run("step2", "overlays/packed")  # a config and an overlay, both by name
    assert run.datamodule.packing and run.model.adapters.fff.width == 128
    (tmp_path / "tiny.yaml").write_text("experiment: mine\n")
    assert config_files.path(tmp_path / "tiny.yaml") == tmp_path / "tiny.yaml"  # a real file wins
    assert config_files.shipped("../pyproject") is None and config_files.shipped("nothing") is None

    from fff_lightning.cli import main

    main(["configs", "--copy", str(tmp_path / "mine")])
    assert (
        sorted(str(p.relative_to(tmp_path / "mine").with_suffix("")) for p in (tmp_path / "mine").rglob("*.yaml"))
        == names
    )


def test_the_package_has_no_runtime_path_tricks():
    text = (ROOT / "fff_lightning" / "__init__.py").read_text()
    assert "__path__" not in text
    for f in (ROOT / "tests").rglob("*.py"):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom | ast.Import):
                mods = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any((m or "").split(".")[0] in ("callbacks", "configs") for m in mods), f


def test_every_subpackage_is_installed():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {n for n, p in modules().items() if p.name == "__init__.py"}
    assert found == listed
