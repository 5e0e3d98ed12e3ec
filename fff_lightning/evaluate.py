"""``python -m fff_lightning evaluate``: score a finetune on tasks through EleutherAI's lm-evaluation-harness.

WORK IN PROGRESS (issue 28, branch wip-28): the model is the run's own, in memory -- the base model (4-bit or not,
any backend) with its FFF/LoRA adapters as ``fit`` builds it, neither merged nor written anywhere -- handed to
lm-eval's ``HFLM``. Shipped local tasks over the bundled real data work with no hub at all.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from fff_lightning.errors import ConfigError

#: The sections of a run's saved config.yaml that ``evaluate`` reads (the rest is ``fit``'s: trainer, ckpt_path...).
_READ = ("model", "data")


def local_tasks() -> dict[str, dict]:
    """The shipped tasks (lm-eval task configs over the bundled real data's held-out rows)."""
    math = str(Path(__file__).parent / "data" / "samples" / "real" / "math" / "validation.jsonl")
    return {
        "fff_math": {  # GSM8K-style: generate, take the last number, exact match against the answer after ####
            "task": "fff_math",
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": math}},
            "test_split": "test",
            "output_type": "generate_until",
            "doc_to_text": "Question: {{query}}\nAnswer:",
            "doc_to_target": "{{response.split('#### ')[-1]}}",
            "generation_kwargs": {"until": ["Question:"], "do_sample": False},  # and the EOS, lm-eval's own
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                             "regexes_to_ignore": [",", "\\$", "\\.$"]}],
            "filter_list": [{"name": "last-number", "filter": [
                {"function": "regex", "group_select": -1, "regex_pattern": "(-?[$0-9.,]*[0-9])"},
                {"function": "take_first"}]}],
        },
        "fff_math_greedy": {  # log-likelihood: is the reference solution the model's greedy continuation?
            "task": "fff_math_greedy",
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": math}},
            "test_split": "test",
            "output_type": "loglikelihood",
            "doc_to_text": "Question: {{query}}\nAnswer:",
            "doc_to_target": " {{response.split('#### ')[-1]}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        },
    }  # fmt: skip


def _run_config(path: str) -> str:
    """A run's saved config.yaml (it has a ``trainer`` section) with only the model and data sections (a temporary
    copy); other configs as given."""
    import yaml

    p = Path(path)
    if not p.is_file():
        return path
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict) or "ckpt_path" not in data:  # not a saved run config
        return path
    data = {k: v for k, v in data.items() if k in _READ}
    fd, tmp = tempfile.mkstemp(suffix=".yaml", prefix="fff-eval-")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(data, f)
    return tmp


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fff_lightning evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--config", "-c", action="append", required=True, help="run config(s), or a run's config.yaml")
    p.add_argument("--tasks", required=True, help="comma-separated: shipped local tasks (fff_math, ...) or lm-eval's")
    p.add_argument("--limit", type=float, help="items per task (an int), or a fraction of each task")
    p.add_argument("--num_fewshot", type=int)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="prompt through the tokenizer's chat template (default: when the run's data uses one)")
    p.add_argument("--out_dir", help="where results.json and the per-item samples go (default: beside the adapter)")
    return p


def main(argv: list[str]) -> None:
    args, overrides = parser().parse_known_args(argv)
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise ConfigError("evaluate", "needs lm-evaluation-harness: pip install 'fff_lightning[eval]'") from None
    import lm_eval.evaluator

    from fff_lightning import __version__
    from fff_lightning.run_config import describe_run

    # lm-eval records the git commit of the working directory, printing git's "fatal: not a git repository"
    # outside one; what scored the run is this package's version.
    lm_eval.evaluator.get_git_commit_hash = lambda: f"fff_lightning {__version__}"

    described = describe_run(*[_run_config(c) for c in args.config], overrides=overrides)
    module = described.model
    if module.adapter_path is None:
        raise ConfigError("model.adapter_path", "evaluate scores trained adapters: give --model.adapter_path <run>/adapter")
    module.configure_model()
    model = module.model.eval()
    shipped = local_tasks()
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    tasks = [shipped.get(n, n) for n in names]
    gen = min(256, module.base.max_seq_length // 2)  # lm-eval needs room for the prompt within max_length
    for t in tasks:
        if isinstance(t, dict) and "generation_kwargs" in t:
            t["generation_kwargs"]["max_gen_toks"] = gen
    chat = args.chat if args.chat is not None else described.datamodule.opts.style == "chat_template"
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    lm = HFLM(pretrained=model, tokenizer=module.tokenizer, batch_size=args.batch_size,
              device=str(next(model.parameters()).device), max_length=module.base.max_seq_length)  # fmt: skip
    res = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=args.num_fewshot,
                                  log_samples=True, apply_chat_template=chat, random_seed=args.seed, numpy_random_seed=args.seed,
                                  torch_random_seed=args.seed, fewshot_random_seed=args.seed)  # fmt: skip
    out = Path(args.out_dir) if args.out_dir else Path(module.adapter_path).parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res["results"], indent=2, default=str) + "\n")
    with open(out / "samples.jsonl", "w") as f:
        for task, items in res.get("samples", {}).items():
            for item in items:
                f.write(json.dumps({"task": task, **{k: item[k] for k in ("doc_id", "target", "resps", "filtered_resps")},
                                    "metrics": {m: item.get(m) for m in item.get("metrics", [])}}, default=str) + "\n")
    for task, r in res["results"].items():
        metrics = {k: v for k, v in r.items() if "," in k and not k.split(",")[0].endswith("_stderr")}
        print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float))))
    print(f"results written to {out / 'results.json'} and {out / 'samples.jsonl'}")
