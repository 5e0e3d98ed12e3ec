"""What a user reads on the terminal: one line per log record, no advertising, no warnings that mean nothing."""

from __future__ import annotations

import logging
import sys
import warnings


class _Drop(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(f in str(record.msg) for f in self.fragments)


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
        bnb.addFilter(_Drop("kernels-community"))


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


class _LevelFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"warning: {text}" if record.levelno >= logging.WARNING else text
