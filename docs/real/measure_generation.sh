#!/usr/bin/env bash
# tokens/s of generation on this CPU: the base model alone, an export (LoRA merged, FFF as modules) and the run
# (FFF and LoRA unmerged), for the quickstart's adapters and real_step2's, two rounds; batch 1, chat template,
# greedy, 64 new tokens per answer (--ignore_eos), 7 prompts, median of answers 2-7 (docs/export.md).
# Made first, in the folder given: python -m fff_lightning fit --config quickstart --logs_dir logs;
#   python -m fff_lightning fit --config real_step2 --logs_dir logs --run_name s2 --trainer.max_steps 3 --trainer.limit_val_batches 0
#   python -m fff_lightning export "logs/quickstart/lora-[64]-2-[gelu_new]-[up_proj]" --out q32
#   python -m fff_lightning export logs/real/s2 --out s2x
# B: the SmolLM2 folder converted from the GGUF file, in the cache (FFF_CACHE, default ~/.cache/fff_lightning).
cd "${1:?the folder holding the runs and exports}"
B=~/.cache/fff_lightning/gguf/b179c9523d0e6a0f98a330c7562b6827-v1
Q="logs/quickstart/lora-[64]-2-[gelu_new]-[up_proj]"
P=(); for t in "What is 17 times 23?" "Write a haiku about rain." "Explain recursion in one sentence." "Name three prime numbers." "What is the capital of Peru?" "Give me a Python one-liner to reverse a list." "Why is the sky blue?"; do P+=(--prompt "$t"); done
for round in 1 2; do
  for s in "$B" q32 "$Q" s2x logs/real/s2; do
    m=$(python -m fff_lightning generate "$s" "${P[@]}" --max_new_tokens 64 --ignore_eos --dtype float32 --no-stream 2>&1 >/dev/null | grep median)
    echo "round $round | $s | $m"
  done
done
