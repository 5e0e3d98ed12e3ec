"""The research's mix at its real size, in the four datasets' real schemas, for a scale rehearsal on a CPU.

``python tests/scale.py <folder> [--fraction F]`` writes ``metamath.jsonl`` (11,000 rows: the run's 10,000 head +
1,000 tail), ``magicoder.jsonl`` (11,000), ``ultrachat/{train_sft,test_sft}.jsonl`` (25,000 + 2,000 conversations
of 1-5 exchanges), ``artificial_thinker.jsonl`` (300), and ``paths.yaml``, a data config pointing the step configs
at them (``--config step2 --config <folder>/paths.yaml``). The texts are seeded random words whose lengths follow
each dataset's shape (short math answers, long code solutions, multi-turn chats), so tokenizing, caching, planning
and padding cost what they cost on the real mix. ``--fraction`` scales every row count (the start-up test uses a
small one).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROWS = {"metamath": 11_000, "magicoder": 11_000, "ultrachat_train": 25_000, "ultrachat_test": 2_000, "thinker": 300}
_WORDS = (
    "the a of to and in is for that with on as by this we it be are from at or an which each value function number "
    "list return step total so then let x y n i result first second answer problem solution data model time two "
    "three five seven find write code python def print if else while for import class self string int float array"
).split()


def _text(rng: random.Random, mean_words: float) -> str:
    n = max(3, int(rng.lognormvariate(0, 0.6) * mean_words))
    words = [rng.choice(_WORDS) for _ in range(n)]
    for i in range(12, n, rng.randint(10, 25)):
        words[i] += rng.choice([".", ",", ".\n", ":\n    "])
    return " ".join(words)


def write(folder: str | Path, fraction: float = 1.0, seed: int = 0, words: float = 1.0) -> Path:
    """Write the mix into ``folder`` (``words`` scales the texts' lengths); returns its ``paths.yaml``."""
    folder = Path(folder)
    (folder / "ultrachat").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)

    def text(mean_words: float) -> str:
        return _text(rng, mean_words * words)

    n = {k: max(4, round(v * fraction)) for k, v in ROWS.items()}

    def lines(path: Path, rows):
        with open(path, "w") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")

    lines(
        folder / "metamath.jsonl",
        (
            {"type": "MATH_AugSV", "query": text(45), "original_question": "", "response": text(120)}
            for _ in range(n["metamath"])
        ),
    )
    lines(
        folder / "magicoder.jsonl",
        (
            {"lang": "python", "raw_index": i, "index": i, "seed": "", "openai_fingerprint": "fp",
             "problem": text(180), "solution": text(260)}
            for i in range(n["magicoder"])
        ),
    )  # fmt: skip

    def chat(i: int) -> dict:
        messages = []
        for _ in range(rng.choice([1, 1, 2, 3, 4, 5])):
            messages += [{"role": "user", "content": text(40)}, {"role": "assistant", "content": text(150)}]
        return {"prompt": messages[0]["content"], "prompt_id": f"{i:064x}", "messages": messages}

    lines(folder / "ultrachat" / "train_sft.jsonl", (chat(i) for i in range(n["ultrachat_train"])))
    lines(folder / "ultrachat" / "test_sft.jsonl", (chat(i) for i in range(n["ultrachat_test"])))
    lines(
        folder / "artificial_thinker.jsonl",
        ({"prompt": text(30), "reasoning": text(220), "response": text(90)} for _ in range(n["thinker"])),
    )
    paths = folder / "paths.yaml"
    names = {"metamath": "metamath.jsonl", "magicoder": "magicoder.jsonl", "ultrachat": "ultrachat"}
    names["artificial_thinker"] = "artificial_thinker.jsonl"
    paths.write_text(
        json.dumps({"data": {"paths": {k: str((folder / v).resolve()) for k, v in names.items()}}}, indent=2) + "\n"
    )
    return paths


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--fraction", type=float, default=1.0, help="scale every row count (default: the research's)")
    args = p.parse_args()
    print(f"wrote {write(args.folder, args.fraction)}")
