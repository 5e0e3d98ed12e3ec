"""``fit``, ``validate``, ``test`` and ``predict``: what a run does around Lightning's own loops.

Before anything loads: the checkpoint is read (never run) and checked, the run folder is opened once
(:class:`~fff_lightning.runs.RunFolder`), the signals are taken; after: the per-dataset table, the closing lines,
the predictions file. :func:`run_lightning` is the entry point (``python -m fff_lightning fit ...`` calls it).
"""

from __future__ import annotations

import os
import shlex
import sys

from lightning.pytorch.plugins.io import TorchCheckpointIO

from fff_lightning import console, kinds, runs, table
from fff_lightning.adapters import resolve_adapters
from fff_lightning.callbacks import GracefulInterrupt
from fff_lightning.checkpoint_io import AtomicCheckpointIO, read_checkpoint
from fff_lightning.distributed import (
    RANK_VARIABLES,
    RUN_NAME_ENV,
    check_strategy_name,
    launch_rank,
    processes,
    stray_rank,
)
from fff_lightning.errors import ConfigError, Diverged
from fff_lightning.module import check_checkpoint_adapters, check_checkpoint_run
from fff_lightning.plan import plan_run, planned
from fff_lightning.run_config import RunCLI, resolve_config_paths
from fff_lightning.spec import BaseModelConfig

#: Signal handlers the running command installed; given back when it returns (in-process runs leave none behind).
ARMED: list[GracefulInterrupt] = []


class FFFCLI(RunCLI):
    # -- the checkpoint: read (never run) and checked first --------------------------------------------------
    def parse_arguments(self, parser, args) -> None:
        """Parse, then read and check ``--ckpt_path`` before anything else sees it. LightningCLI would next load
        the checkpoint once more and put its saved options in place of the command line's; here the run's options
        stand (``before_fit`` refuses a checkpoint that does not match them), so the path is held back from it
        until :meth:`before_instantiate_classes`."""
        super().parse_arguments(parser, args)
        cfg = self.config[self.config.subcommand]
        self.ckpt_path, self.checkpoint = cfg.get("ckpt_path"), None
        if self.ckpt_path:
            self.checkpoint = read_checkpoint(self.ckpt_path)
            cfg.ckpt_path = None

    # -- where the run's files go --------------------------------------------------------------------------
    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand]
        if self.ckpt_path:
            cfg.ckpt_path = self.ckpt_path
        resolve_config_paths(cfg)
        check_strategy_name(cfg.trainer.strategy)  # before the Trainer, the run folder or the model
        sections = {k: cfg.model.get(k) for k in kinds.names()}
        adapters = resolve_adapters(adapter_path=cfg.model.adapter_path, **sections)
        base = cfg.model.base
        # The run resolved and checked once, before any class exists; the module takes it (instantiate_classes).
        self.plan = plan_run(BaseModelConfig(**(base.as_dict() if hasattr(base, "as_dict") else dict(base))),
                             adapters, cfg.model.adapter_path)  # fmt: skip
        if self.checkpoint is not None:  # before any folder is claimed
            allow = cfg.get("resume_changes") == "allow"
            check_checkpoint_adapters(self.checkpoint, adapters, allow)
            note = check_checkpoint_run(self.checkpoint, self.plan, cfg.trainer, allow, self.subcommand == "fit")
            if note:
                print(f"note: resuming with changes (--resume_changes allow): {note}", file=sys.stderr)
        if self.subcommand != "fit" and not (cfg.model.adapter_path or cfg.get("ckpt_path") or cfg.allow_untrained):
            raise ConfigError(
                "model.adapter_path",
                f"{self.subcommand} needs trained adapters: give --model.adapter_path <run>/adapter or "
                "--ckpt_path <checkpoint> (--allow_untrained true uses freshly initialised ones)",
            )
        stray = stray_rank(cfg.trainer)
        if stray:  # one process: it is the first, whatever a scheduler or a shell left in the environment
            print(f"note: {stray} in the environment is ignored: this run has one process", file=sys.stderr)
            for name in (*RANK_VARIABLES, "WORLD_SIZE"):
                os.environ.pop(name, None)  # Lightning reads them too
            from lightning.fabric.utilities.rank_zero import rank_zero_only

            rank_zero_only.rank = 0  # read from the environment when Lightning was imported
        first = launch_rank() == 0  # only the first process claims; the others learn its name from the launcher
        self.folder = runs.RunFolder.open(
            self.subcommand,
            logs_dir=cfg.logs_dir,
            experiment=cfg.experiment,
            run_name=cfg.run_name,
            adapters=adapters,
            adapter_path=cfg.model.adapter_path,
            ckpt_path=cfg.get("ckpt_path"),
            out_dir=cfg.get("out_dir"),
            first_process=first,
            shared_name=os.environ.get(RUN_NAME_ENV),
        )
        self.plan = self.plan.in_folder(self.folder.path)
        if self.subcommand == "fit":
            if first:
                os.environ[RUN_NAME_ENV] = self.folder.name  # for the processes Lightning's launcher starts
            if cfg.trainer.logger is not False:
                # The run folder's TensorBoard logger, then any logger of one's own (CSVLogger, MLFlowLogger,
                # WandbLogger...) beside it: Lightning takes the first logger's folder for trainer.log_dir (where
                # config.yaml is saved) and for ModelCheckpoint's default dirpath, so the checkpoints, config,
                # adapters and table stay in <logs_dir>/<experiment>/<run>/ and the printed `validate` finds them.
                cfg.trainer.logger = self.folder.logger(cfg.trainer.logger)
            elif cfg.trainer.get("default_root_dir") is None:
                # No logger: the run folder is the root, so its checkpoints, adapters and config still go
                # there, not into the working directory where two such runs would overwrite each other.
                cfg.trainer.default_root_dir = str(self.folder.path)
        else:
            cfg.trainer.logger = False
            self.save_config_callback = None  # only fit records its config (in its run folder)
            if "verbose" in cfg:
                cfg.verbose = False  # our table replaces Lightning's one-per-dataloader metric tables

    def instantiate_classes(self) -> None:
        with planned(self.plan):
            super().instantiate_classes()
        cfg = self.config[self.subcommand]
        allow = cfg.get("resume_changes") == "allow"
        self.model.allow_resume_changes = self.datamodule.allow_resume_changes = allow
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
            if self.trainer.is_global_zero:  # before anything is logged: a full disk fails at its first write
                need = self.model.checkpoint_bytes() + (64 << 20)  # (in a TensorBoard writer's thread)
                runs.check_space(self.folder.path, need, "a checkpoint")
            self.model.preflight(self.trainer, "fit")  # the budget guard logs the budget
        except BaseException:
            for logger in self.trainer.loggers:  # close event files before the unused run folder goes
                logger.finalize("failed")
            raise

    def before_validate(self) -> None:
        self.model.preflight(self.trainer, self.subcommand)  # before the data or the model loads

    before_test = before_predict = before_validate

    def _report(self, what: str) -> None:
        results = self.model.last_results
        if results and self.subcommand == "fit":
            results = table.with_before(results, self.model.first_results)
        if results and self.trainer.is_global_zero:
            table.report(self.folder.path, results, self.datamodule.seen_in_training, self.folder.name, what)
            if self.model.last_samples:
                print(f"per-sample losses written to {table.write_samples(self.folder.path, self.model.last_samples)}")
            if not all(r.get("finite", True) for r in results):
                raise Diverged(f"{what}: a dataset's loss is not finite; the table in {self.folder.path} says which")

    def after_fit(self) -> None:
        step = self.trainer.global_step
        at = self.model.last_results_step
        run = self.folder.path
        final = "python -m fff_lightning validate " + shlex.join(
            ["--config", str(run / "config.yaml"), "--model.adapter_path", str(run / "adapter")]
        )
        if self.model.last_results is None:
            if self.trainer.is_global_zero and self.model.val_names and self.trainer.limit_val_batches != 0:
                start = self.model.fit_start_step
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
        out = runs.write_predictions(self.folder.path, preds)
        for p in preds[:3]:
            print(f"### {p['prompt'][:80]}\n{p['answer'][:300]}\n")
        print(f"{len(preds)} answers written to {out}")


def run_lightning(argv: list[str] | None = None) -> FFFCLI:
    """Run a Lightning subcommand (``None``: from ``sys.argv``); returns the CLI object for tests to read.
    (On a GPU machine, :func:`fff_lightning.backends.preimport_unsloth` must have run before this module was
    imported: ``python -m fff_lightning`` sees to it.)"""
    console.setup()
    try:
        return FFFCLI(argv, save_config_kwargs={"overwrite": True})
    finally:
        while ARMED:
            ARMED.pop().disarm()
        runs.unlock_all()  # the command is over (the CLI removes a folder it left unused)


def main(argv: list[str]) -> None:
    run_lightning(argv)
