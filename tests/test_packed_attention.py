"""How packed rows attend on the unsloth backend (``fff_lightning.backends.packed_attention``): what ``configure``
hands Unsloth's attention dispatch for each mode and machine, and that each run starts from Unsloth's own choice.
CI has no GPU: a stand-in for ``unsloth.utils.attention_dispatch`` here; ``tests/gpu/packed_attention.py`` checks
the varlen call against the per-document calls on a GPU (docs/benchmarks.md, "Packed rows")."""

from types import SimpleNamespace

import pytest
import torch

from fff_lightning.backends import packed_attention as pa
from fff_lightning.errors import ConfigError
from fff_lightning.spec import BaseModelConfig


def dispatch(torch_varlen=None):
    return SimpleNamespace(_TORCH_VARLEN_ATTN=torch_varlen, _LEAN_VARLEN=torch_varlen is not None)


def test_torch_2_11_gets_the_flash_varlen_call_and_segments_restores_unsloths_path():
    d = dispatch()  # torch 2.11: Unsloth found no varlen_attn with enable_gqa
    said = pa.configure("auto", d, flash_ok=True)
    assert d._TORCH_VARLEN_ATTN is pa.flash_varlen and d._LEAN_VARLEN is False
    assert "one varlen call per layer" in said and pa.configured == [said]
    said = pa.configure("segments", d, flash_ok=True)
    assert d._TORCH_VARLEN_ATTN is None and "one SDPA call per document" in said
    pa.configure("auto", d, flash_ok=False)  # no flash kernel (pre-Ampere, ROCm): Unsloth's per-document path
    assert d._TORCH_VARLEN_ATTN is None and d._LEAN_VARLEN is False


def test_unsloths_own_varlen_is_kept_and_restored_after_segments():
    own = object()  # torch >= 2.12: Unsloth's own varlen_attn with enable_gqa
    d = dispatch(own)
    assert "torch's varlen_attn" in pa.configure("auto", d, flash_ok=True)
    assert d._TORCH_VARLEN_ATTN is own and d._LEAN_VARLEN is True
    pa.configure("segments", d)
    assert d._TORCH_VARLEN_ATTN is None
    pa.configure("auto", d, flash_ok=True)  # a later run in the same process starts from Unsloth's choice
    assert d._TORCH_VARLEN_ATTN is own and d._LEAN_VARLEN is True


def test_another_unsloth_is_left_alone():
    d = SimpleNamespace()
    assert "Unsloth's own choice" in pa.configure("auto", d)
    assert vars(d) == {}


def test_flash_varlen_passes_unsloths_window_to_the_kernel(monkeypatch):
    """Unsloth calls varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=, window_size=, enable_gqa=): causal is
    window (-1, 0), a sliding window (w - 1, 0); K/V keep their fewer heads (no expansion)."""
    calls = []

    def forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout, causal, debug, *, scale, window_size_left,
                window_size_right):  # fmt: skip
        calls.append((k.shape, causal, window_size_left, window_size_right, scale))
        return torch.zeros_like(q), None, None, None, None

    monkeypatch.setattr(torch.ops, "aten", SimpleNamespace(_flash_attention_forward=forward))
    q, k = torch.zeros(10, 4, 8), torch.zeros(10, 2, 8)
    cu = torch.tensor([0, 6, 10], dtype=torch.int32)
    out = pa.flash_varlen(q, k, k, cu, cu, 6, 6, scale=0.5, window_size=(-1, 0), enable_gqa=True)
    pa.flash_varlen(q, k, k, cu, cu, 6, 6, window_size=(4095, 0), enable_gqa=True)
    assert out.shape == q.shape
    assert calls == [(k.shape, True, -1, 0, 0.5), (k.shape, False, 4095, 0, None)]


def test_no_gpu_means_no_flash_kernel_and_a_bad_mode_is_one_line():
    if not torch.cuda.is_available():
        assert not pa.flash_kernel_available() and not pa.one_call_per_row("auto")
    assert not pa.one_call_per_row("segments")
    with pytest.raises(ConfigError, match="model.base.packed_attention: unknown value 'flex'; allowed: auto, segments"):
        BaseModelConfig(packed_attention="flex")
