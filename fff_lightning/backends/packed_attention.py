"""How a packed row attends on the ``unsloth`` backend: one varlen flash-attention call per layer, not one SDPA call
per document.

A packed row holds several documents; each attends only within itself. Unsloth 2026.10 takes one varlen kernel per
packed row only when torch's ``varlen_attn`` accepts ``enable_gqa`` (torch >= 2.12) or flash-attn is installed;
otherwise (torch 2.11, no flash-attn: the GPU image of docs/benchmarks.md) it runs one SDPA call per run of
equal-length documents, expanding K/V per call for grouped-query models. A 6,144-token row of the research's mix holds
about 11 documents, so a step launches about 11 x 32 layers x 3 small attention calls instead of 32 x 3, and keeps
copies of the attention output and the expanded K/V for backward.

torch's flash kernel itself takes grouped-query K/V of fewer heads and variable lengths
(``aten::_flash_attention_forward`` with ``cum_seq_q``); only the 2.11 Python wrapper lacks the ``enable_gqa``
argument. :func:`configure` hands Unsloth that kernel (:class:`FlashVarlen`), so a packed row is one call per layer
whatever torch >= 2.5 is installed: docs/benchmarks.md, "Packed rows", measures it against the per-document path
and full rows, and ``tests/gpu/packed_attention.py`` checks it equals the per-document path (outputs and gradients).

``model.base.packed_attention``: ``auto`` (the one call where the GPU has torch's flash kernel, else Unsloth's own
choice) or ``segments`` (Unsloth's per-document calls, whatever is installed: to compare).
"""

from __future__ import annotations

import torch

_ORIGINAL = "_fff_lightning_original"  # Unsloth's own choices, kept on its module the first time they change
#: What the last :func:`configure` set, in words (the bench records it beside a packed case).
configured: list[str] = []


class FlashVarlen(torch.autograd.Function):
    """Causal (optionally windowed) attention over the segments of one packed row: Q ``(T, H, D)``, K/V
    ``(T, H_kv, D)`` with ``H % H_kv == 0``, segment starts ``cu_seqlens`` (int32, ``(n + 1,)``) -> ``(T, H, D)``.
    torch's flash kernel, forward and backward, with no K/V expansion."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, is_causal, scale, left, right):
        out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, is_causal, False,
            scale=scale, window_size_left=left, window_size_right=right,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, cu_seqlens, out, lse, seed, offset)
        ctx.args = (max_seqlen, is_causal, scale, left, right)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, cu_seqlens, out, lse, seed, offset = ctx.saved_tensors
        max_seqlen, is_causal, scale, left, right = ctx.args
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad.contiguous(), q, k, v, out, lse, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, is_causal,
            seed, offset, scale=scale, window_size_left=left, window_size_right=right,
        )  # fmt: skip
        return dq, dk, dv, None, None, None, None, None, None


def flash_varlen(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """torch 2.12's ``varlen_attn`` signature (what Unsloth calls), for one packed row's self-attention (the keys'
    segments are the queries')."""
    if (cu_seq_k is not None and cu_seq_k is not cu_seq_q) or max_k != max_q:
        raise NotImplementedError("flash_varlen attends a packed row to itself: cu_seq_k must be cu_seq_q")
    left, right = window_size
    return FlashVarlen.apply(q, k, v, cu_seq_q, max_q, tuple(window_size) == (-1, 0), scale, left, right)


def flash_kernel_available(device: torch.device | None = None) -> bool:
    """torch's flash attention kernel runs on this GPU (CUDA, compute capability >= 8, built in)."""
    if not torch.cuda.is_available() or torch.version.hip is not None:
        return False
    if not getattr(torch.backends.cuda, "is_flash_attention_available", lambda: False)():
        return False
    if not hasattr(torch.ops.aten, "_flash_attention_forward"):
        return False
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index)[0] >= 8


def configure(mode: str, dispatch, flash_ok: bool | None = None) -> str:
    """Set how Unsloth's attention runs packed rows in this process; returns what packed rows will run, in words.
    ``dispatch`` is Unsloth's ``unsloth.utils.attention_dispatch`` (a stand-in in tests); ``flash_ok`` overrides
    :func:`flash_kernel_available`."""
    configured[:] = [_configure(mode, dispatch, flash_ok)]
    return configured[0]


def _configure(mode: str, dispatch, flash_ok: bool | None) -> str:
    names = ("_TORCH_VARLEN_ATTN", "_LEAN_VARLEN")
    if not all(hasattr(dispatch, n) for n in names):  # another Unsloth: its own choice, untouched
        return "Unsloth's own choice (this Unsloth has no _TORCH_VARLEN_ATTN)"
    if not hasattr(dispatch, _ORIGINAL):
        setattr(dispatch, _ORIGINAL, {n: getattr(dispatch, n) for n in names})
    for n, v in getattr(dispatch, _ORIGINAL).items():  # each run starts from Unsloth's own choice
        setattr(dispatch, n, v)
    if mode == "segments":
        dispatch._TORCH_VARLEN_ATTN = None
        return "one SDPA call per document (packed_attention: segments)"
    if dispatch._TORCH_VARLEN_ATTN is not None:
        return "one varlen call per layer (torch's varlen_attn, through Unsloth)"
    if not (flash_kernel_available() if flash_ok is None else flash_ok):
        return "one SDPA call per document (no flash kernel on this GPU)"
    dispatch._TORCH_VARLEN_ATTN = flash_varlen
    dispatch._LEAN_VARLEN = False  # every call through flash_varlen
    return "one varlen call per layer (torch's flash kernel, grouped-query K/V)"


def one_call_per_row(mode: str) -> bool:
    """Whether a packed row will attend in one call per layer on this machine (for the memory plan, before any
    weight loads): ``auto`` with torch's flash kernel on the GPU."""
    return mode == "auto" and flash_kernel_available()
