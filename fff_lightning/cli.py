"""Command line: ``python -m fff_lightning <command>``. This file only wires; logic lives in the modules.

``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI subcommands over :class:`FFFModule` and
:class:`FFFDataModule`; ``budget`` is this project's own and loads no Lightning.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fff_lightning.errors import ConfigError

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
USAGE = """\
usage: python -m fff_lightning <command> [options]

commands:
  fit        train adapters:               fit --config configs/quickstart.yaml
  validate   per-dataset loss table:       validate --config <run.yaml> --model.adapter_path <run>/adapter
  test       like validate, on the test loaders
  predict    answer prompts from a file:   predict --config <run.yaml> --model.adapter_path <dir>
                                           --data.predict_file prompts.jsonl
  budget     trainable parameters of a run config, and --match for a fair comparison
  bench      tokens/s and peak memory of fit against bare Unsloth/PEFT loops (GPU; a smoke test on CPU)

`python -m fff_lightning <command> --help` lists a command's options.
"""


def tokenizer_for(backend: str, name_or_path: str, tokenizer: str | None) -> str | None:
    """The data module's tokenizer, linked from the model's base config."""
    if tokenizer:
        return tokenizer
    return None if backend == "tiny" else name_or_path


def _lightning_cli():
    """Build the LightningCLI class lazily: importing Lightning is only paid by the commands that need it."""
    from lightning.pytorch.cli import LightningCLI

    from fff_lightning.data.datamodule import FFFDataModule
    from fff_lightning.module import FFFModule

    class FFFCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument(
                "--experiment", default="default", help="logs go to <logs_dir>/<experiment>/<run_name>/"
            )
            parser.add_argument(
                "--run_name", default=None, help="default: the adapters' legend, e.g. lora-[128]-6-[gelu_new]-[up_proj]"
            )
            parser.add_argument("--logs_dir", default="logs", help="root folder of TensorBoard logs and checkpoints")
            parser.link_arguments(
                ("model.base.backend", "model.base.name_or_path", "model.base.tokenizer"),
                "data.tokenizer",
                compute_fn=tokenizer_for,
            )
            parser.link_arguments("model.base.max_seq_length", "data.max_seq_length")

        # -- logging folder ------------------------------------------------------------------------------------
        def before_instantiate_classes(self) -> None:
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            run = cfg.run_name or _legend(cfg.model)
            if self.subcommand in ("fit", None):
                if cfg.run_name is None:
                    run = _unique(Path(cfg.logs_dir) / cfg.experiment, run)
                if cfg.trainer.logger in (None, True):
                    from jsonargparse import Namespace

                    cfg.trainer.logger = Namespace(
                        class_path="lightning.pytorch.loggers.TensorBoardLogger",
                        init_args=Namespace(
                            save_dir=cfg.logs_dir, name=cfg.experiment, version=run, default_hp_metric=False
                        ),
                    )
            else:
                cfg.trainer.logger = False
                self.save_config_callback = None  # only fit records its config (in its run folder)
            self.run_dir = self._run_dir(cfg, run)
            self.run = run

        def _run_dir(self, cfg, run: str) -> Path:
            """Where tables and predictions go: the trained run's folder when we know it."""
            if self.subcommand == "fit":
                return Path(cfg.logs_dir) / cfg.experiment / run
            adapter = cfg.model.adapter_path
            ckpt = cfg.get("ckpt_path")
            if adapter:
                return Path(adapter).resolve().parent
            if ckpt:
                return Path(ckpt).resolve().parent.parent
            return Path(cfg.logs_dir) / cfg.experiment / f"{run}-{self.subcommand}"

        # -- reports -------------------------------------------------------------------------------------------
        def _report(self, what: str) -> None:
            results = getattr(self.model, "last_results", None)
            if not results or not self.trainer.is_global_zero:
                return
            seen = {r["dataset"]: r["seen_in_training"] for r in self.datamodule.summary}
            files = self.model.write_results(self.run_dir, results, seen, self.run)
            _print_table(f"{what}: {self.run}", results, seen)
            print(f"table written to {', '.join(str(f) for f in files)}")

        def after_fit(self) -> None:
            self._report("validation after training")

        def after_validate(self) -> None:
            self._report("validation")

        def after_test(self) -> None:
            self._report("test")

        def after_predict(self) -> None:
            import json

            if not self.trainer.is_global_zero:
                return
            preds = [row for batch in (self.trainer.predict_loop.predictions or []) for row in batch]
            self.run_dir.mkdir(parents=True, exist_ok=True)
            out = self.run_dir / "predictions.jsonl"
            out.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds))
            for p in preds[:3]:
                print(f"### {p['prompt'][:80]}\n{p['answer'][:300]}\n")
            print(f"{len(preds)} answers written to {out}")

    return FFFCLI, FFFModule, FFFDataModule


def check_config(*paths: str | Path, extra: list[str] | None = None) -> object:
    """Parse run configs (later ones override earlier ones) and build the model and data module (no weights, no
    data, no Trainer).

    Every YAML in ``configs/`` goes through this in the tests, so configs cannot drift from the code.
    """
    cli_cls, module_cls, dm_cls = _lightning_cli()

    class Check(cli_cls):
        def instantiate_trainer(self, **kwargs):  # a GPU config must parse on a CPU machine too
            return None

    args = [a for p in paths for a in ("--config", str(p))] + list(extra or [])
    return Check(module_cls, dm_cls, args=args, run=False, auto_configure_optimizers=False)


def _legend(model_cfg) -> str:
    from fff_lightning.fff import FFFConfig
    from fff_lightning.lora import LoRAConfig

    fff = _as_config(FFFConfig, model_cfg.get("fff"))
    lora = _as_config(LoRAConfig, model_cfg.get("lora"))
    if fff is not None:
        return f"{'lora' if lora is not None else 'fff'}-{fff.legend()}"
    if lora is not None:
        return f"lora-r{lora.rank}"
    return Path(model_cfg.get("adapter_path") or "adapter").parent.name or "adapter"


def _as_config(cls, value):
    if value is None or isinstance(value, cls):
        return value
    return cls(**(value.as_dict() if hasattr(value, "as_dict") else dict(value)))


def _unique(parent: Path, name: str) -> str:
    """``name``, or ``name-1``, ``name-2``... if a run of that name already exists."""
    if not (parent / name).exists():
        return name
    i = 1
    while (parent / f"{name}-{i}").exists():
        i += 1
    return f"{name}-{i}"


def _print_table(title: str, results: list[dict], seen: dict[str, bool]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title), title_justify="left")
    for col in ("dataset", "rows", "tokens", "mean loss", "perplexity", "seen in training"):
        table.add_column(col, justify="left" if col == "dataset" else "right")
    for r in results:
        mark = "[yellow]YES[/yellow]" if seen.get(r["dataset"]) else "no"
        table.add_row(r["dataset"], f"{r['rows']:,}", f"{r['tokens']:,}", f"{r['loss']:.4f}", f"{r['ppl']:.2f}", mark)
    Console().print(table)
    if any(seen.values()):
        print("YES: these validation rows were also training rows; their loss is not held-out.")


def run_lightning(argv: list[str] | None):
    """Run a Lightning subcommand (``None``: from ``sys.argv``); returns the CLI object for tests to read."""
    from fff_lightning.loading import preimport_unsloth

    if not any(a in ("-h", "--help") for a in (sys.argv[1:] if argv is None else argv)):
        preimport_unsloth()  # Unsloth must patch transformers before anything imports it
    cli_cls, module_cls, dm_cls = _lightning_cli()
    return cli_cls(
        module_cls,
        dm_cls,
        args=argv,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=False,  # seeding is the DeterministicSeed callback's and the model's own seed
        auto_configure_optimizers=False,
    )


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
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except ValueError as e:  # jsonargparse wraps errors raised while it instantiates configs
        cause = _config_error_in(e)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)


def _config_error_in(e: BaseException) -> str | None:
    """The message of the first ConfigError in an exception's chain (jsonargparse wraps them), or None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ConfigError):
            return str(e)
        e = e.__cause__ or e.__context__
    return None
