"""Config files and options a user gave wrong, or someone else wrote to hurt: a YAML alias bomb, a huge file, a
syntax error, a value of the wrong type, an abbreviated option, an unknown config name, a text file given as a
checkpoint. Each is one line on stderr, exit 2, before anything loads or is written (issue 30; docs/reliability.md
lists them with these tests)."""

import time
from pathlib import Path

import pytest
from helpers import QUICK

from fff_lightning.cli import main

HELP = "(`python -m fff_lightning fit --help` lists options)"


def refused(argv, capsys) -> str:
    """Run the command in this process; assert exit 2 and one line on stderr, no traceback; return the line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2, err
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


def bomb(folder: Path, name: str = "bomb.yaml") -> Path:
    """A "billion laughs" document: 471 bytes whose aliases expand to 9**10 (3.5 billion) strings."""
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    path = folder / name
    path.write_text("\n".join([*lines, "model: *a9", ""]))
    return path


def fit(logs, *extra) -> list[str]:
    return ["fit", "--config", QUICK, "--logs_dir", str(logs), *extra]


def nothing_written(logs: Path) -> bool:
    return not logs.exists() or not any(logs.iterdir())


def test_a_yaml_alias_bomb_is_refused_at_once_by_every_command_naming_the_file(tmp_path, capsys):
    path, logs = bomb(tmp_path), tmp_path / "logs"
    says = f"error: {path}: its YAML aliases (*name) expand to more than 1,000,000 values"
    start = time.monotonic()
    for argv in (
        fit(logs, "--config", str(path)),
        ["validate", "--config", str(path)],
        ["budget", "--config", str(path)],
        ["evaluate", "--config", str(path), "--tasks", "fff_math"],
        ["download", "--config", str(path)],
        ["sweep", "--config", str(path)],
        ["fit", f"--config={path}"],
    ):
        assert refused(argv, capsys).startswith(says), argv
    assert time.monotonic() - start < 5 and nothing_written(logs)


def test_a_bomb_named_by_a_grid_a_budget_target_or_a_nested_config_is_refused_too(tmp_path, capsys):
    from fff_lightning.errors import ConfigError
    from fff_lightning.run_config import describe_run
    from fff_lightning.sweep import load_grid

    path = bomb(tmp_path)
    with pytest.raises(ConfigError, match="expand to more than 1,000,000"):
        describe_run(QUICK, path)  # a sweep's runs, the budget's and download's configs go through here
    with pytest.raises(ConfigError, match="expand to more than 1,000,000"):
        load_grid(path)
    target = tmp_path / "target.yaml"
    target.write_text(
        "trainer:\n  callbacks:\n    - class_path: fff_lightning.callbacks.ParameterBudget\n"
        f"      init_args: {{target: {path.name}}}\n"
    )
    with pytest.raises(ConfigError, match="expand to more than 1,000,000"):
        describe_run(QUICK, target)
    nested = tmp_path / "nested.yaml"
    nested.write_text(f"model:\n  fff: {path.name}\n")  # jsonargparse reads a class's options from a file named so
    line = refused(["budget", "--config", QUICK, "--config", str(nested)], capsys)
    assert "expand to more than 1,000,000" in line, line


def test_an_alias_inside_itself_and_a_huge_file_are_refused_unread(tmp_path, capsys):
    loop = tmp_path / "loop.yaml"
    loop.write_text("model:\n  fff: &a [1, *a]\n")
    line = refused(["budget", "--config", str(loop)], capsys)
    assert line == f"error: {loop}: the value at line 2, column 8 contains an alias of itself: refused", line
    huge = tmp_path / "huge.yaml"
    with open(huge, "wb") as fh:
        fh.truncate(11 << 20)  # sparse: 11 MiB that cost no disk
    line = refused(fit(tmp_path / "logs", "--config", str(huge)), capsys)
    assert line == f"error: {huge}: 11.0 MiB: a YAML config is at most 10 MiB; refused unread", line


def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path, capsys):
    path = tmp_path / "syntax.yaml"
    path.write_text("model:\n  fff: {width: 32\n  lora: {r: 8}\n")
    line = refused(fit(tmp_path / "logs", "--config", str(path)), capsys)
    assert line == (
        f"error: {path}:3:7: not valid YAML: did not find expected ',' or '}}' "
        "(while parsing a flow mapping at line 2, column 8)"
    )
    assert nothing_written(tmp_path / "logs")


def test_a_value_of_the_wrong_type_says_its_full_key_the_type_expected_and_the_value(tmp_path, capsys):
    path = tmp_path / "width.yaml"
    path.write_text("model: {fff: {width: thirtytwo}}\n")
    line = refused(fit(tmp_path / "logs", "--config", str(path)), capsys)
    assert line == f"error: model.fff.width: expected an int or a list of ints, got 'thirtytwo' {HELP}"
    line = refused(fit(tmp_path / "logs", "--trainer.max_epochs", "two"), capsys)
    assert line == f"error: trainer.max_epochs: expected an int or null, got 'two' {HELP}"
    line = refused(fit(tmp_path / "logs", "--model.lora.dropout", "x"), capsys)
    assert line == f"error: model.lora.dropout: expected a number, got 'x' {HELP}"
    line = refused(fit(tmp_path / "logs", "--model.fff.widht", "8"), capsys)  # other messages stay as they were
    assert line == f"error: model.fff: Option 'widht' is not accepted {HELP}"
    assert nothing_written(tmp_path / "logs")


def test_an_abbreviated_option_is_refused_not_guessed(tmp_path, capsys):
    line = refused(fit(tmp_path / "logs", "--trainer.max_epoch", "2"), capsys)
    assert line == f"error: unrecognized arguments: --trainer.max_epoch 2 {HELP}"
    line = refused(["budget", "--config", QUICK, "--jso"], capsys)  # budget's own options, then the run's
    assert line.startswith("error: unrecognized arguments: --jso"), line
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--config", "step1_i", "--dry"])  # argparse's own: the usage, then the error line
    assert e.value.code == 2 and "error: unrecognized arguments: --dry" in capsys.readouterr().err
    assert nothing_written(tmp_path / "logs")


def test_an_unknown_config_name_points_to_the_list_of_shipped_configs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = refused(["fit", "--config", "quickstrt"], capsys)
    assert line == (
        f"error: config: File does not exist: '{tmp_path / 'quickstrt'}', and no shipped config is named "
        "'quickstrt' (did you mean quickstart?): `python -m fff_lightning configs` lists them"
    )


def test_a_text_file_given_as_a_checkpoint_is_one_line(tmp_path, capsys):
    text = tmp_path / "notes.ckpt"
    text.write_text("hello, I am a text file\n")
    line = refused(fit(tmp_path / "logs", "--ckpt_path", str(text)), capsys)
    assert line == (
        f"error: ckpt_path: {text} is not a checkpoint (it is text: 'hello, I am a text file'; a checkpoint is the "
        "archive torch.save writes, such as <run>/checkpoints/last.ckpt)"
    )
    assert nothing_written(tmp_path / "logs")
