"""The layout of a cache on disk (store format 2): every array path, dtype and codec, defined once.

```
<store>/<key>/
├── zarr.json              the group; its attributes hold the manifest (ia2cache.store.manifest)
├── acts/<site>            (rows, layers, P, hidden)  activations, one array per site
├── scales/<site>          (rows, layers, P)          float32 absmax/127 per vector (--dtype int8 only)
├── tokens/...             (rows, ...)                int32 ids, lengths and aligned positions
├── rows/...               (rows, ...)                pool indices, demos, split
├── logits/topk_*          (rows, P, K)               teacher top-k log-probs and ids (optional)
└── ledger/shard_NNNNNN.json                          one per finished shard (ia2cache.store.ledger)
```

Every array is a zarr v3 array whose first dimension is the row; it is sharded along rows (one
shard = one writer batch, written once) and chunked along rows (the unit of a read) and, for
``acts/<site>``, along layers (see :func:`act_chunk_layers`). Every chunk ends with zarr's
``crc32c`` codec, so every read of every chunk is checked (by zarr, or by
:mod:`~ia2cache.store.direct`, which reads the uncompressed arrays of local caches); the ledger's
sha256 of each chunk is what ``verify`` checks on top.

Activation dtypes (``--dtype``, :data:`ACT_DTYPES`): bf16 is kept bit exact as uint16 (zarr has no
bfloat16; the array attribute ``logical_dtype`` says so), fp16 and fp32 as themselves, and int8
is *lossy*: ``q = round(x / s)`` with one float32 scale ``s = max|x| / 127`` per (row, layer,
position) vector, kept in ``scales/<site>``; ``|x - q*s| <= max|x| / 254`` for every value.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ia2cache.errors import IA2Error

if TYPE_CHECKING:
    import torch

__all__ = [
    "ACT_DTYPES",
    "FORMAT",
    "LEDGER_DIR",
    "LOCK_FILE",
    "ActDtype",
    "ArraySpec",
    "Encoded",
    "act_chunk_layers",
    "act_path",
    "cache_arrays",
    "decode_activations",
    "default_store",
    "dequantize",
    "encode_activations",
    "how_to_read",
    "ledger_name",
    "logical_values",
    "scale_path",
    "shard_of_entry",
]

FORMAT: int = 2
"""The store format this ia2cache writes and reads. Format 1 (one array per layer,
``acts/<site>/layer_NNN``) is refused with a pointer to ``ia2cache migrate``."""

LEDGER_DIR = "ledger"
LOCK_FILE = ".lock"
RESERVED_TOP = frozenset({LEDGER_DIR, LOCK_FILE, "zarr.json"})
"""First path parts no array may take."""
_LEDGER_RE = re.compile(r"shard_(\d{6,})\.json")

# Token, row and logit arrays (the activation and scale paths depend on the site: act_path).
STUDENT_IDS, STUDENT_LEN = "tokens/student_ids", "tokens/student_len"
TEACHER_IDS, TEACHER_LEN = "tokens/teacher_ids", "tokens/teacher_len"
RESPONSE_IDS, RESPONSE_LEN = "tokens/response_ids", "tokens/response_len"
TARGET_IDS, TARGET_LEN = "tokens/target_ids", "tokens/target_len"
TEACHER_POSITIONS, STUDENT_POSITIONS = "tokens/teacher_positions", "tokens/student_positions"
POSITIONS_LEN = "tokens/positions_len"
EXAMPLE_INDEX, DEMO_INDEX, SPLIT = "rows/example_index", "rows/demo_index", "rows/split"
TOPK_VALUES, TOPK_IDS = "logits/topk_values", "logits/topk_ids"

CODECS = ("none", "lz4", "zstd")
"""Compressors before the crc32c codec: none (every array ``collect`` writes); blosc lz4 without
shuffle; blosc zstd with byte shuffle. Caches written with lz4 activations and zstd token arrays
(format-2 caches before 2026-12-01) still read, through zarr."""
ACT_CODEC = "none"
"""The activations' codec, chosen from the layout measurements in the README's "Performance":
activations barely compress (a real M=1024 cache: 1.01x its raw bytes with lz4), and without a
compressor the loader reads them through :mod:`~ia2cache.store.direct` at several times zarr's
speed. The token and row arrays are stored the same way: they are under 1% of a cache's bytes,
and zarr's cost per chunk made reading them the larger part of opening a loader."""
CHUNK_CRC_BYTES = 4
"""What zarr's crc32c codec appends to every chunk (and to every shard index)."""
INDEX_ENTRY_BYTES = 16
"""A shard index's entry per chunk slot: offset and length, little-endian uint64 each."""
ACT_CHUNK_BYTES = 1 << 20
"""Target size of one activation chunk (see :func:`act_chunk_layers`)."""


def act_path(site: str) -> str:
    """The activation array of ``site``: ``acts/<site>``, shaped (rows, layers, P, hidden)."""
    return f"acts/{site}"


def scale_path(site: str) -> str:
    """The int8 scales of ``site``'s activations: ``scales/<site>``, shaped (rows, layers, P)."""
    return f"scales/{site}"


def ledger_name(shard: int) -> str:
    """The file name of ``shard``'s ledger entry: the one name it may have."""
    return f"shard_{shard:06d}.json"


def shard_of_entry(name: str) -> int | None:
    """The shard a ledger file name is the entry of, None for any name :func:`ledger_name` does
    not give (``shard_0000001.json`` would otherwise be a second entry of shard 1)."""
    m = _LEDGER_RE.fullmatch(name)
    return int(m.group(1)) if m and name == ledger_name(int(m.group(1))) else None


def default_store() -> Path:
    """``$IA2CACHE_HOME/store`` (``IA2CACHE_HOME`` defaults to ``~/.cache/ia2cache``, as
    :func:`ia2cache.models.home`, which the store may not import)."""
    env = os.environ.get("IA2CACHE_HOME")
    if env:
        return Path(env).expanduser() / "store"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ia2cache" / "store"


# --------------------------------------------------------------------------- dtypes


@dataclass(frozen=True)
class ActDtype:
    """One ``--dtype`` of the activations."""

    name: str
    stored: str
    """numpy dtype on disk."""
    logical: str | None
    """What the stored bits mean when not ``stored`` itself: ``bfloat16`` (uint16 bits), or
    ``int8_absmax`` (times the vector's scale in ``scales/<site>``)."""
    lossy: bool
    """Values differ from the teacher's beyond its own rounding to bf16/fp16/fp32."""
    about: str


ACT_DTYPES: dict[str, ActDtype] = {
    "bf16": ActDtype("bf16", "uint16", "bfloat16", False, "bf16 bits as uint16, bit exact"),
    "fp16": ActDtype("fp16", "float16", None, False, "fp16 (refused above 65504)"),
    "fp32": ActDtype("fp32", "float32", None, False, "fp32"),
    "int8": ActDtype("int8", "int8", "int8_absmax", True,
                     "int8 x float32 absmax/127 per (row, layer, position): lossy, |error| <= max|x|/254"),
}
"""``--dtype`` -> how activations are stored."""

LOGICAL_DTYPES = frozenset(d.logical for d in ACT_DTYPES.values() if d.logical)
INT8_BOUND = 1 / 254
"""The int8 error bound: ``|x - x̂| <= INT8_BOUND * max|x|`` over each (row, layer, position)."""
_FP16_MAX = 65504.0


def act_dtype(name: str) -> ActDtype:
    try:
        return ACT_DTYPES[name]
    except KeyError:
        raise IA2Error(f"--dtype {name!r} is not one of {', '.join(ACT_DTYPES)}") from None


# --------------------------------------------------------------------------- array specs


@dataclass(frozen=True)
class ArraySpec:
    """One array of a cache. Its first dimension, ``rows``, is implied."""

    path: str
    """Path inside the group, e.g. ``"acts/attn"``; relative, no ``..``."""
    shape: tuple[int, ...]
    """Trailing shape without rows, e.g. ``(layers, P, hidden)``, or ``()`` for a per-row scalar."""
    dtype: str
    """Numpy dtype as stored: ``"uint16"``, ``"float16"``, ``"float32"``, ``"int8"``, ``"int32"``..."""
    logical_dtype: str | None = None
    """What the stored bits mean when it is not ``dtype``: ``"bfloat16"`` over ``uint16``,
    ``"int8_absmax"`` over ``int8`` (with ``scales``)."""
    stats: bool = False
    """Keep per-shard stats (mean, std, max |x|, NaN and Inf counts) in the ledger, one set per
    index of the first trailing dimension (per layer, for activations)."""
    codec: str = "none"
    """Compressor before the crc32c codec: ``none``, ``lz4`` or ``zstd`` (see :data:`CODECS`)."""
    chunk: tuple[int, ...] | None = None
    """Trailing chunk shape; None: the whole trailing shape (chunks run along rows only)."""
    scales: str | None = None
    """The array of per-vector scales (``int8_absmax`` only)."""

    def __post_init__(self) -> None:
        parts = self.path.split("/")
        if (
            not self.path
            or self.path.startswith("/")
            or "\\" in self.path
            or any(p in ("", ".", "..") for p in parts)
            or parts[0] in RESERVED_TOP
        ):
            raise ValueError(
                f"array path {self.path!r} must be relative, without '..', '.', empty parts "
                f"or a reserved first part ({', '.join(sorted(RESERVED_TOP))})"
            )
        shape = tuple(int(d) for d in self.shape)
        if any(d < 1 for d in shape):
            raise ValueError(f"array {self.path!r}: every trailing dimension must be >= 1: {shape}")
        object.__setattr__(self, "shape", shape)
        try:
            np.dtype(self.dtype)
        except TypeError as e:
            raise ValueError(f"array {self.path!r}: unknown dtype {self.dtype!r}") from e
        if self.codec not in CODECS:
            raise ValueError(f"array {self.path!r}: codec {self.codec!r} is not one of {CODECS}")
        if self.chunk is not None:
            chunk = tuple(int(d) for d in self.chunk)
            if len(chunk) != len(shape) or any(not 1 <= c <= d for c, d in zip(chunk, shape, strict=True)):
                raise ValueError(f"array {self.path!r}: chunk {chunk} does not fit the shape {shape}")
            object.__setattr__(self, "chunk", None if chunk == shape else chunk)
        if self.stats and not shape:
            raise ValueError(f"array {self.path!r}: stats need a trailing dimension")
        if self.logical_dtype is not None:
            if self.logical_dtype not in LOGICAL_DTYPES:
                raise ValueError(f"array {self.path!r}: unknown logical dtype {self.logical_dtype!r}")
            want = {"bfloat16": np.uint16, "int8_absmax": np.int8}[self.logical_dtype]
            if np.dtype(self.dtype) != want:
                raise ValueError(f"array {self.path!r}: logical {self.logical_dtype} needs dtype "
                                 f"{np.dtype(want).name}")
        if (self.logical_dtype == "int8_absmax") != (self.scales is not None):
            raise ValueError(f"array {self.path!r}: scales go with logical dtype int8_absmax only")

    @property
    def chunk_trailing(self) -> tuple[int, ...]:
        """The trailing chunk shape (the whole trailing shape unless chunked further)."""
        return self.chunk or self.shape

    @property
    def shard_trailing(self) -> tuple[int, ...]:
        """The trailing shard shape: the trailing shape rounded up to whole chunks (one shard file
        per row range)."""
        return tuple(-(-d // c) * c for d, c in zip(self.shape, self.chunk_trailing, strict=True))

    def to_dict(self) -> dict[str, Any]:
        """The spec as it is written into the manifest (without its path, the dict key)."""
        d = asdict(self)
        d.pop("path")
        d["shape"] = list(self.shape)
        d["chunk"] = None if self.chunk is None else list(self.chunk)
        return d

    @classmethod
    def from_dict(cls, path: str, d: dict[str, Any]) -> ArraySpec:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError, TypeError, KeyError: ``d`` is not such a spec.
        """
        if not isinstance(d, dict):
            raise TypeError(f"array {path!r}: its spec is not a JSON object")
        chunk = d.get("chunk")
        return cls(path=path, **{**d, "shape": tuple(d["shape"]),
                                 "chunk": None if chunk is None else tuple(chunk)})

    def compressors(self) -> list[Any]:
        """zarr's codecs after the serializer: the compressor (if any), then crc32c."""
        from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

        return {
            "none": [Crc32cCodec()],
            "lz4": [BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.noshuffle), Crc32cCodec()],
            "zstd": [BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle), Crc32cCodec()],
        }[self.codec]


def act_chunk_layers(n_layers: int, layer_bytes: int) -> int:
    """Layers per chunk of an activation array whose chunk of one layer holds ``layer_bytes``.

    A read of a layer subset decodes every chunk it touches whole, so a chunk should hold few
    layers; zarr pays a fixed cost per chunk (0.1-0.5 ms here), so it should hold many. The rule:
    any contiguous run of a quarter of the layers touches chunks holding at most half of them
    (so such a read costs at most about half a full one), with as few chunks plus padding layers
    as that allows (30 layers: 6 chunks of 5); no chunk above 8 x :data:`ACT_CHUNK_BYTES` (then
    fewer layers). Measured in the README's "Performance" (store format 2).
    """
    if n_layers < 4:
        return 1
    quarter = -(-n_layers // 4)

    def worst(lc: int) -> int:  # layers in the chunks a run of `quarter` layers can touch
        return (-(-(quarter - 1) // lc) + 1) * lc

    ok = [lc for lc in range(1, n_layers + 1) if 2 * worst(lc) <= n_layers] or [1]
    best = min(ok, key=lambda lc: (-(-n_layers // lc) + (-(-n_layers // lc) * lc - n_layers), -lc))
    cap = max(1, 8 * ACT_CHUNK_BYTES // max(1, layer_bytes))
    return max(1, min(best, cap))


def cache_arrays(*, site: str, n_layers: int, slots: int, hidden: int, dtype: str, rows_per_chunk: int,
                 student_len: int, teacher_len: int, t: int, target_len: int, k: int,
                 topk: int) -> list[ArraySpec]:
    """The arrays of a cache, in the order they are listed.

    Args:
        site, n_layers, slots, hidden: the activations: (rows, n_layers, slots, hidden).
        dtype: a key of :data:`ACT_DTYPES`.
        rows_per_chunk: rows per chunk (sizes the activation chunks along layers).
        student_len, teacher_len, t, target_len, k: the widths of the token and row arrays.
        topk: K of the top-k logits, 0 for none.
    """
    d = act_dtype(dtype)
    layer_bytes = rows_per_chunk * slots * hidden * np.dtype(d.stored).itemsize
    lc = act_chunk_layers(n_layers, layer_bytes)
    scales = scale_path(site) if d.logical == "int8_absmax" else None
    specs = [ArraySpec(act_path(site), (n_layers, slots, hidden), d.stored, d.logical, stats=True,
                       codec=ACT_CODEC, chunk=(lc, slots, hidden), scales=scales)]
    if scales:
        specs.append(ArraySpec(scales, (n_layers, slots), "float32", chunk=(lc, slots)))
    specs += [
        ArraySpec(STUDENT_IDS, (student_len,), "int32"),
        ArraySpec(STUDENT_LEN, (), "int32"),
        ArraySpec(TEACHER_IDS, (teacher_len,), "int32"),
        ArraySpec(TEACHER_LEN, (), "int32"),
        ArraySpec(RESPONSE_IDS, (t,), "int32"),
        ArraySpec(RESPONSE_LEN, (), "int32"),
        ArraySpec(TARGET_IDS, (target_len,), "int32"),
        ArraySpec(TARGET_LEN, (), "int32"),
        ArraySpec(TEACHER_POSITIONS, (slots,), "int32"),
        ArraySpec(STUDENT_POSITIONS, (slots,), "int32"),
        ArraySpec(POSITIONS_LEN, (), "int32"),
        ArraySpec(EXAMPLE_INDEX, (), "int32"),
        ArraySpec(DEMO_INDEX, (max(k, 1),), "int32"),
        ArraySpec(SPLIT, (), "uint8"),
    ]
    if topk:
        specs += [
            ArraySpec(TOPK_VALUES, (slots, topk), "float32"),
            ArraySpec(TOPK_IDS, (slots, topk), "int32"),
        ]
    return specs


# --------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class Encoded:
    """Activations as stored, with what a lossy dtype lost."""

    values: np.ndarray
    """The stored array (contiguous, the dtype's ``stored`` numpy dtype)."""
    scales: np.ndarray | None = None
    """int8: float32 (..., P) scales, one per vector; else None."""
    max_rel_error: float | None = None
    """int8: max over vectors of max|x - x̂| / max|x| (at most 1/254); else None."""
    max_rel_l2_error: float | None = None
    """int8: max over vectors of ||x - x̂|| / ||x||; else None."""


def encode_activations(t: torch.Tensor, dtype: str) -> Encoded:
    """Turn a tensor of activations (..., hidden) into what the store keeps.

    Args:
        t: activations, any float dtype, any device; finite (collect refuses NaN/Inf first).
        dtype: a key of :data:`ACT_DTYPES`.

    Raises:
        IA2Error: ``dtype`` is unknown, or ``"fp16"`` and a finite value exceeds 65504.
    """
    import torch

    d = act_dtype(dtype)
    t = t.detach()
    if d.name == "bf16":
        out = t.to(device="cpu", dtype=torch.bfloat16).contiguous().view(torch.uint16).numpy()
    elif d.name == "fp16":
        if t.numel():
            a = t.abs()
            a = a[torch.isfinite(a)]
            peak = float(a.max()) if a.numel() else 0.0
            if peak > _FP16_MAX:
                raise IA2Error(
                    f"--dtype fp16 cannot hold these activations: max |x| found is {peak:.6g}, "
                    f"above the fp16 limit {_FP16_MAX:g}; use --dtype bf16 or --dtype fp32"
                )
        out = t.to(device="cpu", dtype=torch.float16).numpy()
    elif d.name == "fp32":
        out = t.to(device="cpu", dtype=torch.float32).numpy()
    else:
        return _quantize(t.to(device="cpu", dtype=torch.float32))
    return Encoded(np.ascontiguousarray(out))


def _quantize(x: torch.Tensor) -> Encoded:
    """int8 with one absmax scale per vector (the last dimension)."""
    import torch

    peak = x.abs().amax(-1) if x.numel() else x.new_zeros(x.shape[:-1])
    scale = peak / 127.0
    q = torch.round(x / torch.where(scale > 0, scale, 1.0)[..., None]).clamp_(-127, 127)
    back = q * scale[..., None]
    err = (x - back).abs()
    with torch.no_grad():
        rel = torch.where(peak > 0, err.amax(-1) / torch.where(peak > 0, peak, 1.0), 0.0) \
            if x.numel() else peak
        norm = x.norm(dim=-1)
        rel2 = torch.where(norm > 0, (x - back).norm(dim=-1) / torch.where(norm > 0, norm, 1.0), 0.0) \
            if x.numel() else peak
    return Encoded(np.ascontiguousarray(q.to(torch.int8).numpy()),
                   np.ascontiguousarray(scale.numpy().astype(np.float32)),
                   float(rel.max()) if rel.numel() else 0.0, float(rel2.max()) if rel2.numel() else 0.0)


def decode_activations(a: np.ndarray, logical_dtype: str | None) -> torch.Tensor:
    """The stored array as a torch tensor of what it holds, without copying where it can: uint16
    with ``bfloat16`` -> torch.bfloat16; int8 (``int8_absmax``) stays int8, to be multiplied by its
    scales (:func:`dequantize`); fp16/fp32 as themselves."""
    import torch

    a = np.ascontiguousarray(a)
    if logical_dtype == "bfloat16":
        return torch.from_numpy(a.astype(np.uint16, copy=False)).view(torch.bfloat16)
    if logical_dtype not in (None, "int8_absmax"):
        raise ValueError(f"unknown logical dtype {logical_dtype!r}")
    return torch.from_numpy(a)


def dequantize(values: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """float32 activations from a decoded tensor: int8 times its per-vector scales, others widened.
    Runs wherever the tensors are (on a GPU, on the device)."""
    import torch

    if scales is None:
        return values.float()
    return values.to(torch.float32) * scales.to(torch.float32).unsqueeze(-1)


def logical_values(a: np.ndarray, logical_dtype: str | None, scales: np.ndarray | None = None) -> np.ndarray:
    """The values the stored bits mean, as numpy: bf16 widened exactly to float32
    (``(a.astype(np.uint32) << 16).view(np.float32)``), int8 times its scales, others as stored."""
    if logical_dtype == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    if logical_dtype == "int8_absmax":
        if scales is None:
            raise ValueError("int8_absmax values need their scales")
        return a.astype(np.float32) * scales[..., None]
    return a


_EVAL_NOTE = ("This is an eval cache (split eval): every row has rows/split 2 and rows/example_index indexes "
              "the task's eval split; demos still index the pool.")


def how_to_read(site: str, dtype: str, split: str = "train") -> str:
    """What ``inspect`` prints and the manifest keeps: how to rebuild every training pair with any
    zarr client, NumPy only (``split="eval"`` adds what differs in an eval cache)."""
    acts = act_path(site)
    d = act_dtype(dtype)
    values = {
        "bf16": (f"{acts} is uint16 holding bf16 bits (attribute logical_dtype=bfloat16); as float32 in "
                 "NumPy: (a.astype(np.uint32) << 16).view(np.float32)"),
        "fp16": f"{acts} is float16",
        "fp32": f"{acts} is float32",
        "int8": (f"{acts} is int8, lossy: the value is a.astype(np.float32) * s[..., None] with "
                 f"s = {scale_path(site)}[r, l, j] (float32, max|x|/127 of that vector; error at most "
                 "max|x|/254)"),
    }[d.name]
    return " ".join(f"""
Store format {FORMAT}. Row r of every array is one training pair. Student prompt:
tokens/student_ids[r, :student_len[r]]. Teacher prompt: tokens/teacher_ids[r, :teacher_len[r]].
Response: tokens/response_ids[r, :response_len[r]] (the teacher's greedy continuation, or the gold
labels). Gold SFT labels: tokens/target_ids[r, :target_len[r]] (" " + target, then with T > 1 the
stop string's ids, as manifest sft_labels says). Activations: {acts}[r, l, j] is layer
manifest.layers[l] at slot j; slots j < positions_len[r] were taken at teacher position
tokens/teacher_positions[r, j] of teacher prompt + response and match student position
tokens/student_positions[r, j] of student prompt + response. {values}. Pads are -1 (ints) or 0
(activations). rows/split: 0 train, 1 dev, 2 eval, 3 unlabelled (no target; rows/example_index -1
for rows of an --unlabelled-file); rows/example_index and rows/demo_index index the task pool (pool
order as in the task files). logits/topk_values are the teacher's top-k next-token log-probabilities
(log_softmax over the full vocabulary) at the aligned positions, logits/topk_ids their token ids.
Every chunk ends with a crc32c (zarr's crc32c codec); ledger/shard_NNNNNN.json holds the sha256 of
every chunk of every array.
""".split()) + (" " + _EVAL_NOTE if split == "eval" else "")
