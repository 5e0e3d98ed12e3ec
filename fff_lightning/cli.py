"""Command line: ``python -m fff_lightning <command>``. This file only wires; logic lives in the modules.

``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI subcommands over :class:`FFFModule` and
:class:`FFFDataModule`; ``budget`` and ``bench`` are this project's own and parse run configs with the same parser.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from fff_lightning.errors import ConfigError, Diverged, Interrupted, config_error_in, one_line

PROG = "python -m fff_lightning"
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
USAGE = f"""\
usage: {PROG} <command> [options]

commands:
  fit        train adapters:               fit --config configs/quickstart.yaml
  validate   per-dataset loss table:       validate --config <run.yaml> --model.adapter_path <run>/adapter
  test       like validate, on the test loaders
  predict    answer prompts from a file:   predict --config <run.yaml> --model.adapter_path <dir>
                                           --data.predict_file prompts.jsonl
  budget     trainable parameters of a run config, and --match for a fair comparison
  sweep      a grid of runs (fit + validate each), with budget-matched LoRA baselines:  sweep --config <grid.yaml>
  report     table, loss curves and bar graph of runs:  report <run folders...> --out <folder> [--reference research]
  bench      tokens/s and peak memory of fit against bare Unsloth/PEFT loops (GPU; a smoke test on CPU)

`{PROG} <command> --help` lists a command's options.
"""


def tokenizer_for(backend: str, name_or_path: str, tokenizer: str | None) -> str | None:
    """The data module's tokenizer, linked from the model's base config."""
    if tokenizer:
        return tokenizer
    return None if backend == "tiny" else name_or_path


def _lightning_cli():
    """Build the LightningCLI class lazily: importing Lightning is only paid by the commands that need it."""
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    from fff_lightning import console, runs, table
    from fff_lightning.adapters import resolve_adapters
    from fff_lightning.checkpoint_io import read_checkpoint
    from fff_lightning.data.datamodule import FFFDataModule
    from fff_lightning.distributed import RUN_NAME_ENV, check_strategy, check_strategy_name, launch_rank, processes
    from fff_lightning.module import FFFModule, check_checkpoint_adapters

    console.setup()

    class Parser(LightningArgumentParser):
        def error(self, message: str, ex: Exception | None = None):
            """One line and exit code 2 instead of the usage text and a nested explanation."""
            if not self.exit_on_error:
                return super().error(message, ex)
            print(f"error: {one_line(message)} (`{self.prog.replace(' [options]', '')} --help` lists options)",
                  file=sys.stderr)  # fmt: skip
            sys.exit(2)

    class FFFCLI(LightningCLI):
        def __init__(self, *args, **kwargs):
            self.argv = list(kwargs["args"]) if kwargs.get("args") is not None else sys.argv[1:]
            kwargs.setdefault("parser_class", Parser)
            kwargs.setdefault("seed_everything_default", False)  # the DeterministicSeed callback and the model's seed
            kwargs.setdefault("auto_configure_optimizers", False)
            # The data module shares the data out between processes itself (seeded, nothing repeated).
            kwargs.setdefault("trainer_defaults", {"use_distributed_sampler": False})
            kwargs.setdefault(
                "parser_kwargs", {"prog": PROG, **{c: {"prog": f"{PROG} {c}"} for c in LIGHTNING_COMMANDS}}
            )
            super().__init__(*args, **kwargs)

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument(
                "--experiment", default="default", help="logs go to <logs_dir>/<experiment>/<run_name>/"
            )
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
                help="with --ckpt_path: refuse (default) or allow a checkpoint whose adapters or data settings differ",
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
                ("model.base.max_seq_length", "model.max_new_tokens"), "data.max_prompt_tokens", compute_fn=_prompt_room
            )

        # -- where the run's files go --------------------------------------------------------------------------
        def before_instantiate_classes(self) -> None:
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            _resolve_config_paths(cfg)
            check_strategy_name(cfg.trainer.strategy)  # before the Trainer, the run folder or the model
            runs.check_name("experiment", cfg.experiment)
            if cfg.run_name is not None:
                runs.check_name("run_name", cfg.run_name)
            adapters = resolve_adapters(cfg.model.fff, cfg.model.lora, cfg.model.adapter_path)
            self.checkpoint = None
            if cfg.get("ckpt_path"):  # read (never run) and checked before any folder is claimed
                self.checkpoint = read_checkpoint(cfg.ckpt_path)
                check_checkpoint_adapters(self.checkpoint, adapters, cfg.get("resume_changes") == "allow")
            run = cfg.run_name or runs.run_name(adapters, None if self.subcommand in ("fit", None) else
                                                cfg.model.adapter_path)  # fmt: skip
            if self.subcommand == "fit":
                # Claimed now, atomically: two runs never share a folder; a named run's folder only when resuming.
                parent = Path(cfg.logs_dir) / cfg.experiment
                if launch_rank() == 0:
                    named = cfg.run_name is not None
                    run = runs.claim_named(parent, run, cfg.ckpt_path) if named else runs.claim(parent, run)
                    os.environ[RUN_NAME_ENV] = run  # for the processes Lightning's launcher starts for the others
                else:  # only the first process writes; trainer.log_dir hands its folder to every process
                    run = os.environ.get(RUN_NAME_ENV, run)
                if cfg.trainer.logger in (None, True):
                    from jsonargparse import Namespace

                    cfg.trainer.logger = Namespace(
                        class_path="lightning.pytorch.loggers.TensorBoardLogger",
                        init_args=Namespace(
                            save_dir=cfg.logs_dir, name=cfg.experiment, version=run, default_hp_metric=False
                        ),
                    )
                elif cfg.trainer.logger is False and cfg.trainer.get("default_root_dir") is None:
                    # No logger: the run folder is the root, so its checkpoints, adapters and config still go
                    # there, not into the working directory where two such runs would overwrite each other.
                    cfg.trainer.default_root_dir = str(parent / run)
            elif self.subcommand is not None:
                if not (cfg.model.adapter_path or cfg.get("ckpt_path") or cfg.allow_untrained):
                    raise ConfigError(
                        "model.adapter_path",
                        f"{self.subcommand} needs trained adapters: give --model.adapter_path <run>/adapter or "
                        "--ckpt_path <checkpoint> (--allow_untrained true uses freshly initialised ones)",
                    )
                cfg.trainer.logger = False
                self.save_config_callback = None  # only fit records its config (in its run folder)
                if "verbose" in cfg:
                    cfg.verbose = False  # our table replaces Lightning's one-per-dataloader metric tables
            self.run = run
            self.run_dir = runs.output_dir(
                self.subcommand or "fit",
                cfg.logs_dir,
                cfg.experiment,
                run,
                cfg.model.adapter_path,
                cfg.get("ckpt_path"),
                cfg.get("out_dir"),
            )
            if self.subcommand not in ("fit", None):  # its results must have somewhere to go: known before the work
                runs.writable(self.run_dir, "out_dir")

        def instantiate_classes(self) -> None:
            super().instantiate_classes()
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            allow = cfg.get("resume_changes") == "allow"
            self.model.allow_resume_changes = self.datamodule.allow_resume_changes = allow
            if self.trainer is not None:
                from lightning.pytorch.plugins.io import TorchCheckpointIO

                from fff_lightning.callbacks import GracefulInterrupt
                from fff_lightning.checkpoint_io import AtomicCheckpointIO

                if type(self.trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not one the user chose
                    self.trainer.strategy.checkpoint_io = AtomicCheckpointIO()
                if not any(isinstance(c, GracefulInterrupt) for c in self.trainer.callbacks):
                    self.trainer.callbacks.append(GracefulInterrupt())
                for c in self.trainer.callbacks:
                    if isinstance(c, GracefulInterrupt):
                        c.argv = self.argv  # for the resume command it prints
                        ARMED.append(c)
                        c.arm()  # from here on, before any data is read: a signal never leaves a traceback

        # -- checks before anything loads, and reports after ---------------------------------------------------
        def before_fit(self) -> None:
            try:
                if self.checkpoint is not None:  # a checkpoint of other data is refused before anything loads
                    state = self.checkpoint.get(type(self.datamodule).__qualname__, {})
                    self.datamodule.check_resume(state, processes(self.trainer))
                    self.checkpoint = None  # Lightning reads it again, memory-mapped: keep no second copy
                check_strategy(self.trainer)
                if self.trainer.is_global_zero:  # before anything is logged: a full disk fails at its first write
                    runs.check_space(Path(self.run_dir), self.model.checkpoint_bytes() + (64 << 20), "a checkpoint")
                self.model.preflight(self.trainer, "fit")
            except BaseException:
                for logger in self.trainer.loggers:  # close event files before the unused run folder goes
                    logger.finalize("failed")
                raise

        def before_validate(self) -> None:
            check_strategy(self.trainer)  # before the data or the model loads
            self.model.preflight(self.trainer, self.subcommand)

        before_test = before_predict = before_validate

        def _parse_ckpt_path(self) -> None:
            """LightningCLI would replace the command line's model options with the checkpoint's; here the run's
            options stand, and ``before_fit`` refuses a checkpoint that does not match them."""

        def _report(self, what: str) -> None:
            results = getattr(self.model, "last_results", None)
            if results and self.trainer.is_global_zero:
                table.report(self.run_dir, results, self.datamodule.seen_in_training, self.run, what)
                if not all(r.get("finite", True) for r in results):
                    raise Diverged(f"{what}: a dataset's loss is not finite; the table in {self.run_dir} says which")

        def after_fit(self) -> None:
            step = self.trainer.global_step
            at = getattr(self.model, "last_results_step", step)
            run = Path(self.run_dir)
            final = "python -m fff_lightning validate " + shlex.join(
                ["--config", str(run / "config.yaml"), "--model.adapter_path", str(run / "adapter")]
            )
            if getattr(self.model, "last_results", None) is None:
                if self.trainer.is_global_zero and self.model.val_names and self.trainer.limit_val_batches != 0:
                    start = getattr(self.model, "fit_start_step", 0)
                    since, which = (f"since resuming at step {start}", "next") if start else ("in this fit", "first")
                    print(f"no validation ran {since} (it stopped at step {step}, before the {which}); the final "
                          f"adapters' table: {final}")  # fmt: skip
            elif at != step:  # stopped (max_steps) after the last validation: the table is of earlier adapters
                self._report(f"last validation (step {at} of {step})")
                if self.trainer.is_global_zero:
                    print(f"the table is of the adapters at step {at}, not the final ones; theirs: {final}")
            else:
                self._report("validation after training")

        def after_validate(self) -> None:
            self._report("validation")

        def after_test(self) -> None:
            self._report("test")

        def after_predict(self) -> None:
            if not self.trainer.is_global_zero:
                return
            preds = [row for batch in (self.trainer.predict_loop.predictions or []) for row in batch]
            out = runs.write_predictions(self.run_dir, preds)
            for p in preds[:3]:
                print(f"### {p['prompt'][:80]}\n{p['answer'][:300]}\n")
            print(f"{len(preds)} answers written to {out}")

    return FFFCLI, FFFModule, FFFDataModule


def _prompt_room(max_seq_length: int, max_new_tokens: int) -> int:
    """How many tokens of a prompt fit beside its answer."""
    return max_seq_length - max_new_tokens


def _resolve_config_paths(cfg) -> None:
    """A run config names another by a path relative to itself (the budget guard's ``target``): make it absolute,
    looking next to each given config (the last first), then in the working directory."""
    dirs = [Path(str(p)).resolve().parent for p in reversed(cfg.get("config") or [])]
    for cb in cfg.trainer.get("callbacks") or []:
        args = getattr(cb, "init_args", None)
        target = args.get("target") if args is not None else None
        if isinstance(target, str) and not Path(target).is_absolute():
            found = next((d / target for d in dirs if (d / target).is_file()), None)
            args.target = str(found) if found else target


def describe_run(*configs: str | Path, overrides: list[str] | None = None):
    """Parse run configs (later ones override earlier ones) and ``--model.*``-style overrides with the parser
    ``fit`` uses, and build the module (its adapters and base model, no weights) and the data module (no data).

    ``budget`` and the budget guard's ``target`` read runs through here, and every YAML in ``configs/`` goes
    through it in the tests, so configs cannot drift from the code.

    Returns:
        an object whose ``.model`` is the :class:`~fff_lightning.module.FFFModule` and ``.datamodule`` the
        :class:`~fff_lightning.data.datamodule.FFFDataModule`.
    """
    cli_cls, module_cls, dm_cls = _lightning_cli()

    class Describe(cli_cls):
        def instantiate_trainer(self, **kwargs):  # a GPU config must parse on a CPU machine too
            return None

        def before_instantiate_classes(self) -> None:
            _resolve_config_paths(self.config)

    args = [a for p in configs for a in ("--config", str(p))] + list(overrides or [])
    from unittest import mock

    with mock.patch.object(sys, "argv", sys.argv[:1]):  # the configs come from `args`, not this process's argv
        return Describe(module_cls, dm_cls, args=args, run=False, parser_kwargs={"prog": PROG})


#: Signal handlers the running command installed; given back when it returns (in-process runs leave none behind).
ARMED: list = []


def run_lightning(argv: list[str] | None):
    """Run a Lightning subcommand (``None``: from ``sys.argv``); returns the CLI object for tests to read."""
    from fff_lightning.loading import preimport_unsloth

    if not any(a in ("-h", "--help") for a in (sys.argv[1:] if argv is None else argv)):
        preimport_unsloth()  # Unsloth must patch transformers before anything imports it
    cli_cls, module_cls, dm_cls = _lightning_cli()
    try:
        return cli_cls(module_cls, dm_cls, args=argv, save_config_kwargs={"overwrite": True})
    finally:
        while ARMED:
            ARMED.pop().disarm()
        from fff_lightning import runs

        runs.unlock_all()  # the command is over (main removes a folder it left unused)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print(USAGE)
            return
        command, rest = argv[0], argv[1:]
        if command == "budget":
            from fff_lightning import budget_cli

            budget_cli.main(rest)
        elif command in ("sweep", "report"):
            import importlib

            importlib.import_module(f"fff_lightning.{command}").main(rest)
        elif command == "bench":
            from fff_lightning.loading import preimport_unsloth

            if not any(a in ("-h", "--help") for a in rest):
                preimport_unsloth()  # before fff_lightning.bench imports Lightning, which imports transformers
            from fff_lightning import bench

            bench.main(rest)
        elif command in LIGHTNING_COMMANDS:
            run_lightning(None if argv == sys.argv[1:] else [command, *rest])
        else:
            print(f"error: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
            sys.exit(2)
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
        _fail("error: out of memory (the machine's RAM): lower the sizes of the run (data.batch_size, "
              "data.max_seq_length, the adapters) or free memory", 1)  # fmt: skip
    except OSError as e:
        import errno

        from fff_lightning.files import DiskFullError

        if isinstance(e, DiskFullError):
            _fail(f"error: {e}", 1, release=False)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" while writing {e.filename}" if e.filename else ""
            _fail(f"error: no space left on the device{where}: free some space, or write to another disk "
                  "(--logs_dir, FFF_CACHE)", 1)  # fmt: skip
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
