"""``python -m fff_lightning evaluate``: score a finetune on tasks through EleutherAI's lm-evaluation-harness.

The model is the run's own, in memory: the base model (4-bit or not, any backend) with its FFF and LoRA adapters as
``fit`` builds it, neither merged nor written anywhere, handed to lm-eval's ``HFLM``. Without
``--model.adapter_path`` the base model alone is scored (a "before" reference; give ``--out_dir``).

Tasks: the shipped local ones (no hub needed; ``--tasks list`` shows them) or any of lm-eval's by name. Offline,
lm-eval's own tasks read their datasets from the Hugging Face cache; one that is not there is refused in one line
naming what to fetch, before the model loads.

Results go beside the run's validation table: ``<run>/eval/<task>.json`` (the metrics, with what was run) and
``<run>/eval/<task>.samples.jsonl`` (one line per item: what ``report`` pairs between arms). Each file appears whole
or not at all: an interrupted or failed evaluation leaves the run as it was.

  python -m fff_lightning evaluate --config logs/quickstart/<run>/config.yaml \\
      --model.adapter_path logs/quickstart/<run>/adapter --tasks fff_math,fff_math_bpb --limit 50
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from fff_lightning.errors import ConfigError
from fff_lightning.inference import base_name

_MATH = Path(__file__).parent / "data" / "samples" / "real" / "math" / "validation.jsonl"
#: Per-item metrics ``report`` can pair between arms, as (numerator, denominator) of a ratio of sums: a mean of
#: 0/1 scores, or bits per byte from lm-eval's (log-likelihood, bytes) pairs.
PAIRABLE = ("exact_match", "acc", "bits_per_byte")


def local_tasks() -> dict[str, dict]:
    """The shipped tasks: lm-eval task configs over the bundled real data's held-out math problems (GSM8K-style rows
    from MetaMathQA: ``query``, and a ``response`` that ends in ``#### <answer>``)."""
    data = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(_MATH)}}, "test_split": "test"}
    return {
        "fff_math": {  # GSM8K-style: generate, take the last number, exact match against the answer after ####
            "task": "fff_math", **data,
            "output_type": "generate_until",
            "doc_to_text": "Question: {{query}}\nAnswer:",
            "doc_to_target": "{{response.split('#### ')[-1]}}",
            "generation_kwargs": {"until": ["Question:"], "do_sample": False},  # and the EOS, lm-eval's own
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                             "regexes_to_ignore": [",", "\\$", "\\.$"]}],
            "filter_list": [{"name": "last-number", "filter": [
                {"function": "regex", "group_select": -1, "regex_pattern": "(-?[$0-9.,]*[0-9])"},
                {"function": "take_first"}]}],
            "metadata": {"version": 1.0, "about": "exact match of the last number generated (greedy)"},
        },
        "fff_math_greedy": {  # log-likelihood: is the reference answer the model's greedy continuation?
            "task": "fff_math_greedy", **data,
            "output_type": "loglikelihood",
            "doc_to_text": "Question: {{query}}\nAnswer:",
            "doc_to_target": " {{response.split('#### ')[-1]}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0, "about": "whether the answer is the greedy continuation of the question"},
        },
        "fff_math_bpb": {  # how well the model predicts whole worked solutions: bits per byte, lower is better
            "task": "fff_math_bpb", **data,
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "Question: {{query}}\nAnswer: {{response}}",
            "metric_list": [{"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False}],
            "metadata": {"version": 1.0, "about": "bits per byte of each problem with its worked solution"},
        },
    }  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fff_lightning evaluate", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any option of `fit` for the model or the data overrides the config: "
                                "--model.adapter_path <run>/adapter (the adapters to score), "
                                "--model.base.name_or_path ..., --model.base.max_seq_length ...")  # fmt: skip
    p.add_argument("--config", "-c", action="append", help="run config(s), or a run's saved config.yaml")
    p.add_argument("--tasks", required=True, help="comma-separated task names: shipped (fff_math, fff_math_greedy, "
                   "fff_math_bpb) or lm-eval's (gsm8k, hellaswag, ...); 'list' shows the shipped ones")  # fmt: skip
    p.add_argument("--limit", type=float, help="items per task (a whole number), or a fraction of each task")
    p.add_argument("--num_fewshot", type=int, help="few-shot examples per prompt (default: each task's own)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="for few-shot draws and any sampling (default 0)")
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="prompt through the tokenizer's chat template (default: when the run's data uses it)",
    )
    p.add_argument("--max_gen_toks", type=int, help="tokens generated at most per answer (default: "
                   "min(256, max_seq_length / 2))")  # fmt: skip
    p.add_argument("--out_dir", help="where the results go (default: <run>/eval, the adapter folder's run)")
    return p


def check_options(limit, batch_size, num_fewshot) -> None:
    """The values lm-eval takes: a whole number of items (1 or more) or a fraction in (0, 1); a batch of 1 or
    more; 0 or more few-shot examples."""
    if limit is not None and (limit <= 0 or (limit >= 1 and limit != int(limit))):
        raise ConfigError("--limit", f"a whole number of items (1 or more), or a fraction in (0, 1); got {limit}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError("--batch_size", f"must be at least 1; got {batch_size}")
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError("--num_fewshot", f"must be 0 or more; got {num_fewshot}")


def check_installed() -> None:
    """Refuse in one line when lm-evaluation-harness is not installed (found, not imported: a sweep checks its grid
    with this before anything runs)."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("evaluate", "needs lm-evaluation-harness: pip install 'fff_lightning[eval]'")


def _task_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ConfigError("--tasks", "give one or more task names, e.g. --tasks fff_math,fff_math_bpb")
    if len(set(names)) != len(names):
        raise ConfigError("--tasks", f"a task is named twice: {text}")
    return names


def check_tasks(names: list[str], shipped: dict) -> object | None:
    """Refuse, before the model loads, a task lm-eval does not know (naming close ones) and, offline, one whose
    dataset is not in the Hugging Face cache (naming what to fetch). Returns lm-eval's task index (``None`` when
    only shipped tasks are asked for: indexing lm-eval's ~15,000 tasks takes seconds)."""
    others = [n for n in names if n not in shipped]
    if not others:
        return None
    tm = _task_manager()
    for name in others:
        if name not in tm.all_tasks:
            import difflib

            close = difflib.get_close_matches(name, [*shipped, *tm.all_tasks], n=4, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else "; `lm_eval ls tasks` lists lm-eval's tasks"
            raise ConfigError("--tasks", f"no task {name!r} (shipped: {', '.join(shipped)}){hint}")
    from fff_lightning.files import offline

    if offline() or offline("HF_DATASETS_OFFLINE"):
        missing = sorted({d for n in others for d in _datasets_of(tm, n) if not _cached(*d)})
        if missing:
            fetch = "; ".join(f"load_dataset({p!r}{f', {c!r}' if c else ''})" for p, c in missing[:3])
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise ConfigError(
                "--tasks",
                f"{', '.join(others)} read{'s' if len(others) == 1 else ''} {len(missing)} dataset(s) from the "
                f"Hugging Face hub that are not in its cache and the hub is offline (HF_HUB_OFFLINE/HF_DATASETS_"
                f'OFFLINE): fetch them once where the hub can be reached (python -c "from datasets import '
                f'load_dataset; {fetch}"{more}), or use the shipped tasks',
            )
    return tm


_TASKS = None


def _task_manager():
    """lm-eval's index of its own tasks, made once per process (it reads ~15,000 task files: seconds)."""
    global _TASKS
    if _TASKS is None:
        from lm_eval.tasks import TaskManager

        _TASKS = TaskManager()
    return _TASKS


def _datasets_of(tm, name: str, depth: int = 0) -> list[tuple[str, str | None]]:
    """The (dataset_path, dataset_name) pairs a task or group of lm-eval reads from the hub."""
    entry = tm.task_index.get(name)
    if entry is None or depth > 8:
        return []
    cfg = entry.cfg or {}
    if isinstance(cfg.get("task"), list):  # a group: its tasks
        out = []
        for sub in cfg["task"]:
            out += _datasets_of(tm, sub if isinstance(sub, str) else sub.get("task", ""), depth + 1)
        return out
    if cfg.get("include") and "dataset_path" not in cfg:  # the dataset is in the included file: load it whole
        try:
            cfg = tm._load_spec(name) if hasattr(tm, "_load_spec") else cfg
        except Exception:  # noqa: BLE001 -- lm-eval's internals; the evaluation itself reports what is missing
            return []
    path = cfg.get("dataset_path") if isinstance(cfg, dict) else None
    if not path or path in ("json", "csv", "parquet", "text") or os.path.exists(path):
        return []
    return [(path, cfg.get("dataset_name"))]


def _cached(path: str, name: str | None) -> bool:
    """Whether ``datasets`` finds a hub dataset in its cache with the hub offline."""
    import datasets

    try:
        datasets.load_dataset_builder(path, name)
        return True
    except Exception:  # noqa: BLE001 -- every way of "not there" (ConnectionError, FileNotFoundError, ValueError...)
        return False


def _pairable(item: dict) -> dict[str, list[float]]:
    """One item's metrics as [numerator, denominator] of a ratio of sums (see :data:`PAIRABLE`)."""
    out = {}
    for m in item.get("metrics", []):
        v = item.get(m)
        if m in ("exact_match", "acc") and isinstance(v, int | float):
            out[m] = [float(v), 1.0]
        elif m == "bits_per_byte" and isinstance(v, list | tuple) and len(v) == 2:
            ll, n = v
            out[m] = [-float(ll) / math.log(2), float(n)]
    return out


def metric_key(metric: str, filt: str | None) -> str:
    """``exact_match,last-number`` (lm-eval's key of a metric after a filter), ``acc`` (no filter)."""
    return metric if filt in (None, "none") else f"{metric},{filt}"


def _values(result: dict) -> dict[str, float]:
    """A task's aggregate metrics from lm-eval's result (``{"acc,none": .., "acc_stderr,none": ..}``) as
    ``{"acc": ..}``; stderrs apart (``stderr=True``)."""
    out = {}
    for k, v in result.items():
        if "," in k and "_stderr" not in k and isinstance(v, int | float) and not isinstance(v, bool):
            out[metric_key(*k.split(",", 1))] = float(v)
    return out


def _stderrs(result: dict) -> dict[str, float]:
    out = {}
    for k, v in result.items():
        if "_stderr," in k and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            metric, filt = k.split(",", 1)
            out[metric_key(metric.replace("_stderr", ""), filt)] = float(v)
    return out


def write_task(out: Path, task: str, result: dict, items: list[dict], about: dict) -> Path:
    """``<out>/<task>.json`` and ``<out>/<task>.samples.jsonl``, each whole or not at all (samples first: a
    results file always has its samples)."""
    from fff_lightning.files import write_text

    lines = []
    for item in items:
        filt = item.get("filter", "none")
        rec = {"doc_id": item.get("doc_id"), "filter": filt, "target": item.get("target"),
               "response": _first(item.get("filtered_resps")), "metrics": _pairable(item)}  # fmt: skip
        lines.append(json.dumps(rec, default=str, ensure_ascii=False))
    (out / f"{task}.json").unlink(missing_ok=True)  # old results never sit beside new items
    write_text(out / f"{task}.samples.jsonl", "".join(line + "\n" for line in lines))
    doc = {"task": task, "metrics": _values(result), "stderr": _stderrs(result),
           "items": len({(i.get("doc_id")) for i in items}), **about}  # fmt: skip
    return write_text(out / f"{task}.json", json.dumps(doc, indent=2, default=str) + "\n")


def _first(x):
    while isinstance(x, list | tuple) and x:
        x = x[0]
    return x


def read_task_results(run: Path) -> dict[str, dict]:
    """A run's evaluations (``<run>/eval/*.json``) with their per-item metrics: ``{task: {"metrics": {...},
    "higher_is_better": {...}, "items": {metric: {(doc_id, filter): [num, den]}}}}``; unreadable files are left
    out (report says which)."""
    out: dict[str, dict] = {}
    folder = Path(run) / "eval"
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
            items: dict[str, dict] = {}
            with open(path.with_suffix(".samples.jsonl")) as f:
                for line in f:
                    rec = json.loads(line)
                    for m, nd in rec.get("metrics", {}).items():
                        items.setdefault(metric_key(m, rec.get("filter")), {})[str(rec["doc_id"])] = nd
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            continue
        if isinstance(doc, dict) and isinstance(doc.get("metrics"), dict):
            out[str(doc.get("task", path.stem))] = {**doc, "items": items}
    return out


def _check_writable(out: Path) -> None:
    """Refuse, before the model loads, a results folder that cannot be written; create nothing (an evaluation that
    fails leaves no empty folder in the run)."""
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError("--out_dir", f"cannot write results into {out} ({probe} is not a writable folder)")


def main(argv: list[str]) -> None:
    args, overrides = parser().parse_known_args(argv)
    shipped = local_tasks()
    if args.tasks == "list":
        for name, t in shipped.items():
            print(f"{name:<16} {t['output_type']:<22} {t['metadata']['about']}")
        print("and lm-eval's own tasks by name (`lm_eval ls tasks`); offline, from the Hugging Face cache")
        return
    if not args.config:
        raise ConfigError("--config", "give the run's config (its saved <run>/config.yaml, or the configs it ran)")
    check_options(args.limit, args.batch_size, args.num_fewshot)
    names = _task_list(args.tasks)
    check_installed()
    import lm_eval
    import lm_eval.evaluator
    import lm_eval.models.huggingface  # noqa: F401

    from fff_lightning import __version__
    from fff_lightning.inference import describe, model_of

    tm = check_tasks(names, shipped)
    described = describe(args.config, overrides)
    module = described.model
    adapter = module.adapter_path
    if adapter is None and not args.out_dir:
        raise ConfigError(
            "--out_dir", "scoring the base model alone (no --model.adapter_path): say where its results go"
        )
    out = Path(args.out_dir) if args.out_dir else Path(adapter).resolve().parent / "eval"
    _check_writable(out)
    max_len = module.base.max_seq_length
    # lm-eval keeps the prompt's last max_length - gen tokens
    gen = min(256, max_len // 2) if args.max_gen_toks is None else args.max_gen_toks
    if not 0 < gen < max_len:
        raise ConfigError("--max_gen_toks", f"must be at least 1 and below max_seq_length ({max_len}); got {gen}")
    if tm is None:
        from lm_eval.tasks import TaskManager

        tm = TaskManager(include_defaults=False)  # the shipped tasks alone need no index of lm-eval's
    # lm-eval records the git commit of the working directory, printing git's "fatal: not a git repository"
    # outside one; what scored the run is this package's version.
    lm_eval.evaluator.get_git_commit_hash = lambda: f"fff_lightning {__version__}"

    from fff_lightning import console

    console.quiet_lm_eval()
    model, tokenizer = model_of(module, adapter is not None)
    tasks = []
    for n in names:
        t = json.loads(json.dumps(shipped[n])) if n in shipped else n
        if isinstance(t, dict) and "generation_kwargs" in t:
            t["generation_kwargs"]["max_gen_toks"] = gen
        tasks.append(t)
    chat = args.chat if args.chat is not None else described.datamodule.opts.style == "chat_template"
    if chat and described.datamodule.opts.chat_template:  # the template the run's data was written with
        tokenizer.chat_template = described.datamodule.opts.chat_template
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("--chat", "the tokenizer has no chat template: evaluate with --no-chat")
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    device = str(next(model.parameters()).device)
    lm = _timed_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, device=device,
                    max_length=max_len, max_gen_toks=gen)  # fmt: skip
    started = time.perf_counter()
    try:
        res = _score(lm_eval, lm, tasks, limit, args, chat, tm)
    except KeyboardInterrupt:
        import signal

        from fff_lightning.errors import Interrupted

        raise Interrupted(f"interrupted by SIGINT while evaluating: nothing written to {out}", signal.SIGINT) from None
    seconds = time.perf_counter() - started
    about = {"adapter": str(Path(adapter).resolve()) if adapter else None,
             "base": base_name(module), "limit": limit,
             "num_fewshot": args.num_fewshot, "chat": chat, "seed": args.seed, "batch_size": args.batch_size,
             "max_gen_toks": gen, "max_length": max_len, "lm_eval": getattr(lm_eval, "__version__", None),
             "fff_lightning": __version__, "seconds": round(seconds, 1),
             "higher_is_better": None}  # fmt: skip
    written = []
    for task, result in res["results"].items():
        about["higher_is_better"] = res.get("higher_is_better", {}).get(task)
        written.append(write_task(out, task, result, res.get("samples", {}).get(task, []), dict(about)))
    _print(res, lm, seconds)
    print(f"results written to {out} ({', '.join(p.name for p in written)}, with per-item .samples.jsonl)")


def _score(lm_eval, lm, tasks: list, limit, args, chat: bool, tm) -> dict:
    """lm-eval's ``simple_evaluate`` with evaluate's options; a dataset neither cached nor reachable is one line."""
    seed = args.seed
    try:
        seeds = dict(random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            limit=limit,
            num_fewshot=args.num_fewshot,
            log_samples=True,
            apply_chat_template=chat,
            task_manager=tm,
            **seeds,
        )
    except ConnectionError as e:  # a task's dataset, neither cached nor reachable
        raise ConfigError("--tasks", f"{e}: fetch it once where the Hugging Face hub can be reached (it is then "
                          "read from the cache), or use the shipped tasks") from None  # fmt: skip


def _print(res: dict, lm, seconds: float) -> None:
    for task, result in res["results"].items():
        n = res.get("n-samples", {}).get(task, {}).get("effective")
        parts, errs = [], _stderrs(result)
        for k, v in _values(result).items():
            parts.append(f"{k} {v:.4f}" + (f" ± {errs[k]:.4f} (stderr over items)" if k in errs else ""))
        print(f"{task}{f' ({n} items)' if n else ''}: " + "; ".join(parts))
    line = f"evaluated in {seconds:.1f}s"
    if lm.gen_tokens:
        line += (f"; generation: {lm.gen_tokens:,} tokens in {lm.gen_seconds:.1f}s = "
                 f"{lm.gen_tokens / lm.gen_seconds:,.0f} tokens/s (batch {lm.batch_size})")  # fmt: skip
    print(line)


def _timed_hflm():
    from lm_eval.models.huggingface import HFLM

    class TimedHFLM(HFLM):
        """lm-eval's ``HFLM`` on a model in memory, timing its generation (tokens computed, padding included)."""

        gen_tokens = 0
        gen_seconds = 0.0

        def _model_generate(self, context, max_length, stop, **kwargs):
            import torch

            started = time.perf_counter()
            out = super()._model_generate(context, max_length, stop, **kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.gen_seconds += time.perf_counter() - started
            self.gen_tokens += (out.shape[1] - context.shape[1]) * out.shape[0]
            return out

    return TimedHFLM


if __name__ == "__main__":
    main(sys.argv[1:])
