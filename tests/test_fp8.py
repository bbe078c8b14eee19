"""FP8 simulation: formats bit for bit, scaling granularities, accumulation, Float8Linear, convert."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from moe import fp8
from moe.config import PRESETS, ModelConfig, parse_overrides
from moe.experts import Experts, experts_loop, sort_by_expert
from moe.layer import MoE
from moe.model import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")

TORCH = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
# torch's CPU casts: to e4m3fn saturates, to e5m2 overflows to inf (test_cpu_casts pins both)
SATURATES = {"e4m3": True, "e5m2": False}

TINY = PRESETS["toy"].replace(dim=32, n_layers=2, n_heads=2, max_seq_len=64, kv_lora_rank=16,
                              qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, inter_dim=64,
                              moe_inter_dim=16, n_routed_experts=4, n_activated_experts=2,
                              n_expert_groups=2, n_limited_groups=1)


def same_floats(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (so -0 != +0), NaN equal to NaN."""
    a, b = a.float(), b.float()
    nan = a.isnan()
    return bool(torch.equal(nan, b.isnan()) and torch.equal(a[~nan].view(torch.int32), b[~nan].view(torch.int32)))


def torch_cast(x: torch.Tensor, fmt: str) -> torch.Tensor:
    return x.to(TORCH[fmt]).float()


def ours(x: torch.Tensor, fmt: str) -> torch.Tensor:
    return fp8.round_to_format(x, *fp8.FORMATS[fmt], saturate=SATURATES[fmt])


# ------------------------------------------------------------------------------ formats
def test_cpu_casts_saturate_e4m3_and_overflow_e5m2():
    x = torch.tensor([448.0, 464.0, 465.0, 1e6, math.inf, -math.inf])
    assert torch_cast(x, "e4m3").tolist() == [448.0, 448.0, 448.0, 448.0, 448.0, -448.0]
    y = torch.tensor([57344.0, 61439.0, 61440.0, 1e6, math.inf])
    assert torch_cast(y, "e5m2").tolist() == [57344.0, 57344.0, math.inf, math.inf, math.inf]
    assert fp8.FMAX == {"e4m3": 448.0, "e5m2": 57344.0}


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_round_to_format_equals_torch_on_every_value_and_midpoint(fmt):
    values = torch.arange(256, dtype=torch.uint8).view(TORCH[fmt]).float()  # every code, NaN/inf included
    finite = values[torch.isfinite(values)].double().unique()
    mids = (finite[1:] + finite[:-1]) / 2  # ties: round half to even decides
    near = torch.cat([mids.nextafter(torch.tensor(math.inf, dtype=torch.float64)),
                      mids.nextafter(torch.tensor(-math.inf, dtype=torch.float64))])
    big = torch.tensor([480.0, 500.0, 6e4, 65536.0, 1e30, 3e38], dtype=torch.float64)
    x = torch.cat([values.double(), mids, near, big, -big]).float()
    assert len(finite) == (253 if fmt == "e4m3" else 247)  # 256 codes less NaNs (and inf), +-0 once
    assert same_floats(ours(x, fmt), torch_cast(x, fmt))


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@settings(max_examples=150, deadline=None)
@given(st.lists(st.floats(width=32), min_size=1, max_size=64), st.sampled_from([1e-6, 1e-3, 1.0, 1e3, 1e5]))
def test_round_to_format_equals_torch_on_random_floats(fmt, xs, scale):
    x = torch.tensor(xs, dtype=torch.float32)
    x = torch.cat([x, x * scale])
    assert same_floats(ours(x, fmt), torch_cast(x, fmt))


def test_saturate_switches_between_clamp_and_inf():
    x = torch.tensor([500.0, -1e9, math.inf, 100.0])
    assert fp8.round_to_format(x, 4, 3, saturate=True).tolist() == [448.0, -448.0, 448.0, 96.0]
    assert fp8.round_to_format(x, 4, 3, saturate=False).tolist() == [math.inf, -math.inf, math.inf, 96.0]
    assert fp8.round_to_format(torch.tensor([1e6]), 5, 2, saturate=True).item() == 57344.0


def test_subnormals_round_half_to_even():
    tiny = 2.0**-9  # E4M3's smallest subnormal
    x = torch.tensor([tiny, tiny / 2, tiny * 0.75, tiny * 1.5, tiny * 2.5, -tiny / 4])
    y = fp8.round_to_format(x, 4, 3)
    assert y[:5].tolist() == [tiny, 0.0, tiny, 2 * tiny, 2 * tiny]
    assert y[5].item() == 0.0 and math.copysign(1, y[5].item()) == -1  # -0 stays -0


def test_other_splits_and_bf16():
    e2m1 = fp8.round_to_format(torch.linspace(0, 8, 801), 2, 1).unique().tolist()
    assert e2m1 == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # OCP MX FP4
    assert fp8.format_max(3, 4) == 31.0 and fp8.format_max(3, 2) == 28.0 and fp8.format_max(2, 3) == 7.5
    assert fp8.format_max(4, 3, "ieee") == 240.0 and fp8.format_max(5, 2, "fn") == 98304.0
    assert fp8.format_max(8, 7) == torch.finfo(torch.bfloat16).max
    x = torch.randn(10_000) * torch.logspace(-30, 30, 10_000)
    assert same_floats(fp8.round_to_format(x, 8, 7, saturate=False), x.to(torch.bfloat16).float())
    assert same_floats(fp8.round_to_format(x, 5, 10, saturate=False), x.to(torch.float16).float())
    with pytest.raises(ValueError, match="exp_bits"):
        fp8.round_to_format(x, 9, 3)
    with pytest.raises(ValueError, match="style"):
        fp8.format_max(4, 3, "ocp")


# ------------------------------------------------------------------------------ scaling
SHAPES = {"tensor": (), "row": (3, 200, 1), "tile": (3, 200, 3), "block": (3, 2, 3)}


@pytest.mark.parametrize("granularity", fp8.GRANULARITIES)
def test_quantize_shapes_and_round_trip(granularity):
    x = torch.randn(3, 200, 300)  # 300 = 2 full tiles of 128 + 44: padded internally
    q, scale = fp8.quantize(x, "e4m3", granularity)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and q.is_contiguous()
    assert tuple(scale.shape) == SHAPES[granularity] and scale.dtype == torch.float32
    back = fp8.dequantize(q, scale, granularity)
    assert back.shape == x.shape
    assert fp8.sqnr_db(x, back) > 28  # E4M3 keeps 3 mantissa bits: about 31 dB on Gaussian data
    assert torch.equal(fp8.fake_quantize(x, "e4m3", granularity), back)
    assert q.float().abs().max() <= 448


def test_scales_equal_a_per_group_reference_loop():
    x = torch.randn(2, 150, 260) * torch.rand(2, 150, 1) * 10
    _, tile = fp8.quantize(x, "e5m2", "tile")
    _, block = fp8.quantize(x, "e4m3", "block")
    _, row = fp8.quantize(x, "e4m3", "row")
    for b in range(2):
        for r in range(0, 150, 37):
            assert row[b, r, 0] == x[b, r].abs().max() / 448
            for t in range(3):
                assert tile[b, r, t] == x[b, r, 128 * t:128 * (t + 1)].abs().max() / 57344
        for i in range(2):
            for j in range(3):
                assert block[b, i, j] == x[b, 128 * i:128 * (i + 1), 128 * j:128 * (j + 1)].abs().max() / 448


def test_an_outlier_only_coarsens_its_own_tile():
    torch.manual_seed(0)
    x = torch.randn(4, 256)
    x[1, 5] = 1e5  # beyond E4M3's range (448 / 2^-9): its scale pushes the rest of its group to subnormals
    exact = {g: fp8.fake_quantize(x, "e4m3", g) for g in ("tensor", "tile")}
    keep = [i for i in range(128) if i != 5]
    assert fp8.sqnr_db(x[1, keep], exact["tile"][1, keep]) < fp8.sqnr_db(x[0], exact["tile"][0]) - 10
    assert torch.equal(exact["tile"][[0, 2, 3]], fp8.fake_quantize(x[[0, 2, 3]], "e4m3", "tile"))
    assert torch.equal(exact["tile"][1, 128:], fp8.fake_quantize(x[1:2, 128:], "e4m3", "tile")[0])
    others = torch.ones_like(x, dtype=torch.bool)
    others[1, 5] = False
    assert fp8.sqnr_db(x[others], exact["tile"][others]) > fp8.sqnr_db(x[others], exact["tensor"][others]) + 5


@pytest.mark.parametrize("granularity", ["row", "tile"])
@pytest.mark.parametrize("shape", [(300, 70), (100, 70), (2, 256, 40)])
def test_scaling_down_the_columns_equals_quantising_the_transpose(granularity, shape):
    x = torch.randn(*shape)
    for fmt in ("e4m3", "e5m2"):
        columns = fp8._fake_quantize(x, fmt, granularity, along=-2)  # the fast path wgrad uses
        assert torch.equal(columns, fp8.fake_quantize(x.transpose(-1, -2), fmt, granularity).transpose(-1, -2))


def test_all_zero_blocks_stay_zero_without_nan():
    x = torch.zeros(130, 300)
    x[0, :10] = torch.arange(10.0)
    for g in fp8.GRANULARITIES:
        q, scale = fp8.quantize(x, "e4m3", g)
        back = fp8.dequantize(q, scale, g)
        assert torch.isfinite(scale).all() and (scale > 0).all()
        assert torch.isfinite(back).all() and torch.equal(back[1:], torch.zeros_like(back[1:]))
        assert fp8.sqnr_db(x[0, :10], back[0, :10]) > 25
    assert fp8.quantize(torch.zeros(4, 4), "e4m3", "row")[1].eq(fp8.AMAX_FLOOR / 448).all()


def test_pow2_scales_are_powers_of_two_and_never_saturate():
    x = torch.randn(64, 512) * torch.logspace(-3, 3, 64)[:, None]
    q, scale = fp8.quantize(x, "e4m3", "tile", pow2_scale=True)
    mantissa, _ = torch.frexp(scale)
    assert (mantissa == 0.5).all()
    amax = x.view(64, 4, 128).abs().amax(-1)
    assert (scale >= amax / 448).all() and (scale < 2 * amax / 448).all()
    assert q.float().abs().max() <= 448


def test_bad_arguments_are_named():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="granularity"):
        fp8.quantize(x, "e4m3", "column")
    with pytest.raises(ValueError, match="fmt"):
        fp8.quantize(x, "e3m4", "tile")
    with pytest.raises(ValueError, match="at least 2 dims"):
        fp8.quantize(torch.randn(8), "e4m3", "block")
    q, s = fp8.quantize(x, "e4m3", "tile", block=4)
    with pytest.raises(ValueError, match="scale has shape"):
        fp8.dequantize(q, s, "tile")  # block 128 would need one scale per row


# ------------------------------------------------------------------------------ accumulation
def fp8_values(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(torch.float8_e4m3fn).float()


def test_accumulation_with_many_bits_is_the_exact_sum():
    a, b = fp8_values(8, 1000), fp8_values(8, 1000, seed=1)
    exact = torch.tensor([math.fsum((a[i].double() * b[i].double()).tolist()) for i in range(8)], dtype=torch.float64)
    assert torch.equal(fp8.accumulate_dot(a, b, 52), exact)
    assert torch.equal(fp8.accumulate_dot(a, b, 52, rounding="nearest"), exact)
    assert torch.allclose(fp8.accumulate_dot(a, b, 52, promote_every=128), exact, rtol=1e-6)  # fp32 accumulator


def test_limited_accumulation_error_grows_and_promotion_fixes_it():
    a, b = fp8_values(64, 4096), fp8_values(64, 4096, seed=1)
    exact = (a.double() * b.double()).sum(-1)

    def err(**kw) -> float:
        return float((fp8.accumulate_dot(a, b, 14, **kw) - exact).norm() / exact.norm())

    plain, promoted, nearest = err(), err(promote_every=128), err(rounding="nearest")
    assert 3e-3 < plain < 5e-2  # DeepSeek: "nearly 2%" at K = 4096 with ~14 bits
    assert promoted < plain / 20
    assert nearest < plain / 5
    short = float((fp8.accumulate_dot(a[:, :256], b[:, :256], 14) - (a[:, :256].double() * b[:, :256]).sum(-1))
                  .norm() / (a[:, :256].double() * b[:, :256]).sum(-1).norm())
    assert short < plain  # the error grows with K
    odd = fp8.accumulate_dot(a[:, :300], b[:, :300], 52, promote_every=128)  # K not a multiple of N_C
    assert torch.allclose(odd, (a[:, :300].double() * b[:, :300]).sum(-1), rtol=1e-6)
    with pytest.raises(ValueError, match="mantissa_bits"):
        fp8.accumulate_dot(a, b, 0)


# ------------------------------------------------------------------------------ Float8Linear
def linear_pair(recipe: str = "blockwise", n_in: int = 384, n_out: int = 200, **kw):
    torch.manual_seed(0)
    ref = nn.Linear(n_in, n_out, bias=False)
    lin = fp8.Float8Linear(n_in, n_out, recipe=recipe, **kw)
    lin.load_state_dict(ref.state_dict())
    return ref, lin


def run(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(g)
    return y.detach(), x.grad, layer.weight.grad


def test_float8_linear_is_a_linear_with_the_same_state_dict():
    ref, lin = linear_pair()
    assert isinstance(lin, nn.Linear) and list(lin.state_dict()) == list(ref.state_dict()) == ["weight"]
    assert lin.weight.shape == (200, 384)
    biased = fp8.Float8Linear(8, 4, bias=True)
    biased.load_state_dict(nn.Linear(8, 4).state_dict())
    assert list(biased.state_dict()) == ["weight", "bias"]


@pytest.mark.parametrize("recipe", ["blockwise", "rowwise", "tensorwise"])
def test_sqnr_of_output_and_both_gradients(recipe):
    ref, lin = linear_pair(recipe)
    x, g = torch.randn(3, 170, 384), torch.randn(3, 170, 200)  # 510 tokens, dims not multiples of 128
    for a, b in zip(run(ref, x, g), run(lin, x, g)):
        assert fp8.sqnr_db(a, b) >= 25  # torchao's bar for its blockwise FP8 linear
    _, lin5 = linear_pair(recipe, grad_fmt="e5m2")
    y5, gx5, gw5 = run(lin5, x, g)
    _, gx_ref, gw_ref = run(ref, x, g)
    assert 20 < fp8.sqnr_db(gx_ref, gx5) < fp8.sqnr_db(gx_ref, run(lin, x, g)[1])  # E5M2: 1 mantissa bit less


def test_straight_through_with_identity_quantisation_equals_linear(monkeypatch):
    monkeypatch.setattr(fp8, "_fq", lambda t, fmt, granularity, batch=0, along=-1: t.float())
    ref, lin = linear_pair()
    x, g = torch.randn(64, 384), torch.randn(64, 200)
    for a, b in zip(run(ref, x, g), run(lin, x, g)):
        assert torch.equal(a, b)


def test_recipe_none_is_exactly_linear():
    ref, lin = linear_pair("none")
    x, g = torch.randn(64, 384), torch.randn(64, 200)
    for a, b in zip(run(ref, x, g), run(lin, x, g)):
        assert torch.equal(a, b)


def test_blockwise_gemms_quantise_as_deepseek():
    """fprop: x in 1x128 tiles, W in 128x128 blocks; dgrad: dy tiles, the same W blocks; wgrad: dy
    and x re-quantised from high precision in tiles along the tokens."""
    ref, lin = linear_pair()
    x, g = torch.randn(256, 384), torch.randn(256, 200)
    y, gx, gw = run(lin, x, g)
    fq = fp8.fake_quantize
    w_blocks = fq(ref.weight.detach(), "e4m3", "block")
    assert torch.allclose(y, fq(x, "e4m3", "tile") @ w_blocks.t(), rtol=0, atol=1e-5)
    assert torch.allclose(gx, fq(g, "e4m3", "tile") @ w_blocks, rtol=0, atol=1e-5)
    want = fq(g.t(), "e4m3", "tile") @ fq(x.t(), "e4m3", "tile").t()
    assert torch.allclose(gw, want, rtol=0, atol=1e-5)
    transposed_copy = fq(g.t(), "e4m3", "tile") @ fq(x, "e4m3", "tile")  # the shortcut we do not take
    assert not torch.allclose(gw, transposed_copy, rtol=0, atol=1e-5)


def test_scaled_mm_backend_equals_the_simulation_on_cpu():
    x, g = torch.randn(96, 384), torch.randn(96, 208)
    for recipe in ("tensorwise", "rowwise"):
        _, sim = linear_pair(recipe, n_out=208)
        _, real = linear_pair(recipe, n_out=208, backend="scaled_mm")
        for a, b in zip(run(sim, x, g), run(real, x, g)):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="backend 'scaled_mm' supports"):
        fp8.Float8Linear(8, 8, recipe="blockwise", backend="scaled_mm")
    with pytest.raises(ValueError, match="recipe must be one of"):
        fp8.Float8Linear(8, 8, recipe="int8")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_scaled_mm_on_cuda_matches_the_simulation():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 GEMMs need compute capability 8.9+")
    x, g = torch.randn(128, 384, device="cuda"), torch.randn(128, 208, device="cuda")
    for recipe in ("tensorwise", "rowwise"):
        _, sim = linear_pair(recipe, n_out=208)
        _, real = linear_pair(recipe, n_out=208, backend="scaled_mm")
        for a, b in zip(run(sim.cuda(), x, g), run(real.cuda(), x, g)):
            assert fp8.sqnr_db(a, b) > 60  # same quantised operands; only the summation order differs


def test_from_linear_shares_parameters_and_draws_no_random_numbers():
    ref = nn.Linear(16, 8)
    state = torch.get_rng_state()
    lin = fp8.Float8Linear.from_linear(ref, "rowwise")
    assert torch.equal(state, torch.get_rng_state())
    assert lin.weight is ref.weight and lin.bias is ref.bias and lin.recipe.name == "rowwise"


# ------------------------------------------------------------------------------ experts and convert
def test_experts_fp8_equal_the_loop_reference_with_identity_quantisation(monkeypatch):
    cfg = TINY.replace(moe_inter_dim=24)
    torch.manual_seed(0)
    ex = Experts(cfg)
    for w in (ex.w1, ex.w3, ex.w2):
        nn.init.normal_(w, std=0.1)
    x = torch.randn(40, cfg.dim)
    experts_TK = torch.stack([torch.randperm(4)[:2] for _ in range(40)])
    weights_TK = torch.rand(40, 2)

    def forward():
        ex.zero_grad()
        xr = x.clone().requires_grad_()
        y, _, _ = ex(xr, weights_TK, experts_TK)
        y.square().sum().backward()
        return y.detach(), xr.grad, ex.w1.grad.clone(), ex.w3.grad.clone(), ex.w2.grad.clone()

    ex.fp8 = None
    ex.cfg = dataclasses.replace(cfg, expert_impl="loop")
    reference = forward()
    monkeypatch.setattr(fp8, "_fq", lambda t, fmt, granularity, batch=0, along=-1: t.float())
    ex.fp8 = fp8.make_recipe("blockwise")
    for a, b in zip(reference, forward()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_experts_fp8_quantise_each_expert_per_block():
    cfg = TINY.replace(dim=160, moe_inter_dim=136)  # blocks that need padding
    torch.manual_seed(0)
    w1, w3, w2 = torch.randn(4, 160, 136), torch.randn(4, 160, 136), torch.randn(4, 136, 160)
    w1[2] *= 1000  # one expert's scale must not leak into the others
    x = torch.randn(30, cfg.dim)
    experts_TK = torch.stack([torch.randperm(4)[:2] for _ in range(30)])
    d = sort_by_expert(experts_TK, 4)
    x_ND = x[d.order_N // 2]
    scale_N = torch.rand(len(d.order_N))
    got = fp8.experts_fp8(x_ND, d.counts_E, w1, w3, w2, scale_N, fp8.make_recipe("blockwise"))
    fq = fp8.fake_quantize
    want = []
    for e, (x_n, s_n) in enumerate(zip(x_ND.split(d.counts_E.tolist()), scale_N.split(d.counts_E.tolist()))):
        xq = fq(x_n, "e4m3", "tile")
        h = F.silu(xq @ fq(w1[e].t(), "e4m3", "block").t()) * (xq @ fq(w3[e].t(), "e4m3", "block").t())
        want.append(fq(h * s_n[:, None], "e4m3", "tile") @ fq(w2[e].t(), "e4m3", "block").t())
    assert torch.allclose(got, torch.cat(want), rtol=1e-4, atol=1e-3)
    reference = experts_loop(x_ND, d.counts_E, w1, w3, w2) * scale_N[:, None]
    assert fp8.sqnr_db(reference, got) > 20


def test_convert_swaps_the_deepseek_set_and_keeps_the_state_dict():
    cfg = TINY.replace(n_mtp=1, q_lora_rank=16)
    torch.manual_seed(0)
    plain = Transformer(cfg)
    torch.manual_seed(0)
    converted = Transformer(cfg.replace(fp8="blockwise"))
    assert list(plain.state_dict()) == list(converted.state_dict())
    for (k, a), b in zip(plain.state_dict().items(), converted.state_dict().values()):
        assert torch.equal(a, b), k  # same init: conversion draws no random numbers
    swapped = {n for n, m in converted.named_modules() if isinstance(m, fp8.Float8Linear)}
    linears = {n for n, m in plain.named_modules() if isinstance(m, nn.Linear)}
    assert linears - swapped == {"head"}  # the output head stays high precision
    assert {"layers.0.attn.wq_a", "layers.0.attn.wkv_b", "layers.0.ffn.w1", "layers.1.ffn.shared.w2",
            "mtp.0.proj", "mtp.0.block.attn.wo"} <= swapped
    experts = [m for m in converted.modules() if isinstance(m, Experts)]
    assert experts and all(m.fp8 == fp8.Recipe("blockwise") for m in experts)
    assert all(type(m.router).__name__ == "Router" for m in converted.modules() if hasattr(m, "router"))
    fp8.convert(converted, "none")  # and back: plain GEMMs again
    x = torch.randint(0, 256, (2, 16))
    assert torch.equal(plain(x)[0], converted(x)[0])


def test_converted_model_stays_close_to_fp32():
    torch.manual_seed(0)
    plain = Transformer(TINY)
    torch.manual_seed(0)
    quant = Transformer(TINY.replace(fp8="blockwise"))
    x = torch.randint(0, 256, (2, 32))
    assert 15 < fp8.sqnr_db(plain(x)[0], quant(x)[0]) < 60  # quantised, but not broken


def test_config_field_and_cli_override():
    assert ModelConfig().fp8 == "none"
    assert parse_overrides(["fp8=blockwise"]) == {"fp8": "blockwise"}
    for name in fp8.RECIPES:
        ModelConfig(fp8=name)
    with pytest.raises(ValueError, match="fp8 must be one of"):
        ModelConfig(fp8="e4m3")


@pytest.mark.slow
def test_fp8_run_trains_saves_loads_and_generates(tmp_path):
    from moe.checkpoint import load_model, read_metrics
    from moe.generate import generate
    from moe.train import TrainConfig, train

    tc = TrainConfig(out=str(tmp_path / "fp8"), steps=30, batch_size=4, seq_len=32, lr=1e-2, min_lr=1e-3,
                     warmup_steps=3, eval_interval=30, eval_windows=4, device="cpu", progress=False, plots=False,
                     threads=1)
    result = train(tc, TINY.replace(fp8="blockwise"))
    losses = [r["ce"] for r in read_metrics(tc.out)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    model, ckpt = load_model(tc.out)
    assert model.cfg.fp8 == "blockwise" and isinstance(model.layers[0].attn.wq, fp8.Float8Linear)
    for k, v in result.model.state_dict().items():
        assert torch.equal(v.cpu(), model.state_dict()[k]), k
    out = generate(model, [65, 66], 10, temperature=0.0)
    assert len(out) == 10 and all(0 <= t < 256 for t in out)


@pytest.mark.slow
def test_experiment_quick_writes_figures_and_results(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "fp8.py"
    spec = importlib.util.spec_from_file_location("fp8_experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--out", str(tmp_path), "--quick"]) == 0
    for name in ("granularity.png", "accumulation.png", "training.png", "memory.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["accum_err_k4096"] > 10 * res["accum_err_k4096_promoted"]
    assert 1e-3 < res["accum_err_k4096"] < 0.1
    assert abs(res["gap_rel_blockwise"]) < 0.05  # a few steps: every recipe still near the initial loss
    sq = res["granularity"]["sqnr_db"]
    assert sq["tile e4m3"][-1] > sq["tensor e4m3"][-1] + 5  # the biggest outliers: tiles win
    assert {r["recipe"] for r in res["training"]["runs"]} == {"none", "bf16", "blockwise", "tensorwise"}
    assert 0.74 < res["memory"]["weight_saving_fp8_vs_fp32"] < 0.75
    assert 0.1 < res["memory"]["train_state_saving_deepseek_vs_fp32_adamw"] < 0.15


def _ep_fp8_layer(rank: int, world: int) -> dict:
    from moe import parallel

    from .test_parallel import LAYER_CFG

    ps = parallel.setup("ep", None, torch.device("cpu"), timeout_s=60)
    torch.manual_seed(0)
    layer = ps.parallelize(fp8.convert(MoE(LAYER_CFG.replace(dim=160)), "blockwise"))
    x = torch.randn(world * 2, 40, 160, generator=torch.Generator().manual_seed(1))[2 * rank:2 * rank + 2]
    x.requires_grad_()
    y, _ = layer(x)
    y.square().sum().backward()
    out = {"y": y.detach(), "gx": x.grad, "fp8": layer.experts.fp8}
    parallel.teardown(ps)
    return out


@pytest.mark.slow
def test_expert_parallel_keeps_the_fp8_recipe(tmp_path):
    from .test_parallel import LAYER_CFG, run_ranks

    ranks = run_ranks(2, _ep_fp8_layer, tmp_path=tmp_path)
    torch.manual_seed(0)
    layer = fp8.convert(MoE(LAYER_CFG.replace(dim=160)), "blockwise")
    x = torch.randn(4, 40, 160, generator=torch.Generator().manual_seed(1)).requires_grad_()
    y, _ = layer(x)
    y.square().sum().backward()
    assert all(r["fp8"] == fp8.Recipe("blockwise") for r in ranks)
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["gx"] for r in ranks]), x.grad, rtol=1e-4, atol=1e-5)
