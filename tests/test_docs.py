"""The documentation: docs/config.md is what the code generates, every option of a run is described, every relative
link of the README and docs/ reaches a file (and heading), and the README's newcomer part stays short."""

import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from fff_lightning import config_reference

ROOT = Path(__file__).parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
#: The README's newcomer part ends where the first heading after its "Where the rest is" section begins.
LAST_NEWCOMER_SECTION = "## Where the rest is"
NEWCOMER_LINES = 120


@pytest.fixture(scope="module")
def generated() -> str:
    return config_reference.reference()


def test_docs_config_md_is_what_the_code_generates(generated):
    written = (ROOT / "docs" / "config.md").read_text()
    assert written == generated, (
        f"docs/config.md is out of date with the code's options: regenerate it with `{config_reference.COMMAND}`"
    )


def table_rows(markdown: str) -> dict[str, dict[str, str]]:
    """``{section title: {option: description}}`` of the reference's tables."""
    out, title = {}, None
    for line in markdown.splitlines():
        if line.startswith("## "):
            title = line[3:]
            out[title] = {}
        m = re.fullmatch(r"\| `(\w+)` \|(.*)\|", line)
        if m and title is not None:
            cells = re.split(r"(?<!\\)\|", m[2])
            out[title][m[1]] = cells[-1].strip()
    return out


def section_of(rows: dict, prefix: str) -> dict[str, str]:
    (title,) = [t for t in rows if t == prefix or t.startswith(f"{prefix}:")]
    return rows[title]


def test_every_option_of_the_model_its_base_and_the_data_is_described(generated):
    from fff_lightning.data.datamodule import FFFDataModule
    from fff_lightning.module import FFFModule
    from fff_lightning.spec import BaseModelConfig

    rows = table_rows(generated)
    wanted = {
        "model.base": [f.name for f in dataclasses.fields(BaseModelConfig)],
        "model": [p for p in inspect.signature(FFFModule.__init__).parameters if p not in ("self", "adapters")],
        "data": [p for p in inspect.signature(FFFDataModule.__init__).parameters if p != "self"],
    }
    for prefix, names in wanted.items():
        documented = section_of(rows, prefix)
        assert len(names) > 5
        for name in names:
            assert name in documented, f"{prefix}.{name} is missing from docs/config.md"
            assert documented[name], f"{prefix}.{name} has no description: add it to its class docstring's Args"


def test_the_docstring_parser_reads_google_style_entries():
    doc = """Summary.

    Args:
        first: one line.
        second (int): two
            lines.

    Returns:
        not an argument.
    """
    assert config_reference.doc_entries(doc) == {"first": "one line.", "second": "two lines."}
    assert config_reference.markdown("a ``x | y`` of :class:`~p.q.Cls` in <dir>") == r"a `x \| y` of `Cls` in &lt;dir>"


def test_the_configs_command_writes_the_reference(tmp_path, capsys, generated):
    from fff_lightning.config_files import main

    main(["--reference", str(tmp_path / "config.md")])
    assert (tmp_path / "config.md").read_text() == generated
    capsys.readouterr()
    main(["--reference"])
    assert capsys.readouterr().out == generated


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: inline code marks and punctuation dropped (``-`` and ``_`` kept), lower
    case, spaces as ``-``."""
    return config_reference.slug(heading)


def anchors(path: Path) -> set[str]:
    out, seen, fenced = set(), {}, False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6} (.+)", line)):
            base = slug(m[1])
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    """The Markdown link targets of a file, code blocks and code spans left out."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("path", [ROOT / "README.md", *DOCS], ids=lambda p: p.name)
def test_every_relative_link_reaches_a_file_and_heading(path):
    broken = []
    for target in links(path):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no such heading in {dest.name})")
    assert broken == [], f"{path.name}: broken links: {broken}"


def test_the_readme_newcomer_part_fits_on_two_screens():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert LAST_NEWCOMER_SECTION in lines, f"the README needs its {LAST_NEWCOMER_SECTION!r} section"
    start = lines.index(LAST_NEWCOMER_SECTION)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("#")), len(lines))
    newcomer = lines[:end]
    assert "## Contents" in newcomer
    assert len(newcomer) <= NEWCOMER_LINES, (
        f"the README's newcomer part (up to its first heading after {LAST_NEWCOMER_SECTION!r}) has "
        f"{len(newcomer)} lines, more than {NEWCOMER_LINES}: move detail into docs/"
    )


def test_the_readme_gives_the_two_set_up_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    commands = [line for block in blocks for line in block.splitlines()]
    fit = (
        "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 -e . && "
        "python -m fff_lightning fit --config configs/quickstart.yaml"
    )
    assert fit in commands
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in line]
    assert len(ci) == 1 and ci[0] in commands, "the README's test command and .ci/run's differ"
