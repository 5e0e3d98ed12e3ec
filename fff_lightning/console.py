"""What a user reads on the terminal: one line per log record, no advertising, no warnings that mean nothing."""

from __future__ import annotations

import logging
import re
import sys
import warnings


class _Drop(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(f in str(record.msg) for f in self.fragments)


#: The model summary's FLOPs total when nothing was counted (Lightning counts FLOPs only for a module with an
#: ``example_input_array``; a language model has none): plain (``0  Total Flops``) and Rich (``Total FLOPs: 0``).
_ZERO_FLOPS = re.compile(r"^\s*(0\s+Total Flops|Total FLOPs: 0)\s*$", re.IGNORECASE)
_STYLE = re.compile(r"\x1b\[[0-9;]*m")


class _ZeroFlops(logging.Filter):
    """Takes the ``0  Total Flops`` line out of Lightning's plain model summary (one log record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "Total Flops" in record.msg:
            record.msg = "\n".join(ln for ln in record.msg.split("\n") if not _ZERO_FLOPS.match(ln))
        return True


def _rich_summary_without_zero_flops(summarize):
    """Lightning's Rich model summary (printed to Rich's console, not logged) without its ``Total FLOPs: 0``."""

    def without(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                total_flops=0, **kwargs):  # fmt: skip
        args = (summary_data, total_parameters, trainable_parameters, model_size, total_training_modes)
        if total_flops:
            return summarize(*args, total_flops=total_flops, **kwargs)
        from rich import get_console

        console = get_console()
        with console.capture() as captured:
            summarize(*args, total_flops=total_flops, **kwargs)
        lines = captured.get().splitlines(keepends=True)
        console.file.write("".join(ln for ln in lines if not _ZERO_FLOPS.match(_STYLE.sub("", ln))))
        console.file.flush()

    without.fff_quiet = True
    return without


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes, not the one there when the handler was made
    (pytest, notebooks and the launcher's children swap it; a handler kept on a closed one prints a traceback)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def quiet() -> None:
    """Drop the library messages that mean nothing to a user; before the libraries are imported (some log at
    import), and again by :func:`setup` (idempotent)."""
    # bitsandbytes on AVX512-BF16 CPUs, at import: an optional kernel hub it cannot reach; it falls back by itself.
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _Drop) for f in bnb.filters):
        bnb.addFilter(_Drop("kernels-community", "gemm_4bit_forward"))
    warnings.filterwarnings("ignore", message=r".*gemm_4bit_forward")  # the same notice, where a release warns it


def quiet_lm_eval() -> None:
    """lm-eval's warnings about a model handed over in memory, which ``evaluate`` does on purpose (one process)."""
    hf = logging.getLogger("lm_eval.models.huggingface")
    if not any(isinstance(f, _Drop) for f in hf.filters):
        hf.addFilter(_Drop("model kwarg is not of type", "already-initialized model"))


def setup() -> None:
    """Call once, after Lightning is imported (and after Unsloth, which configures the root logger)."""
    quiet()
    # Lightning's loggers propagate to the root logger when it has handlers (Unsloth adds one): every line then
    # printed twice, bare and as "[name|LEVEL]". Each keeps exactly its own handler.
    for name in ("lightning.pytorch", "lightning.fabric", "fff_lightning"):
        log = logging.getLogger(name)
        if not any(isinstance(h, logging.StreamHandler) for h in log.handlers):
            handler = _StderrHandler()
            handler.setFormatter(_LevelFormatter("%(message)s") if name == "fff_lightning" else logging.Formatter())
            log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    # Lightning's "💡 Tip: ... try installing litlogger/litmodels" adverts.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_Drop("💡 Tip"))
    # Lightning's own use of a torch API deprecated in torch 2.13: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # Validation losses are logged after their sums were added up across processes: the advice does not apply.
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('(val|test)/")
    # Several processes: validation batches are dealt across all datasets, so a process may hold none of one
    # dataset's (by design; its sums are zeros, added up with the others').
    warnings.filterwarnings("ignore", message=r"Total length of `ResumableLoader` across ranks is zero, but local rank")
    warnings.filterwarnings("ignore", message=r"The ``compute`` method of metric SumMetric was called before the")
    # predict: the data module's batch sampler returns every prompt (its last batch too), which Lightning cannot see.
    warnings.filterwarnings("ignore", message=r"You are using a custom batch sampler `PlannedBatchSampler` for predict")
    # The model summary's "Total FLOPs: 0": nothing was counted (a language model has no example input).
    summary = logging.getLogger("lightning.pytorch.callbacks.model_summary")
    if not any(isinstance(f, _ZeroFlops) for f in summary.filters):
        summary.addFilter(_ZeroFlops())
    try:
        from lightning.pytorch.callbacks import RichModelSummary
    except ImportError:  # pragma: no cover - another Lightning
        return
    if not getattr(RichModelSummary.summarize, "fff_quiet", False):
        RichModelSummary.summarize = staticmethod(_rich_summary_without_zero_flops(RichModelSummary.summarize))


class _LevelFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"warning: {text}" if record.levelno >= logging.WARNING else text
