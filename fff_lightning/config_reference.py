"""The run config reference (``docs/config.md``): every option a run config takes, with its type, default and
description, generated from the code so that it cannot drift from it.

Names, types and defaults come from the classes themselves (``dataclasses.fields``, ``inspect.signature``), the
descriptions from their Google-style docstrings (the ``Args:`` or ``Attributes:`` entries; a dataclass field
without one may carry a ``#:`` comment). The top-level options (``--experiment``...) and the callbacks are read
from their source files (:mod:`fff_lightning.run_config`, ``fff_lightning.callbacks``) without importing them: those
modules import :mod:`fff_lightning.config_files`, whose ``configs --reference`` command runs this one.

``python -m fff_lightning configs --reference`` prints it; ``configs --reference docs/config.md`` writes it. This
module imports no torch until :func:`reference` runs.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import types
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

#: The command that writes docs/config.md (said in its first lines, and by the test that compares them).
COMMAND = "python -m fff_lightning configs --reference docs/config.md"
#: Callbacks the command line adds itself: not a config's to name.
CLI_CALLBACKS = ("GracefulInterrupt",)

_SECTION = re.compile(r"(Args|Arguments|Attributes|Parameters):")
_ENTRY = re.compile(r"(\w+)\s*(?:\([^)]*\))?:\s*(.*)")


@dataclass
class Option:
    """One row of the reference: ``name`` as a config writes it under its section, its type, default (Markdown)
    and description."""

    name: str
    type: str
    default: str
    description: str


@dataclass
class Section:
    """One table: a heading, a paragraph above it and its options."""

    title: str
    intro: str
    options: list[Option]


# -- docstrings ------------------------------------------------------------------------------------------------
def doc_entries(doc: str | None) -> dict[str, str]:
    """The entries of a Google-style docstring's ``Args:``/``Attributes:`` sections: ``{name: description}``, each
    description's lines joined into one."""
    lines = inspect.cleandoc(doc or "").splitlines()
    out: dict[str, str] = {}
    i = 0
    while i < len(lines):
        if not _SECTION.fullmatch(lines[i].strip()):
            i += 1
            continue
        outer = len(lines[i]) - len(lines[i].lstrip())
        entry_indent, name = None, None
        i += 1
        while i < len(lines):
            line = lines[i]
            if line.strip():
                indent = len(line) - len(line.lstrip())
                if indent <= outer:
                    break
                if entry_indent is None:
                    entry_indent = indent
                m = _ENTRY.fullmatch(line.strip())
                if indent == entry_indent and m:
                    name = m[1]
                    out[name] = m[2]
                elif name is not None:
                    out[name] = f"{out[name]} {line.strip()}".strip()
            i += 1
    return out


def summary(doc: str | None) -> str:
    """A docstring's first paragraph, on one line."""
    text = inspect.cleandoc(doc or "").split("\n\n")[0]
    return " ".join(text.split())


def comment_entries(cls: type) -> dict[str, str]:
    """``#:`` comments directly above a class's annotated fields: ``{field: comment}``."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out, pending = {}, []
    for line in source.splitlines():
        text = line.strip()
        if text.startswith("#:"):
            pending.append(text[2:].strip())
            continue
        m = re.match(r"(\w+)\s*:", text)
        if m and pending:
            out[m[1]] = " ".join(pending)
        pending = []
    return out


def class_entries(cls: type) -> dict[str, str]:
    """Descriptions of a class's fields or arguments: its docstring's entries (a base class's fill the gaps, so a
    subclass that adds nothing inherits them), then ``#:`` comments."""
    out: dict[str, str] = {}
    for klass in reversed(inspect.getmro(cls)):
        if klass is object:
            continue
        out.update(comment_entries(klass))
        out.update(doc_entries(klass.__dict__.get("__doc__")))
    return out


def markdown(text: str) -> str:
    """Docstring markup as Markdown for a table cell: double backticks as single ones, Sphinx roles as code, pipes
    escaped, and ``<`` outside code as an entity (``<logs_dir>`` would read as an HTML tag)."""
    text = re.sub(r":(?:class|mod|meth|func|attr|data):`~?([\w.]+)`", lambda m: f"``{_role(m)}``", text)
    parts = text.replace("``", "`").split("`")
    text = "`".join(p if i % 2 else p.replace("<", "&lt;") for i, p in enumerate(parts))
    return text.replace("|", "\\|").strip()


def _role(m: re.Match) -> str:
    name = m[1]
    return name.rpartition(".")[2] if m[0].split("`")[1].startswith("~") else name


# -- types and defaults ----------------------------------------------------------------------------------------
def type_name(annotation) -> str:
    """An annotation as the code writes it (``int | None``), module paths left out."""
    if annotation is inspect.Parameter.empty:
        return ""
    if isinstance(annotation, str):
        text = annotation
    elif isinstance(annotation, type) and not isinstance(annotation, types.GenericAlias):
        text = annotation.__name__
    else:
        text = str(annotation)
    text = re.sub(r"\b(?:[A-Za-z_]\w*\.)+([A-Za-z_]\w*)", r"\1", text).replace("NoneType", "None")
    return markdown(f"``{text}``")


def value(v) -> str:
    """A default as YAML writes it."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v if v else '""'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {value(x)}" for k, x in v.items()) + "}"
    return repr(v)


def default_cell(v) -> str:
    if v is dataclasses.MISSING or v is inspect.Parameter.empty:
        return "required"
    return markdown(f"``{value(v)}``")


def field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation but ``-`` and ``_`` dropped, spaces as
    ``-``."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _link(title: str) -> str:
    return f"[{title}](#{slug(title)})"


# -- sections --------------------------------------------------------------------------------------------------
def dataclass_options(cls: type, nested: dict[str, str] | None = None) -> list[Option]:
    """One row per field of a config dataclass; ``nested``: ``{field: section title}`` for fields that are
    sections of their own."""
    docs, nested = class_entries(cls), nested or {}
    rows = []
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        description = markdown(docs.get(f.name, ""))
        default = field_default(f)
        if f.name in nested:
            cell = "see below"
            description = f"{description} Its options: {_link(nested[f.name])}.".strip()
        else:
            cell = default_cell(default)
        rows.append(Option(f.name, type_name(f.type), cell, description))
    return rows


def signature_options(cls: type, fn, nested: dict[str, str], linked: dict[str, str] | None = None) -> list[Option]:
    """One row per argument of ``fn`` (a class's ``__init__``), described by the class's docstring."""
    docs, linked = class_entries(cls), linked or {}
    rows = []
    for p in inspect.signature(fn).parameters.values():
        if p.name == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        description = markdown(docs.get(p.name, ""))
        if p.name in nested:
            cell = "see below" if dataclasses.is_dataclass(p.default) else default_cell(p.default)
            description = f"{description} Its options: {_link(nested[p.name])}.".strip()
        else:
            cell = default_cell(p.default)
        if p.name in linked:
            description = f"{description} *Linked:* {linked[p.name]}".strip()
        rows.append(Option(p.name, type_name(p.annotation), cell, description))
    return rows


def _source(module: str) -> Path:
    """A module's file, found without importing it."""
    spec = find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(module)
    return Path(spec.origin)


def _literal(node) -> object:
    try:
        return ast.literal_eval(node)
    except ValueError:
        return ast.unparse(node)


def run_options() -> tuple[list[Option], dict[str, str]]:
    """The top-level options :class:`~fff_lightning.run_config.RunCLI` adds (read from its source), and the
    options it links (``{target: what sets it}``)."""
    tree = ast.parse(_source("fff_lightning.run_config").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "RunCLI")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "add_arguments_to_parser")
    rows, links = [], {}
    for call in (n for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)):
        kw = {k.arg: k.value for k in call.keywords}
        if call.func.attr == "add_argument":
            name = call.args[0].value.removeprefix("--")
            default = _literal(kw["default"]) if "default" in kw else None
            kind = kw["type"].id if isinstance(kw.get("type"), ast.Name) else "str"
            if "choices" in kw:
                kind = " | ".join(repr(c) for c in _literal(kw["choices"]))
            kind = kind if default is not None or "choices" in kw else f"{kind} | None"
            text = _literal(kw["help"]) if "help" in kw else ""
            rows.append(Option(name, markdown(f"``{kind}``"), default_cell(default), markdown(text)))
        elif call.func.attr == "link_arguments":
            sources = _literal(call.args[0])
            sources = [sources] if isinstance(sources, str) else list(sources)
            fn_name = kw["compute_fn"].id if isinstance(kw.get("compute_fn"), ast.Name) else None
            via = f" (through `{fn_name}`)" if fn_name else ""
            text = (
                f"the command line sets it from {', '.join(f'`{s}`' for s in sources)}{via}; it is not an option "
                "of its own there."
            )
            links[_literal(call.args[1]).removeprefix("data.")] = text
    return rows, links


def callback_sections() -> list[Section]:
    """The callbacks a run config names under ``trainer.callbacks`` (``class_path:
    fff_lightning.callbacks.<Name>``, ``init_args``), read from their source files."""
    folder = _source("fff_lightning.callbacks").parent
    init = ast.parse((folder / "__init__.py").read_text())
    where = {a.asname or a.name: n.module for n in init.body if isinstance(n, ast.ImportFrom) for a in n.names}
    exported = next(_literal(n.value) for n in init.body if isinstance(n, ast.Assign) and n.targets[0].id == "__all__")
    sections = []
    for name in exported:
        if name in CLI_CALLBACKS:
            continue
        tree = ast.parse((folder / f"{where[name]}.py").read_text())
        cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
        fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
        docs = doc_entries(ast.get_docstring(cls))
        args = fn.args.args[1:]
        defaults = [None] * (len(args) - len(fn.args.defaults)) + list(fn.args.defaults)
        rows = []
        for a, d in zip(args, defaults, strict=True):
            annotation = ast.unparse(a.annotation) if a.annotation is not None else ""
            cell = default_cell(_literal(d)) if d is not None else "required"
            rows.append(Option(a.arg, type_name(annotation), cell, markdown(docs.get(a.arg, ""))))
        intro = f"`class_path: fff_lightning.callbacks.{name}`. {markdown(summary(ast.get_docstring(cls)))}"
        sections.append(Section(f"trainer.callbacks: {name}", intro, rows))
    return sections


def sections() -> list[Section]:
    """Every section of the reference, in the order a run config reads."""
    from fff_lightning import kinds
    from fff_lightning.data.datamodule import FFFDataModule
    from fff_lightning.data.sources import SourceConfig
    from fff_lightning.generation import Sampling
    from fff_lightning.module import FFFModule
    from fff_lightning.spec import BaseModelConfig, TinyConfig

    kind_titles = {k.name: f"model.{k.name}: {k.title or k.name}" for k in kinds.kinds()}
    top, links = run_options()
    module_nested = {"base": "model.base: the base model", "sampling": "model.sampling: decoding for predict"}
    module_nested.update(kind_titles)
    out = [
        Section(
            "Top level",
            "Where a run's files go and how it resumes (read by every Lightning command: `fit`, `validate`, `test`, "
            "`predict`). Besides these, `--config` (repeatable: later files win), `--print_config`, `ckpt_path` "
            "(the checkpoint to resume or evaluate), `seed_everything` (`false`: the `DeterministicSeed` callback "
            "seeds) and `trainer.*` are Lightning's own.",
            top,
        ),
        Section(
            "model: training, validation and prediction",
            f"`FFFModule`'s arguments. {markdown(summary(FFFModule.__doc__))}",
            signature_options(FFFModule, FFFModule.__init__, module_nested),
        ),
        Section(
            module_nested["base"],
            f"`BaseModelConfig`. {markdown(summary(BaseModelConfig.__doc__))}",
            dataclass_options(BaseModelConfig, {"tiny": "model.base.tiny: the tiny random model"}),
        ),
        Section(
            "model.base.tiny: the tiny random model",
            f"`TinyConfig`. {markdown(summary(TinyConfig.__doc__))}",
            dataclass_options(TinyConfig),
        ),
        Section(
            module_nested["sampling"],
            f"`Sampling`. {markdown(summary(Sampling.__doc__))}",
            dataclass_options(Sampling),
        ),
    ]
    for kind in kinds.kinds():
        intro = f"`{kind.config.__name__}` ({kind.title or kind.name}). {markdown(summary(kind.config.__doc__))}"
        out.append(Section(kind_titles[kind.name], intro, dataclass_options(kind.config)))
    out += [
        Section(
            "data: the datasets and batches",
            f"`FFFDataModule`'s arguments. {markdown(summary(FFFDataModule.__doc__))}",
            signature_options(
                FFFDataModule, FFFDataModule.__init__, {"sources": "data.sources: one dataset of the mix"}, links
            ),
        ),
        Section(
            "data.sources: one dataset of the mix",
            f"`SourceConfig`: one item of the `data.sources` list. {markdown(summary(SourceConfig.__doc__))}",
            dataclass_options(SourceConfig),
        ),
        *callback_sections(),
    ]
    return out


def reference() -> str:
    """docs/config.md: the reference as Markdown."""
    parts = sections()
    lines = [
        "# Run config reference",
        "",
        f"Generated by `{COMMAND}` from the code's signatures and docstrings: edit those, not this file.",
        "",
        "A run config is a YAML file given to `--config` (several merge, later ones win; a shipped config by its "
        "name: `--config quickstart`). Every option is also a command-line flag: `model.lr` is `--model.lr 1e-4`, "
        "`model.base.backend` is `--model.base.backend hf`. `trainer.*` are the options of Lightning's `Trainer`. "
        "`python -m fff_lightning fit --help` prints them all; [the user's guide](guide.md#describing-a-run) "
        "shows a config.",
        "",
        *[f"- {_link(s.title)}" for s in parts],
        "- `trainer`: Lightning's `Trainer` arguments (`max_steps`, `precision`, `devices`...)",
    ]
    for s in parts:
        lines += ["", f"## {s.title}", "", s.intro, "", "| option | type | default | description |"]
        lines.append("|---|---|---|---|")
        lines += [f"| `{o.name}` | {o.type} | {o.default} | {o.description} |" for o in s.options]
    return "\n".join(lines) + "\n"
