"""Forward + backward time of step 2's FFF stacks alone (7 layers x 6 sub-layers x width 128, d=4096) on one GPU.

Compares the eager stack with ``torch.compile``'d one (``model.base.compile_fff``), in fp32 and bf16 adapter
weights, at the research's batch (3 x 2048 tokens) under bf16 autocast, beside one bf16 matmul of Mistral-7B's
MLP up projection for scale. Run: ``python tests/gpu/fff_stack_speed.py``. Median of 20 steps after 5.
"""

import statistics

import torch
from torch import nn

from fff_lightning.fff import FFFLinear
from fff_lightning.spec import FFFConfig


def timed(fn, steps: int = 20, warmup: int = 5) -> float:
    times = []
    for i in range(steps + warmup):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(a.elapsed_time(b))
    return statistics.median(times)


def stacks(dtype: str, compiled: bool) -> list[FFFLinear]:
    cfg = FFFConfig(n_sublayers=6, width=128, activation="gelu_new", init="normal", dtype=dtype)
    out = []
    for _ in range(7):
        m = FFFLinear(nn.Identity(), 4096, cfg, eps=1e-5).cuda()
        m.compiled = compiled
        out.append(m)
    return out


def main() -> None:
    x = torch.randn(3, 2048, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    rows = []
    for dtype in ("float32", "bfloat16"):
        for compiled in (False, True):
            layers = stacks(dtype, compiled)

            def step(layers=layers):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    ys = [m(x) for m in layers]
                torch.autograd.backward(ys, [g] * len(ys))

            torch.cuda.reset_peak_memory_stats()
            ms = timed(step)
            rows.append((dtype, compiled, ms, torch.cuda.max_memory_allocated() / 2**30))
    w = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16)
    xb = x.detach()
    mm = timed(lambda: xb @ w.T)
    print("FFF stacks of step 2 (7 layers x 6 x 128), batch 3 x 2048, forward + backward, median ms:")
    for dtype, compiled, ms, peak in rows:
        print(f"  weights {dtype:9s} {'compiled' if compiled else 'eager   '}: {ms:7.2f} ms  (peak {peak:.2f} GiB)")
    print(f"  for scale: one (6144 x 4096) @ (4096 x 14336) bf16 matmul: {mm:.3f} ms")


if __name__ == "__main__":
    main()
