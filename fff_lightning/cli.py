"""Command line: ``python -m fff_lightning <command>``: a table of commands and how their failures read.

Each command is a module with ``main(argv)``, imported only when it runs (``--help`` imports no torch); no
command imports this module. ``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI subcommands
(:mod:`fff_lightning.lightning_cli`); the others are this project's own.
"""

from __future__ import annotations

import importlib
import sys
from typing import NamedTuple

from fff_lightning.errors import ConfigError, Diverged, Interrupted, config_error_in

PROG = "python -m fff_lightning"


class Command(NamedTuple):
    module: str  #: the module whose ``main(argv)`` runs it
    usage: str  #: one line for the command list
    unsloth: bool = False  #: on a GPU machine, Unsloth is imported before the command (it patches transformers)
    whole_argv: bool = False  #: ``main`` takes the command's name too (LightningCLI's subcommands)


_LIGHTNING = "fff_lightning.lightning_cli"
COMMANDS: dict[str, Command] = {
    "fit": Command(_LIGHTNING, "train adapters:               fit --config quickstart", True, True),
    "validate": Command(
        _LIGHTNING,
        "per-dataset loss table:       validate --config <run.yaml> --model.adapter_path <run>/adapter",
        True,
        True,
    ),
    "test": Command(_LIGHTNING, "like validate, on the test loaders", True, True),
    "predict": Command(
        _LIGHTNING,
        "answer prompts from a file:   predict --config <run.yaml> --model.adapter_path "
        "<dir> --data.predict_file prompts.jsonl",
        True,
        True,
    ),
    "budget": Command(
        "fff_lightning.budget_cli", "trainable parameters of a run config, and --match for a fair comparison"
    ),
    "sweep": Command(
        "fff_lightning.sweep",
        "a grid of runs (fit + validate each), with budget-matched LoRA baselines:  sweep --config <grid.yaml>",
    ),
    "evaluate": Command(
        "fff_lightning.evaluate",
        "task scores through lm-eval:  evaluate --config <run.yaml> --model.adapter_path <dir> --tasks fff_math",
        True,
    ),
    "export": Command(
        "fff_lightning.export",
        "a run as a folder to serve:   export <run> --out <folder> [--merged]",
        True,
    ),
    "generate": Command(
        "fff_lightning.generate",
        "text from a run or a folder:  generate <run or folder> --prompt TEXT [--temperature 0.7 --stop ...]",
        True,
        True,
    ),
    "chat": Command("fff_lightning.generate", "talk to a run or a folder:   chat <run or folder>", True, True),
    "report": Command(
        "fff_lightning.report",
        "table, loss curves and bar graph of runs:  report <run folders...> --out <folder> [--reference research]",
    ),
    "bench": Command(
        "fff_lightning.bench",
        "tokens/s and peak memory of fit against bare Unsloth/PEFT loops (GPU; a smoke test on CPU)",
        True,
    ),
    "download": Command(
        "fff_lightning.download",
        "every hub file a run needs into the hub cache, to train offline later:  download --config <run.yaml>",
    ),
    "configs": Command(
        "fff_lightning.config_files", "the shipped run configs (--config <name>), --copy <folder> to edit them"
    ),
}

#: The commands whose ``--config`` files are checked (size, YAML syntax, alias expansion) before the command runs.
READS_CONFIGS = ("fit", "validate", "test", "predict", "budget", "sweep", "evaluate", "download")


def usage() -> str:
    lines = [f"usage: {PROG} <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {c.usage}" for name, c in COMMANDS.items()]
    return "\n".join([*lines, "", f"`{PROG} <command> --help` lists a command's options.", ""])


def dispatch(argv: list[str]) -> None:
    """Run the command ``argv`` names."""
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    name, rest = argv[0], argv[1:]
    command = COMMANDS.get(name)
    if command is None:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    if name in READS_CONFIGS:
        from fff_lightning import config_files

        config_files.resolve_argv(rest)  # refuses a YAML bomb, a syntax error or an unknown name before any import
    from fff_lightning import console

    console.quiet()  # before the command's imports: bitsandbytes logs one of its messages at import
    if command.unsloth and not any(a in ("-h", "--help") for a in rest):
        from fff_lightning.backends import preimport_unsloth

        preimport_unsloth()  # before the command imports Lightning, which imports transformers
    importlib.import_module(command.module).main([name, *rest] if command.whole_argv else rest)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        dispatch(argv)
    except ConfigError as e:
        _fail(f"error: {e}", 2)
    except Diverged as e:
        _fail(f"error: {e}", e.exit_code, release=False)
    except Interrupted as e:
        _fail(str(e) if e.exit_code else "", e.exit_code, release=e.release)
    except KeyboardInterrupt:  # a Ctrl-C before the command took the signals (while reading its configs)
        _fail("interrupted by SIGINT before training started: nothing was trained or saved", 130)
    except RecursionError:
        _fail("error: an input is nested too deeply to read (a JSON or YAML value thousands of levels deep)", 2)
    except MemoryError:
        _fail(
            "error: out of memory (the machine's RAM): lower the sizes of the run (data.batch_size, "
            "data.max_seq_length, the adapters) or free memory",
            1,
        )
    except OSError as e:
        import errno

        from fff_lightning.files import DiskFullError

        if isinstance(e, DiskFullError):
            _fail(f"error: {e}", 1, release=False)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" while writing {e.filename}" if e.filename else ""
            _fail(
                f"error: no space left on the device{where}: free some space, or write to another disk "
                "(--logs_dir, FFF_CACHE)",
                1,
            )
        if isinstance(e, PermissionError) and e.filename:
            _fail(f"error: cannot write {e.filename} ({e.strerror}): choose a folder you can write to", 2)
        _release_and_raise()
    except ValueError as e:  # jsonargparse wraps errors raised while it instantiates configs
        cause = config_error_in(e)
        if cause is None:
            full = _disk_full_in(e)
            if full is not None:
                _fail(f"error: no space left on the device ({full}): free some space, or write to another disk", 1)
            _release_and_raise()
        _fail(f"error: {cause}", 2)
    except Exception as e:
        message = _known_failure(e)
        if message is None:
            _release_and_raise()
        bad_input = message.startswith("error: trainer")
        _fail(message, 2 if bad_input else 1, release=bad_input)


def _disk_full_in(e: BaseException) -> str | None:
    """The file of the first full-disk ``OSError`` in an exception's chain (loggers wrap theirs), or None."""
    import errno

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return str(e.filename or "a file")
        e = e.__cause__ or e.__context__
    return None


def _release_and_raise() -> None:
    """A failure this tool does not know (a bug): its traceback is shown, and the run folder it leaves unused goes."""
    from fff_lightning import runs

    runs.release_unused()
    raise


def _fail(message: str, code: int, release: bool = True) -> None:
    """One line on stderr and the exit code. After bad input (``release``), a run folder this process claimed but
    never used (no checkpoint, adapter or table) is removed, so it does not shift the next run's name; a run that
    failed while training keeps its folder and logs."""
    from fff_lightning import runs

    if release:
        runs.release_unused()
    if message:
        print(message, file=sys.stderr)
    sys.exit(code)


def _known_failure(e: Exception) -> str | None:
    """A one-line explanation, with what to do, of failures that are not bugs: out of GPU memory, a GPU asked
    for where there is none."""
    import torch

    if isinstance(e, torch.OutOfMemoryError):
        return (
            f"error: out of GPU memory ({str(e).splitlines()[0][:160]}). Lower data.batch_size or "
            "data.max_seq_length, keep model.base.gradient_checkpointing on (and model.base.checkpoint_layers "
            "null), or use data.packing with a smaller data.tokens_per_batch"
        )
    if type(e).__name__ == "MisconfigurationException":
        text = str(e).splitlines()[0]
        if any(w in text.lower() for w in ("gpu", "cuda", "accelerator", "not available")):
            return (
                f"error: trainer.accelerator: {text} Use --trainer.accelerator cpu (with a model a CPU can run, "
                "e.g. configs/quickstart.yaml)"
            )
        return f"error: trainer: {text}"
    return None
