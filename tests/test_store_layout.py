"""Tests for ia2cache.store.layout: activation encodings (bf16 bit exact, int8 within its bound),
the NumPy recipe inspect prints, array specs, and the layer chunking rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ia2cache.errors import IA2Error
from ia2cache.store import (
    ACT_DTYPES,
    INT8_BOUND,
    ArraySpec,
    cache_arrays,
    decode_activations,
    dequantize,
    encode_activations,
    how_to_read,
    logical_values,
)
from ia2cache.store.layout import act_chunk_layers


def test_bf16_round_trip_is_bit_exact_including_extremes() -> None:
    g = torch.Generator().manual_seed(1)
    t = (torch.randn(64, 33, generator=g) * torch.logspace(-30, 30, 33)).to(torch.bfloat16)
    finfo = torch.finfo(torch.bfloat16)
    extremes = torch.tensor([finfo.max, -finfo.max, finfo.tiny, finfo.smallest_normal / 4, 0.0, -0.0,
                             float("inf"), float("-inf"), 1e5, -1e5], dtype=torch.bfloat16)
    for x in (t, extremes):
        enc = encode_activations(x, "bf16")
        a = enc.values
        assert a.dtype == np.uint16 and a.flags.c_contiguous and a.shape == tuple(x.shape)
        assert enc.scales is None and enc.max_rel_error is None
        back = decode_activations(a, "bfloat16")
        assert back.dtype == torch.bfloat16
        assert torch.equal(back.view(torch.uint16), x.view(torch.uint16))  # -0.0 kept too
        # the NumPy-only recipe inspect prints gives the same float32 values
        assert np.array_equal(logical_values(a, "bfloat16"), back.float().numpy(), equal_nan=True)
        widened = (a.astype(np.uint32) << 16).view(np.float32)
        assert np.array_equal(widened, back.float().numpy(), equal_nan=True)
    nan = torch.tensor([float("nan")], dtype=torch.bfloat16)
    assert torch.isnan(decode_activations(encode_activations(nan, "bf16").values, "bfloat16")).all()
    f = torch.randn(100, generator=g)  # fp32 input is rounded to bf16 exactly as torch rounds it
    back = decode_activations(encode_activations(f, "bf16").values, "bfloat16")
    assert torch.equal(back, f.to(torch.bfloat16))


def test_fp16_and_fp32_encode_and_refusals() -> None:
    t = torch.tensor([[1.5, -65504.0], [float("inf"), 0.25]])
    a = encode_activations(t, "fp16").values
    assert a.dtype == np.float16 and np.array_equal(a, t.numpy().astype(np.float16))
    assert torch.equal(decode_activations(a, None), t.to(torch.float16))
    assert encode_activations(t.to(torch.bfloat16), "fp32").values.dtype == np.float32
    with pytest.raises(IA2Error) as e:
        encode_activations(torch.tensor([1.0, -123456.0, 70000.0]), "fp16")
    assert "123456" in str(e.value) and "bf16" in str(e.value) and "fp32" in str(e.value)
    with pytest.raises(IA2Error, match="--dtype 'int4'"):
        encode_activations(t, "int4")


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 4), layers=st.integers(1, 3), hidden=st.integers(1, 70),
       log_scale=st.floats(-20, 20), seed=st.integers(0, 2**16), zero_rows=st.booleans())
def test_int8_error_is_within_its_bound_for_every_vector(rows: int, layers: int, hidden: int,
                                                         log_scale: float, seed: int,
                                                         zero_rows: bool) -> None:
    """|x - x̂| <= max|x| / 254 for every value of every (row, layer, position) vector, whatever the
    scale (a vector of zeros stays zeros), and the reported error is the one measured."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, layers, 2, hidden, generator=g) * (2.0**log_scale)
    x[0, 0, 0, : hidden // 2] *= 50  # an outlier in some vectors
    if zero_rows:
        x[-1] = 0
    enc = encode_activations(x, "int8")
    assert enc.values.dtype == np.int8 and enc.values.shape == x.shape
    assert enc.scales is not None and enc.scales.dtype == np.float32 and enc.scales.shape == x.shape[:-1]
    back = dequantize(decode_activations(enc.values, "int8_absmax"), torch.from_numpy(enc.scales))
    assert torch.equal(torch.from_numpy(logical_values(enc.values, "int8_absmax", enc.scales)), back)
    peak = x.abs().amax(-1, keepdim=True)
    err = (x - back).abs()
    assert bool((err <= peak * INT8_BOUND * (1 + 1e-5)).all())
    if zero_rows:
        assert not back[-1].any()
    with torch.no_grad():
        rel = torch.where(peak > 0, err / torch.where(peak > 0, peak, 1.0), 0.0).max()
    assert enc.max_rel_error == pytest.approx(float(rel), rel=1e-5, abs=1e-12)
    assert enc.max_rel_error <= INT8_BOUND * (1 + 1e-5)


def test_int8_takes_at_most_1_1_bytes_a_value_from_hidden_40() -> None:
    for hidden in (40, 64, 576, 4096):
        specs = cache_arrays(site="attn", n_layers=30, slots=8, hidden=hidden, dtype="int8", rows_per_chunk=8,
                             student_len=4, teacher_len=4, t=8, target_len=2, k=2, topk=0)
        acts, scales = specs[0], specs[1]
        assert (acts.path, scales.path, acts.scales) == ("acts/attn", "scales/attn", "scales/attn")
        per_value = (np.prod(acts.shape) + 4 * np.prod(scales.shape)) / np.prod(acts.shape)
        assert per_value <= 1.1, hidden
    assert ACT_DTYPES["int8"].lossy and not any(ACT_DTYPES[d].lossy for d in ("bf16", "fp16", "fp32"))


def test_how_to_read_names_the_arrays_and_the_numpy_recipe() -> None:
    text = how_to_read("resid", "bf16")
    assert "acts/resid[r, l, j]" in text and "(a.astype(np.uint32) << 16).view(np.float32)" in text
    assert "view as bfloat16" not in text  # a torch-only recipe
    assert "scales/attn" in how_to_read("attn", "int8") and "lossy" in how_to_read("attn", "int8")
    assert "eval cache" in how_to_read("attn", "fp32", "eval")
    assert "eval cache" not in how_to_read("attn", "fp32")


def test_array_spec_refuses_what_it_cannot_store() -> None:
    for bad in ("../x", "/abs", "a/../b", "a//b", "ledger/x", ".lock", ""):
        with pytest.raises(ValueError):
            ArraySpec(bad, (1,), "float32")
    with pytest.raises(ValueError, match="logical bfloat16 needs dtype uint16"):
        ArraySpec("x", (1,), "float32", logical_dtype="bfloat16")
    with pytest.raises(ValueError, match="scales"):
        ArraySpec("x", (1,), "int8", logical_dtype="int8_absmax")
    with pytest.raises(ValueError, match="codec"):
        ArraySpec("x", (1,), "float32", codec="gzip")
    with pytest.raises(ValueError, match="does not fit"):
        ArraySpec("x", (4, 2), "float32", chunk=(5, 2))
    spec = ArraySpec("acts/attn", (30, 8, 576), "uint16", "bfloat16", stats=True, chunk=(5, 8, 576))
    assert ArraySpec.from_dict(spec.path, spec.to_dict()) == spec
    assert spec.shard_trailing == (30, 8, 576) and spec.chunk_trailing == (5, 8, 576)
    assert ArraySpec("y", (7, 2), "float32", chunk=(3, 2)).shard_trailing == (9, 2)  # whole chunks


@pytest.mark.parametrize("n_layers", range(1, 97))
def test_a_quarter_of_the_layers_touches_at_most_half_of_them(n_layers: int) -> None:
    """Any contiguous run of ceil(L/4) layers lies in chunks that hold at most L/2 layers, so a
    read of a quarter of the layers decodes at most half the bytes (from L = 4; below, one layer a
    chunk); and chunks stay few (zarr pays a fixed cost for each)."""
    lc = act_chunk_layers(n_layers, 8 * 8 * 576 * 2)
    groups = -(-n_layers // lc)
    quarter = -(-n_layers // 4)
    for start in range(n_layers - quarter + 1):
        touched = {layer // lc for layer in range(start, start + quarter)}
        assert len(touched) * lc <= max(n_layers / 2, lc), (n_layers, lc, start)
    assert groups <= (n_layers if n_layers < 8 else 10), (n_layers, lc)
    assert act_chunk_layers(n_layers, 64 << 20) == 1  # a chunk of one layer is already large
