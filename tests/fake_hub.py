"""A Hugging Face hub cache made by hand, in the layout ``huggingface_hub`` writes (``<kind>s--<org>--<name>/``
with ``refs/main``, ``snapshots/<commit>/<path>`` linked to content-named ``blobs/``), holding the research's four
datasets in their repositories' real file layouts, and a tiny model under a hub id: what a user has after
downloading on a login node."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

SAMPLES = Path(__file__).parent.parent / "fff_lightning" / "data" / "samples"
ULTRACHAT_CARD = """---
license: mit
configs:
- config_name: default
  data_files:
  - split: train_sft
    path: data/train_sft-*
  - split: test_sft
    path: data/test_sft-*
  - split: train_gen
    path: data/train_gen-*
  - split: test_gen
    path: data/test_gen-*
---
# UltraChat 200k
"""
THINKER_CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
---
"""


def put(cache: Path, repo: str, files: dict[str, bytes], kind: str = "dataset") -> Path:
    """Write ``files`` (repository path -> bytes) as one snapshot of ``repo``; returns the snapshot folder."""
    root = cache / f"{kind}s--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    snap = root / "snapshots" / commit
    for path, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (len(Path(path).parts) + 1)) / "blobs" / blob.name)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snap


def _rows(name: str, n: int) -> list[dict]:
    base = [json.loads(line) for line in (SAMPLES / f"{name}.jsonl").read_text().splitlines() if line.strip()]
    return [base[i % len(base)] for i in range(n)]


def _parquet(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def research_datasets(cache: Path, rows: int = 60) -> dict[str, Path]:
    """The four datasets, ``rows`` rows per split file, in their hub repositories' layouts (UltraChat's train_sft
    in 3 shards; its gen splits left out, as a user who fetched only what the run needs has them)."""
    mm = _rows("metamath", rows)
    mc = _rows("magicoder", rows)
    uc = _rows("ultrachat", rows)
    at = _rows("artificial_thinker", rows)
    third = rows // 3
    return {
        "metamath": put(
            cache,
            "meta-math/MetaMathQA",
            {"README.md": b"---\nlicense: mit\n---\n", "MetaMathQA-395K.json": json.dumps(mm).encode()},
        ),
        "magicoder": put(
            cache,
            "ise-uiuc/Magicoder-OSS-Instruct-75K",
            {
                "README.md": b"---\nlicense: mit\n---\n",
                "data-oss_instruct-decontaminated.jsonl": "".join(json.dumps(r) + "\n" for r in mc).encode(),
            },
        ),
        "ultrachat": put(
            cache,
            "HuggingFaceH4/ultrachat_200k",
            {
                "README.md": ULTRACHAT_CARD.encode(),
                "data/train_sft-00000-of-00003-a3ecf92756993583.parquet": _parquet(uc[:third]),
                "data/train_sft-00001-of-00003-0a1804bcb6ae68c6.parquet": _parquet(uc[third : 2 * third]),
                "data/train_sft-00002-of-00003-ee46ed25cfae92c6.parquet": _parquet(uc[2 * third :]),
                "data/test_sft-00000-of-00001-f7dfac4afe5b93f4.parquet": _parquet(uc[: rows // 2]),
            },
        ),
        "artificial_thinker": put(
            cache,
            "freecs/ArtificialThinkerSet",
            {"README.md": THINKER_CARD.encode(), "data/train-00000-of-00001-0c1b2a3d4e5f6071.parquet": _parquet(at)},
        ),
    }


def model(cache: Path, repo: str, folder: Path) -> Path:
    """A local model folder (weights, config, tokenizer) cached under the hub id ``repo``."""
    files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    return put(cache, repo, files, kind="model")


def remove(snapshot: Path, path: str) -> None:
    """Delete one file of a snapshot (its link and its blob): a download that missed it."""
    link = snapshot / path
    blob = link.resolve()
    link.unlink()
    blob.unlink()
    if not any(snapshot.iterdir()):
        shutil.rmtree(snapshot)
