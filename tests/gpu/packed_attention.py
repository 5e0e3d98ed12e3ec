"""A packed row's attention on one GPU: one flash varlen call (:mod:`fff_lightning.backends.packed_attention`) against
one SDPA call per document (Unsloth's path on torch 2.11) and dense causal SDPA on full rows.

Mistral-7B's attention shape (32 query heads, 8 K/V heads, head size 128, bf16), a 6,144-token row of 11 documents
(the research mix's typical count at ``tokens_per_batch: 6144``) against 3 full rows of 2,048. Checks that the varlen
call computes what the per-document calls compute (outputs and the gradients of Q, K and V), causal and with a
sliding window, then times forward + backward of each (median of 30 after 10) and, where Unsloth is installed,
that its dispatch takes the varlen path for this row once configured (``--unsloth``).
Run: ``python tests/gpu/packed_attention.py [--unsloth]``.
"""

import statistics
import sys

import torch
import torch.nn.functional as F

from fff_lightning.backends.packed_attention import flash_kernel_available, flash_varlen

H, H_KV, D = 32, 8, 128
LENGTHS = [1843, 97, 512, 301, 77, 640, 1024, 211, 700, 420, 319]  # 6,144 tokens, 11 documents
assert sum(LENGTHS) == 6144


def inputs(total: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(total, H, D, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    k = torch.randn(total, H_KV, D, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    v = torch.randn(total, H_KV, D, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    return q, k, v


def per_document(q, k, v, lengths, window=None):
    """One SDPA call per document ((1, H, n, D) each, grouped-query), joined: what Unsloth's segments path does."""
    outs, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        qs, ks, vs = (x[sl].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        if window is None:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
        else:
            i = torch.arange(n, device="cuda")
            keep = (i[None, :] <= i[:, None]) & (i[None, :] >= i[:, None] - (window - 1))
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=keep, enable_gqa=True)
        outs.append(o.squeeze(0).transpose(0, 1))
        start += n
    return torch.cat(outs)


def varlen(q, k, v, lengths, window=None):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    size = (-1, 0) if window is None else (window - 1, 0)
    return flash_varlen(q, k, v, cu, cu, max(lengths), max(lengths), window_size=size, enable_gqa=True)


def full_rows(q, k, v):
    """3 rows of 2,048: (3, H, 2048, D), dense causal SDPA (what a full-row step runs)."""
    qs, ks, vs = (x.view(3, 2048, x.shape[1], D).transpose(1, 2) for x in (q, k, v))
    return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True).transpose(1, 2)


def grads(fn, q, k, v, *args):
    for x in (q, k, v):
        x.grad = None
    out = fn(q, k, v, *args)
    g = torch.Generator(device="cuda").manual_seed(1)
    out.backward(torch.randn(out.shape, device="cuda", dtype=out.dtype, generator=g))
    return out.detach().float(), [x.grad.float() for x in (q, k, v)]


def compare(window=None) -> None:
    q, k, v = inputs(6144)
    ref, ref_g = grads(per_document, q, k, v, LENGTHS, window)
    out, out_g = grads(varlen, q, k, v, LENGTHS, window)
    name = "causal" if window is None else f"causal, window {window}"
    worst = 0.0
    for label, a, b in [("out", out, ref), *zip(("dq", "dk", "dv"), out_g, ref_g, strict=True)]:
        rel = ((a - b).abs().max() / b.abs().max()).item()
        worst = max(worst, rel)
        print(f"  {name}: {label} max |diff| / max |ref| = {rel:.2e}")
    assert worst < 2e-2, f"varlen differs from the per-document path ({name}): {worst:.2e}"


def timed(fn, *args, steps: int = 30, warmup: int = 10) -> float:
    q, k, v = args[:3]
    g = torch.randn(6144, H, D, device="cuda", dtype=torch.bfloat16)
    times = []
    for i in range(steps + warmup):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = fn(*args)
        out.reshape(6144, H, D).backward(g)
        b.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(a.elapsed_time(b))
    return statistics.median(times)


def unsloth_takes_varlen() -> None:
    try:
        from unsloth.utils import attention_dispatch as d
    except Exception as e:  # noqa: BLE001 -- reported, not needed for the rest
        print(f"unsloth: not checked ({type(e).__name__}: {e})")
        return
    from fff_lightning.backends.packed_attention import configure

    q, k, v = (x.detach().transpose(0, 1).unsqueeze(0) for x in inputs(6144))  # (1, H, T, D), as Unsloth holds them
    for mode in ("segments", "auto"):
        print(f"unsloth, packed_attention {mode}: {configure(mode, d)}")
        takes = d._torch_varlen_takes(q, k, v, {}, True, None)
        beats = d._torch_varlen_beats_segments(q, k, tuple(LENGTHS), H // H_KV, True)
        print(f"  _torch_varlen_takes={takes} _torch_varlen_beats_segments={beats}")


def main() -> None:
    print(torch.__version__, torch.cuda.get_device_name(0), "flash kernel:", flash_kernel_available())
    print("correctness, 6,144 tokens in 11 documents, Q 32 heads, K/V 8 heads, bf16:")
    compare()
    compare(window=256)
    q, k, v = inputs(6144)
    t_seg = timed(per_document, q, k, v, LENGTHS)
    t_var = timed(varlen, q, k, v, LENGTHS)
    t_full = timed(full_rows, q, k, v)
    t_one = timed(varlen, q, k, v, [2048, 2048, 2048])
    print("forward + backward of one layer's attention, median of 30 (ms):")
    print(f"  packed row, one SDPA call per document: {t_seg:.3f}")
    print(f"  packed row, one flash varlen call:      {t_var:.3f}  ({t_seg / t_var:.2f}x faster)")
    print(f"  3 full rows of 2,048, dense causal SDPA: {t_full:.3f}")
    print(f"  3 full rows of 2,048 as one varlen call: {t_one:.3f}")
    if "--unsloth" in sys.argv:
        unsloth_takes_varlen()


if __name__ == "__main__":
    main()
