"""``python -m fff_lightning export <run> --out <folder>``: a trained run as a folder other tools load.

* LoRA alone (or DoRA): a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) that
  ``PeftModel.from_pretrained(base, folder)`` loads; with ``--merged``, a plain Hugging Face model folder with the
  adapters folded into the weights, for vLLM, llama.cpp's converters and the rest.
* With FFF: LoRA folded in and the FFF stacks kept as modules, in a self-contained folder that
  ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads with no fff_lightning installed (its
  ``modeling_fff.py`` needs torch and transformers only). FFF cannot be folded into the weights: it transforms a
  projection's input through a nonlinear stack, so serving it needs its code (``generate`` loads such a folder after
  checking that its code is the one ``export`` writes, byte for byte).

The base model is loaded in 16 or 32 bits for the export (``--dtype``; never 4-bit: merged weights are dense),
through transformers. The folder is built beside ``--out`` under a temporary name and renamed: it appears whole or not
at all. Then it is loaded back and its logits are compared with the run's own (unmerged, in the same dtype) on a few
prompts: equal to 1e-4 of the largest logit in float32; in 16 bits, where merging rounds each weight once more,
within 5% of the largest logit with the same next token at >= 90% of positions. A folder that fails is removed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from fff_lightning.errors import ConfigError
from fff_lightning.inference import base_name

_TEMPLATE = Path(__file__).parent / "export_template.py"
#: The class of an exported FFF model (in its ``modeling_fff.py``; ``config.json``'s ``auto_map`` names it).
CLASS = "FFFForCausalLM"
#: The check after writing, per dtype: the largest |logit difference| as a fraction of the largest |logit|, and the
#: least share of positions whose most likely next token is the same.
TOLERANCE = {"float32": (1e-4, 1.0), "bfloat16": (5e-2, 0.9), "float16": (5e-2, 0.9)}
#: Prompts of the check (raw text: every tokenizer reads them).
CHECK_PROMPTS = ("Question: Natalia sold 48 clips in April and half as many in May. How many in all?\nAnswer:",
                 "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
                 "The three primary colours are")  # fmt: skip
#: Adapter kinds an export carries: FFF as modules, LoRA and DoRA merged (or as a PEFT folder).
EXPORTABLE = ("fff", "lora", "dora")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fff_lightning export", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("run", help="the run folder (its config.yaml and adapter/)")
    p.add_argument("--out", required=True, help="the folder to write (must not exist)")
    p.add_argument("--merged", action="store_true",
                   help="LoRA alone: a plain model folder with LoRA folded in, not a PEFT adapter folder")  # fmt: skip
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="of the exported weights; auto: the run's compute dtype (FFF keeps its own)")  # fmt: skip
    p.add_argument("--adapter", default=None,
                   help="another adapter folder of the run (default <run>/adapter; e.g. adapter-step100)")  # fmt: skip
    return p


def check_inputs(run: Path, adapter: Path, out: Path) -> None:
    """Everything that needs no model, in one line each: a run folder with trained adapters, a new ``--out`` whose
    parent can be written."""
    if not run.is_dir() or not (run / "config.yaml").is_file():
        raise ConfigError("export", f"{run} is not a run folder (no config.yaml): give a folder under logs/")
    if not (adapter / "fff_adapter_config.json").is_file():
        raise ConfigError("export", f"{run} has no trained adapters ({adapter} holds none): finish or resume the run "
                          "first, or give --adapter")  # fmt: skip
    if out.exists() or out.is_symlink():
        raise ConfigError("--out", f"{out} exists: give a new folder (nothing is overwritten)")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise ConfigError("--out", f"{parent} does not exist: create it first")
    import os

    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError("--out", f"cannot write in {parent}: choose a folder you can write to")


def main(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    run, out = Path(args.run), Path(args.out)
    adapter = Path(args.adapter) if args.adapter else run / "adapter"
    check_inputs(run, adapter, out)
    from fff_lightning.adapters import read_spec

    spec = read_spec(adapter)
    kinds = [k.name for k in spec.kinds()]
    other = [k for k in kinds if k not in EXPORTABLE]
    if other:
        raise ConfigError("export", f"the {other[0]} adapter cannot be exported (export carries {', '.join(EXPORTABLE)}"
                          "): serve the run with `generate` instead")  # fmt: skip
    has_fff = "fff" in kinds
    if args.merged and has_fff:
        print("(FFF runs are always exported with LoRA merged; --merged changes nothing)", file=sys.stderr)
    import torch

    from fff_lightning.inference import describe, model_of
    from fff_lightning.loading import compute_dtype

    described = describe([str(run / "config.yaml")], _overrides(run, adapter, args.dtype))
    module = described.model
    dtype = str(compute_dtype(module.loaded_base)).replace("torch.", "")
    _check_space(out, module, dtype)
    model, tokenizer = model_of(module, adapters=True)
    if getattr(model.config, "quantization_config", None) is not None:
        raise ConfigError("export", f"the base model {base_name(module)} is stored quantized; export needs its 16-bit "
                          "weights: give the full-precision model (--model.base.name_or_path in the run's "
                          "config.yaml)")  # fmt: skip
    model = model.to("cpu") if not torch.cuda.is_available() else model
    opts = described.datamodule.opts
    if opts.style == "chat_template" and opts.chat_template:  # the template the run's data was written with
        tokenizer.chat_template = opts.chat_template
    samples = _samples(tokenizer)
    reference = logits(model, samples)
    peft_folder = not has_fff and not args.merged

    def build(tmp: Path) -> None:
        if peft_folder:
            model.save_pretrained(tmp)  # PEFT's own adapter folder
        else:
            merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
            if has_fff:
                _fff_config(merged, module)
            merged.save_pretrained(tmp)
            if has_fff:
                (tmp / "modeling_fff.py").write_text(render(merged.config.fff_base_class, module.adapters.fff.dtype))
        tokenizer.save_pretrained(tmp)
        _card(tmp, run, module, kinds, peft_folder, has_fff, dtype, opts.style)

    fff_params = {k: v.detach().to("cpu", copy=True) for k, v in model.named_parameters() if ".fff_blocks." in k}
    from fff_lightning.files import write_atomically

    token = os.urandom(8).hex()  # the folder is this export's: another that appeared at --out meanwhile is not
    try:
        write_atomically(out, lambda tmp: (build(tmp), (tmp / ".fff_export_token").write_text(token)))
        if (out / ".fff_export_token").read_text() != token if (out / ".fff_export_token").is_file() else True:
            raise ConfigError("--out", f"{out} appeared while exporting (another export?): it is left as it is")
        (out / ".fff_export_token").unlink()
        model = module.model = None  # one copy of the weights at a time: the folder is loaded back next
        exported, got = _reload(out, has_fff, peft_folder, module, samples)
        _check_fff(exported, fff_params)
        worst, agree = compare(got, reference)
        rel, need = TOLERANCE[dtype]
        scale = float(reference.abs().max())
        if worst > rel * scale or agree < need:
            raise ConfigError("export", f"the exported model's logits differ from the run's by up to {worst:.3g} "
                              f"(logits up to {scale:.3g}; allowed {rel:g} of it in {dtype}) and its next token "
                              f"agrees at {agree:.0%} of positions: nothing kept")  # fmt: skip
    except KeyboardInterrupt:
        _remove_own(out, token)
        import signal

        from fff_lightning.errors import Interrupted

        raise Interrupted(f"interrupted by SIGINT while exporting: nothing written to {out}", signal.SIGINT) from None
    except BaseException as e:
        if not (isinstance(e, ConfigError) and e.field == "--out"):
            _remove_own(out, token)
        raise
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    merged_kinds = "/".join(k.upper() if k != "lora" else "LoRA" for k in kinds if k != "fff")
    what = ("a PEFT adapter folder" if peft_folder else
            f"a model folder ({merged_kinds} merged, FFF as trust_remote_code modules)" if has_fff and merged_kinds else
            "a model folder (FFF as trust_remote_code modules)" if has_fff else
            f"a model folder ({merged_kinds} merged)")  # fmt: skip
    print(f"exported {run.name} ({', '.join(kinds)}; {dtype}) as {what} to {out}: {size / 2**20:,.1f} MiB")
    print("  " + ", ".join(f"{p.name} ({p.stat().st_size / 2**20:,.1f} MiB)" if p.stat().st_size >= 2**20 else p.name
                           for p in sorted(out.iterdir())))  # fmt: skip
    print(
        f"checked: loaded back, its logits on {len(samples)} prompts ({reference.shape[0]} positions) equal the "
        f"run's to {worst:.2g} (largest logit {scale:.3g}); next token the same at {agree:.0%} of positions"
    )
    print(f"load it: {_how_to_load(out, peft_folder, has_fff, module)}")


def _remove_own(out: Path, token: str) -> None:
    """Remove ``out`` after a failed check or an interruption: the folder this export wrote (its token file is gone
    once the write was checked to be ours; a folder still holding another token is another export's)."""
    mark = out / ".fff_export_token"
    if out.is_dir() and (not mark.exists() or mark.read_text() == token):
        shutil.rmtree(out, ignore_errors=True)


def _check_fff(exported, trained: dict) -> None:
    """The FFF stacks of the loaded folder are the run's, tensor for tensor (in the export's dtype): a stack dropped,
    misplaced or of other values fails here even where 16-bit logits could hide it."""
    if not trained:
        return
    import torch

    got = {k: v for k, v in exported.named_parameters() if ".fff_blocks." in k}
    ours = {k.split("base_model.model.", 1)[-1].replace(".base_layer.", "."): v for k, v in trained.items()}
    missing = sorted(set(ours) - set(got))
    if missing or len(got) != len(ours):
        raise ConfigError("export", f"the exported model's FFF stacks are not the run's ({len(got)} tensors against "
                          f"{len(ours)}; e.g. {missing[:1]}): nothing kept")  # fmt: skip
    for k, v in ours.items():
        if not torch.equal(got[k].detach().cpu(), v.to(got[k].dtype)):
            raise ConfigError("export", f"the exported FFF tensor {k} differs from the run's: nothing kept")


def _overrides(run: Path, adapter: Path, dtype: str) -> list[str]:
    """The run as export loads it: its adapters, the base model unquantized in ``dtype`` through transformers (the
    tiny random model stays tiny), no gradient checkpointing, no memory cap."""
    import yaml

    from fff_lightning import backends

    cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    backend = (((cfg.get("model") or {}).get("base") or {}).get("backend")) or "auto"
    over = ["--model.adapter_path", str(adapter), "--model.base.load_in_4bit", "false",
            "--model.base.gradient_checkpointing", "false", "--model.base.max_memory_gib", "null",
            "--model.base.backend", backends.dense(backend)]  # fmt: skip
    if dtype != "auto":
        over += ["--model.base.dtype", dtype]
    return over


def _check_space(out: Path, module, dtype: str) -> None:
    """Refuse before loading when ``--out``'s disk cannot hold the weights (a full disk later still leaves nothing)."""
    shape = module.base_shape()
    per = {"float32": 4}.get(dtype, 2)
    params = getattr(shape, "num_parameters", None)
    if params is None:
        h, n, v = shape.hidden_size, shape.num_hidden_layers, shape.vocab_size
        inter = getattr(shape, "intermediate_size", 4 * h)
        params = n * (4 * h * h + 3 * h * inter) + 2 * v * h
    need, parent = int(params * per), out.absolute().parent
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        return
    if free < need:
        raise ConfigError("--out", f"only {free / 2**20:,.0f} MiB free on the disk of {parent}; the exported weights "
                          f"need about {need / 2**20:,.0f} MiB: free some space or export elsewhere")  # fmt: skip


def _samples(tokenizer) -> list:
    """The check's prompts, tokenized: one ``(1, n)`` tensor each."""
    import torch

    return [torch.tensor([tokenizer(t)["input_ids"]]) for t in CHECK_PROMPTS]


def logits(model, samples) -> object:
    """The model's logits on each sample, in float32 on the CPU, one after another along the positions."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return torch.cat([model(input_ids=s.to(device)).logits.float().cpu()[0] for s in samples])


def compare(got, reference) -> tuple[float, float]:
    """The largest |difference| of two logit tensors and the share of positions whose argmax is the same."""
    worst = float((got - reference).abs().max())
    agree = float((got.argmax(-1) == reference.argmax(-1)).float().mean())
    return worst, agree


def _fff_config(merged, module) -> None:
    """The FFF stacks' description in the model's config (what ``modeling_fff.py`` rebuilds)."""
    from fff_lightning.checks import parse_layers
    from fff_lightning.fff import decoder_layers

    cfg = module.adapters.fff
    layers = parse_layers(cfg.layers, len(decoder_layers(merged)), "model.fff.layers")
    eps = next(m.eps for m in merged.modules() if type(m).__name__ == "FFFLinear")  # what the stacks trained with
    merged.config.fff_adapter = {"layers": list(layers), "targets": list(cfg.targets), "widths": list(cfg.widths()),
                                 "activations": list(cfg.activations()), "eps": eps, "dtype": cfg.dtype}  # fmt: skip
    merged.config.fff_base_class = type(merged).__name__
    merged.config.auto_map = {"AutoModelForCausalLM": f"modeling_fff.{CLASS}"}


def render(base_class: str, fff_dtype: str) -> str:
    """The ``modeling_fff.py`` export writes for a model of ``base_class`` (a ``transformers`` class name) whose FFF
    stacks are in ``fff_dtype``."""
    code = _TEMPLATE.read_text().replace('"__BASE_CLASS__"', json.dumps(base_class))
    return code if fff_dtype == "float32" else code.replace('= ["fff_blocks"]  #', "= []  #")


def exported_class(folder: Path, config: dict):
    """The model class to load ``folder`` with, never running code from it: ``None`` for a folder without code (its
    architecture's own class loads it, ``trust_remote_code`` off); for a folder ``export`` wrote, the
    ``FFFForCausalLM`` of its ``modeling_fff.py`` -- built here from this package's template, after checking the
    folder's copy is byte for byte the same, so the folder's files are read as data only (transformers would import
    more than ``modeling_fff.py`` with ``trust_remote_code``, e.g. a ``custom_generate/`` folder). Any other code is
    refused in one line."""
    auto_map = config.get("auto_map")
    if not auto_map:
        return None
    code = folder / "modeling_fff.py"
    base = config.get("fff_base_class")
    fff = config.get("fff_adapter") if isinstance(config.get("fff_adapter"), dict) else {}
    ours = (auto_map == {"AutoModelForCausalLM": f"modeling_fff.{CLASS}"} and isinstance(base, str) and code.is_file()
            and code.read_bytes() == render(base, fff.get("dtype", "float32")).encode())  # fmt: skip
    if not ours:
        raise ConfigError("source", f"{folder} holds model code that fff_lightning's export did not write (auto_map "
                          f"{auto_map}); it would run on loading: load it with transformers yourself if you trust "
                          "it")  # fmt: skip
    return fff_class(base, fff.get("dtype", "float32"))


def fff_class(base_class: str, fff_dtype: str):
    """``FFFForCausalLM`` for ``base_class``, from this package's template (the code an FFF export carries)."""
    import types

    import transformers

    if not hasattr(transformers, base_class):
        raise ConfigError("source", f"transformers {transformers.__version__} has no class {base_class}")
    module = types.ModuleType(f"fff_lightning_exported_{base_class}")
    exec(compile(render(base_class, fff_dtype), str(_TEMPLATE), "exec"), module.__dict__)  # this package's own code
    return getattr(module, CLASS)


def _reload(out: Path, has_fff: bool, peft_folder: bool, module, samples):
    import torch
    from transformers import AutoModelForCausalLM

    from fff_lightning.loading import compute_dtype

    dtype = compute_dtype(module.loaded_base)
    if peft_folder:
        from peft import PeftModel

        from fff_lightning import backends

        base, _ = backends.get(module.loaded_base.backend).load(module.loaded_base, dtype)
        model = PeftModel.from_pretrained(base, str(out))
    else:
        config = json.loads((out / "config.json").read_text())
        cls = exported_class(out, config) or AutoModelForCausalLM
        model = cls.from_pretrained(str(out), dtype=dtype)
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval(), logits(model.eval(), samples)


def _how_to_load(out: Path, peft_folder: bool, has_fff: bool, module) -> str:
    if peft_folder:
        return (f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base_name(module)!r}), "
                f"{str(out)!r}); or python -m fff_lightning generate {out} --prompt ...")  # fmt: skip
    remote = ", trust_remote_code=True" if has_fff else ""
    return (f"AutoModelForCausalLM.from_pretrained({str(out)!r}{remote}); or python -m fff_lightning generate {out} "
            "--prompt ...")  # fmt: skip


def _card(folder: Path, run: Path, module, kinds, peft_folder: bool, has_fff: bool, dtype: str, style: str) -> None:
    """A README.md saying what the folder is and how to load it, and ``fff_export.json`` (what ``generate`` reads:
    ``text_style``, how the run's prompts were written)."""
    from fff_lightning import __version__

    budget = module.plan.budget
    lines = [f"# {run.name}", "",
             f"Exported by fff_lightning {__version__} from the run `{run.name}`: base model `{base_name(module)}`, "
             f"adapters {', '.join(kinds)} ({budget.trainable:,} trained parameters), weights in {dtype}.",
             ""]  # fmt: skip
    if has_fff:
        lines += ["LoRA (if any) is merged into the weights; the FFF stacks are modules defined in `modeling_fff.py` "
                  "(torch and transformers only). `config.json`'s `fff_adapter` says where they are.", "",
                  "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)",
                  "tokenizer = AutoTokenizer.from_pretrained(folder)", "```"]  # fmt: skip
    elif peft_folder:
        lines += ["A PEFT adapter folder:", "", "```python", "from peft import PeftModel",
                  "from transformers import AutoModelForCausalLM",
                  f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base_name(module)!r}), "
                  "folder)", "```"]  # fmt: skip
    else:
        lines += ["A plain model folder with the adapters merged into the weights:", "", "```python",
                  "from transformers import AutoModelForCausalLM",
                  "model = AutoModelForCausalLM.from_pretrained(folder)", "```"]  # fmt: skip
    (folder / "README.md").write_text("\n".join(lines) + "\n")
    (folder / "fff_export.json").write_text(json.dumps({"run": str(run.resolve()), "kinds": kinds, "dtype": dtype,
                                                        "base": base_name(module), "trainable": budget.trainable,
                                                        "text_style": style, "fff_lightning": __version__},
                                                       indent=1) + "\n")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
