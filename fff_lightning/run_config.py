"""A run's configuration: the parser every Lightning command and every reader of run configs share.

:class:`RunCLI` is the LightningCLI of :class:`~fff_lightning.module.FFFModule` and
:class:`~fff_lightning.data.datamodule.FFFDataModule` with this project's options and links (no behaviour of a
run: that is :mod:`fff_lightning.lightning_cli`'s). :func:`describe_run` reads run configs into the module and the
data module without loading any weight or data: ``budget``, the budget guard's ``target``, ``sweep`` and the
tests read runs through it, so configs cannot drift from the code.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from fff_lightning import backends, config_files
from fff_lightning.data.datamodule import FFFDataModule
from fff_lightning.errors import one_line
from fff_lightning.module import FFFModule

PROG = "python -m fff_lightning"
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def tokenizer_for(backend: str, name_or_path: str, tokenizer: str | None) -> str | None:
    """The data module's tokenizer, linked from the model's base config."""
    if tokenizer or backend not in backends.BACKENDS:  # an unknown backend is refused by the model's config
        return tokenizer or name_or_path
    return backends.get(backend).tokenizer_source(name_or_path)


def prompt_room(max_seq_length: int, max_new_tokens: int) -> int:
    """How many tokens of a prompt fit beside its answer."""
    return max_seq_length - max_new_tokens


def _guard_yaml_loader() -> None:
    """Every YAML value jsonargparse reads (a config file, a config nested in one as ``fff: fff.yaml``, an option's
    value) is checked for alias expansion first (:func:`~fff_lightning.config_files.check_value`); ``--config``
    files were checked before, naming the file."""
    import yaml
    from jsonargparse import get_loader, set_loader

    load = get_loader("yaml")
    if getattr(load, "checked", False):
        return

    def checked_load(text):
        config_files.check_value(text)
        return load(text)

    checked_load.checked = True
    set_loader("yaml", checked_load, exceptions=(yaml.YAMLError,))


_guard_yaml_loader()


class Parser(LightningArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # --trainer.max_epoch is refused, not read as --trainer.max_epochs
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        """One line and exit code 2 instead of the usage text and a nested explanation."""
        if not self.exit_on_error:
            return super().error(message, ex)
        print(f"error: {one_line(message)} (`{self.prog.replace(' [options]', '')} --help` lists options)",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)


class RunCLI(LightningCLI):
    """The options and links of a run, on :class:`FFFModule` and :class:`FFFDataModule`. ``args``: the command
    line without the program (``None``: this process's ``sys.argv``); a ``--config`` may name a shipped config."""

    def __init__(self, args: list[str] | None = None, **kwargs):
        args = list(sys.argv[1:] if args is None else args)
        self.argv = config_files.resolve_argv(args)
        kwargs.setdefault("parser_class", Parser)
        kwargs.setdefault("seed_everything_default", False)  # the DeterministicSeed callback and the model's seed
        kwargs.setdefault("auto_configure_optimizers", False)
        # The data module shares the data out between processes itself (seeded, nothing repeated).
        kwargs.setdefault("trainer_defaults", {"use_distributed_sampler": False})
        kwargs.setdefault("parser_kwargs", {"prog": PROG, **{c: {"prog": f"{PROG} {c}"} for c in LIGHTNING_COMMANDS}})
        super().__init__(FFFModule, FFFDataModule, args=self.argv, **kwargs)

    def parse_arguments(self, parser, args) -> None:
        """The arguments given (always a list here: ``sys.argv`` is read once, in ``__init__``)."""
        self.config = parser.parse_args(args)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--experiment", default="default", help="logs go to <logs_dir>/<experiment>/<run_name>/")
        parser.add_argument(
            "--run_name", default=None, help="default: the adapters' legend, e.g. lora-[128]-6-[gelu_new]-[up_proj]"
        )
        parser.add_argument("--logs_dir", default="logs", help="root folder of TensorBoard logs and checkpoints")
        parser.add_argument(
            "--out_dir",
            default=None,
            help="validate/test/predict: folder for the table or the predictions (default: the evaluated run's)",
        )
        parser.add_argument(
            "--resume_changes",
            default="refuse",
            choices=["refuse", "allow"],
            help="with --ckpt_path: refuse (default) or allow a checkpoint whose adapter or data settings, base model "
            "name or schedule length (trainer.max_steps, max_epochs, accumulate_grad_batches) differ; another base "
            "model shape is always refused",
        )
        parser.add_argument(
            "--allow_untrained",
            type=bool,
            default=False,
            help="validate/test/predict without --model.adapter_path or --ckpt_path: freshly initialised adapters",
        )
        parser.link_arguments(
            ("model.base.backend", "model.base.name_or_path", "model.base.tokenizer"),
            "data.tokenizer",
            compute_fn=tokenizer_for,
        )
        parser.link_arguments("model.base.max_seq_length", "data.max_seq_length")
        parser.link_arguments(
            ("model.base.max_seq_length", "model.max_new_tokens"), "data.max_prompt_tokens", compute_fn=prompt_room
        )


def resolve_config_paths(cfg) -> None:
    """A run config names another by a path relative to itself (the budget guard's ``target``): make it absolute,
    looking next to each given config (the last first), then in the working directory, then the shipped configs."""
    dirs = [Path(str(p)).resolve().parent for p in reversed(cfg.get("config") or [])]
    for cb in cfg.trainer.get("callbacks") or []:
        args = getattr(cb, "init_args", None)
        target = args.get("target") if args is not None else None
        if isinstance(target, str) and not Path(target).is_absolute():
            found = next((d / target for d in dirs if (d / target).is_file()), None)
            args.target = str(found or config_files.path(target))
        if isinstance(args.get("target") if args is not None else None, str):
            config_files.check_yaml_file(args.target)  # before YAML reads it (size, syntax, alias expansion)


class _Describe(RunCLI):
    """Parse and build, no Trainer: a GPU config must parse on a CPU machine too."""

    def instantiate_trainer(self, **kwargs):
        return None

    def before_instantiate_classes(self) -> None:
        resolve_config_paths(self.config)


def describe_run(*configs: str | Path, overrides: list[str] | None = None):
    """Parse run configs (later ones override earlier ones; shipped ones by name) and ``--model.*``-style
    overrides with the parser ``fit`` uses, and build the module (its adapters and base model, no weights) and the
    data module (no data).

    Returns:
        an object whose ``.model`` is the :class:`~fff_lightning.module.FFFModule`, ``.datamodule`` the
        :class:`~fff_lightning.data.datamodule.FFFDataModule` and ``.config`` the parsed config.
    """
    args = [a for p in configs for a in ("--config", str(p))] + list(overrides or [])
    return _Describe(args, run=False, parser_kwargs={"prog": PROG})
