"""The command line as a user runs it: exit codes, messages, the budget table."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_cli

ROOT = Path(__file__).parent.parent


def run(*args, cwd=ROOT):
    """The real command line, in a new process (a fork of the tests' zygote: ``helpers.cli``)."""
    return run_cli(list(args), cwd=cwd)


def run_here(*args, cwd=ROOT):
    """``main`` in this process (no interpreter start-up, same code path): its exit code and output."""
    import contextlib
    import io
    import os
    import types

    from fff_lightning.cli import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(list(args))
    except SystemExit as e:
        code = e.code or 0
    finally:
        os.chdir(old)
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def test_budget_prints_the_step2_figures():
    out = run_here("budget", "--config", "configs/step2.yaml", "--match", "lora_rank")
    assert out.returncode == 0, out.stderr
    for figure in ("66,232,320", "62,914,560", "129,146,880", "7,241,732,096", "lora.r = 49"):
        assert figure in out.stdout


def test_budget_json_for_the_lora_baseline():
    out = run_here("budget", "--config", "configs/step2_lora.yaml", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["trainable"] == 120_586_240


@pytest.mark.slow
def test_bad_config_exits_2_with_one_clear_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  base: {backend: tiny}\n  fff: {n_sublayers: 2, width: [8, 8, 8]}\n")
    out = run("budget", "--config", str(bad))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip() == (
        "error: model.fff.width: gives 3 widths for 2 sub-layers: give one int, or one per sub-layer"
    )


def test_unknown_field_and_missing_adapter_and_missing_file(tmp_path):
    cases = {
        "model:\n  fff: {widht: 8}\n": "error: model.fff: Option 'widht' is not accepted",
        "model:\n  base: {backend: tiny}\n": "error: model: no adapter configured: give model.fff, model.lora, or both",
        "model:\n  base: {backend: tiny}\n  fff: {layers: '2-9'}\n": "layer(s) [4, 5, 6, 7, 8, 9] do not exist",
    }
    for i, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"c{i}.yaml"
        path.write_text(text)
        out = run_here("budget", "--config", str(path))
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    out = run_here("budget", "--config", str(tmp_path / "absent.yaml"))
    assert out.returncode == 2 and "File does not exist" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_budget_takes_several_configs_and_overrides_like_fit():
    out = run_here("budget", "--config", "configs/step2.yaml", "--model.lora.r", "8", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["lora"] == 8 * 2_621_440
    smoke = run_here(
        "budget", "--config", "configs/step2.yaml", "--config", "configs/overlays/gpu_smoke.yaml", "--json"
    )
    assert smoke.returncode == 0 and json.loads(smoke.stdout)["trainable"] == 129_146_880, smoke.stderr


@pytest.mark.slow
def test_callbacks_import_from_the_installed_package(tmp_path):
    # From another folder, so the import cannot come from the source tree's top-level callbacks/.
    code = "import fff_lightning.callbacks as c, pathlib; print(pathlib.Path(c.__file__).parent.name)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "callbacks"
