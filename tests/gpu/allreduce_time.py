"""Time of one NCCL all-reduce of step 2's adapter gradients (129,146,880 fp32 values) between the GPUs of one host.

Run: ``torchrun --nproc_per_node 2 tests/gpu/allreduce_time.py``. Median of 20 after 5, timed with CUDA events.
"""

import os
import statistics

import torch
import torch.distributed as dist

dist.init_process_group("nccl")
rank = dist.get_rank()
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
for n in (129_146_880, 120_586_240):
    x = torch.randn(n, device="cuda")
    times = []
    for i in range(25):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dist.all_reduce(x)
        b.record()
        torch.cuda.synchronize()
        if i >= 5:
            times.append(a.elapsed_time(b))
    if rank == 0:
        ms = statistics.median(times)
        print(
            f"all-reduce of {n:,} fp32 ({n * 4 / 2**20:,.0f} MiB) on {dist.get_world_size()} GPUs: median {ms:.2f} ms, "
            f"bus bandwidth {2 * (dist.get_world_size() - 1) / dist.get_world_size() * n * 4 / ms / 1e6:,.0f} GB/s"
        )
dist.destroy_process_group()
