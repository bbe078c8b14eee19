"""FP8 training, simulated at DeepSeek-V3's granularity (technical report, section 3.3).

Shapes: T tokens, K the reduction dim of a GEMM, N its output dim, E experts, D model dim,
I expert width. Every GEMM here is C_TN = A_TK @ B_NK^T with both operands scaled along K:
a scale may change only between K-slices (where partial sums leave the tensor core), never
inside one. A linear layer y = x W^T (W: [out, in]) runs three of them:
    fprop  y_TN  = x_TK   @ W_NK^T           (K = in features)
    dgrad  dx_TK = dy_TN  @ (W^T)_KN^T       (K = out features)
    wgrad  dW_NK = dy^T_NT @ (x^T)_KT^T      (K = tokens: dy and x are scaled along the tokens)

What each piece models in the report:
  round_to_format   the number formats, as pure arithmetic: E4M3 (DeepSeek uses it for every
                    tensor, section 3.3.2 "mantissa over exponents"), E5M2 (the gradient format of
                    the usual hybrid recipe), or any other split; round half to even, subnormals,
                    saturation or overflow to inf.
  quantize          scaling (3.3.2 "fine-grained quantization"): one fp32 scale per tensor, per
                    row, per 1x128 tile (DeepSeek's activations and gradients) or per 128x128 block
                    (DeepSeek's weights). The scale is the current amax / the format's max
                    ("online quantization": no amax history, no delayed scaling).
  accumulate_dot    tensor-core accumulation that keeps ~14 bits (3.3.2 "increasing accumulation
                    precision"), and the fix: partial sums promoted to fp32 every N_C = 128 products.
  Float8Linear      the three GEMMs of a linear layer with fake-quantised inputs (3.3.1, Figure 6:
                    Fprop, Dgrad and Wgrad in FP8; master weights, gradients and outputs stay fp32).
  convert           which layers run in FP8 (3.3.1): attention projections, dense FFNs, shared and
                    routed experts; embedding, output head, router and norms stay high precision.

Fake quantisation = quantise, then dequantise to fp32: the GEMM multiplies exactly the values an
FP8 GEMM would, and sums them in fp32 (the promoted accumulation; accumulate_dot shows the
unpromoted one). That is the only way on a CPU: torch 2.13 runs `torch._scaled_mm` there with
tensor-wise and row-wise scales but rejects block scales. `Float8Linear(backend="scaled_mm")` is
the real path for tensorwise/rowwise (tested on CPU against the simulation; not run on a GPU).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

BLOCK = 128  # DeepSeek-V3: 1x128 tiles, 128x128 blocks, promotion every N_C = 128 products
FORMATS = {"e4m3": (4, 3), "e5m2": (5, 2)}  # (exponent bits, mantissa bits)
DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
GRANULARITIES = ("tensor", "row", "tile", "block")
AMAX_FLOOR = 1e-12  # an all-zero group gets scale AMAX_FLOOR / fmax: no 0/0, its zeros stay zeros


# ---------------------------------------------------------------------------- number formats
def _style(exp_bits: int, style: str) -> str:
    if style == "auto":  # the convention of the standard formats of each width
        return "ieee" if exp_bits >= 5 else "fn" if exp_bits == 4 else "finite"
    if style not in ("ieee", "fn", "finite"):
        raise ValueError(f"style must be one of 'auto', 'ieee', 'fn', 'finite', got {style!r}")
    return style


def _check_format(exp_bits: int, man_bits: int, style: str) -> None:
    if not (isinstance(exp_bits, int) and 2 <= exp_bits <= 8):
        raise ValueError(f"exp_bits must be an integer in [2, 8] (values must fit fp32), got {exp_bits!r}")
    if not (isinstance(man_bits, int) and 0 <= man_bits <= 23):
        raise ValueError(f"man_bits must be an integer in [0, 23] (values must fit fp32), got {man_bits!r}")
    if style == "fn" and man_bits == 0:
        raise ValueError("style 'fn' needs man_bits >= 1 (its all-ones mantissa is the NaN code)")


def format_max(exp_bits: int, man_bits: int, style: str = "auto") -> float:
    """Largest finite value of a sign + exp_bits + man_bits format (bias 2^(exp_bits-1) - 1).

    style: "ieee" reserves the top exponent for inf/NaN (E5M2, fp16, bf16: 57344 for E5M2);
    "fn" keeps it for numbers except the all-ones NaN code (E4M3FN: 448); "finite" has no
    inf/NaN at all (OCP MX E2M1, E3M2, E2M3: 6, 28, 7.5). "auto": ieee for 5+ exponent bits,
    fn for 4, finite for 2-3, which is what the standard formats of those widths do.
    """
    style = _style(exp_bits, style)
    _check_format(exp_bits, man_bits, style)
    top = 2**exp_bits - 1 - (2 ** (exp_bits - 1) - 1)  # the all-ones exponent code, unbiased
    if style == "ieee":
        return 2.0 ** (top - 1) * (2 - 2.0**-man_bits)
    if style == "fn":
        return 2.0**top * (2 - 2.0 ** (1 - man_bits))
    return 2.0**top * (2 - 2.0**-man_bits)


def round_to_format(x: torch.Tensor, exp_bits: int, man_bits: int, saturate: bool = True,
                    style: str = "auto") -> torch.Tensor:
    """x rounded to the nearest value of the format (ties to even), as fp32 (fp64 for fp64 input).

    Pure arithmetic, the reference the fast casts are tested against: write |x| = 1.f * 2^e; keep
    man_bits bits of f, where e is at least the smallest normal exponent (below it the values are
    subnormal and share its step); round half to even. Out of range (|result| > format_max, inf
    included): saturate=True clamps to +-max, as torch's CPU cast to float8_e4m3fn does;
    saturate=False gives +-inf, as its cast to float8_e5m2 does (for formats without an inf code
    the inf marks the overflow). NaN stays NaN, -0 stays -0. Computed in fp64, so every step is exact.
    """
    max_value = format_max(exp_bits, man_bits, style)
    x64 = x.double()
    _, e = torch.frexp(x64)  # x = m * 2^e with 0.5 <= |m| < 1: the leading bit weighs 2^(e-1)
    lead = (e - 1).clamp_min(2 - 2 ** (exp_bits - 1))  # 1 - bias: subnormals use the smallest normal's step
    step = lead - man_bits  # weight of the last kept bit
    y = torch.ldexp(torch.round(torch.ldexp(x64, -step)), step)  # torch.round: half to even
    limit = torch.tensor(max_value if saturate else math.inf, dtype=torch.float64)
    y = torch.where(y.abs() > max_value, torch.copysign(limit, x64), y)
    return y if x.dtype == torch.float64 else y.float()


# ---------------------------------------------------------------------------- scaling
def _fmt(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {list(FORMATS)}, got {fmt!r}")
    return fmt


FMAX = {fmt: format_max(*bits) for fmt, bits in FORMATS.items()}  # 448 (E4M3), 57344 (E5M2)


def _check_granularity(x: torch.Tensor, granularity: str, block: int) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {list(GRANULARITIES)}, got {granularity!r}")
    if not (isinstance(block, int) and block > 0):
        raise ValueError(f"block must be a positive integer, got {block!r}")
    need = {"tensor": 0, "row": 1, "tile": 1, "block": 2}[granularity]
    if x.dim() < need:
        raise ValueError(f"granularity {granularity!r} needs a tensor of at least {need} dims, got {tuple(x.shape)}")


def _grouped(x: torch.Tensor, granularity: str, block: int, batch: int = 0,
             along: int = -1) -> tuple[torch.Tensor, tuple[int, ...]]:
    """x (zero-padded to whole blocks) viewed so that each scaling group spans `dims`.

    batch: leading dims that keep separate scales under "tensor" (a stack of expert weights).
    along=-2: rows and tiles run down the columns instead, i.e. the groups of x^T, with no
    transposed copy (wgrad scales dy and x along the tokens this way).
    """
    x = x.contiguous()
    if granularity == "tensor":
        return x, tuple(range(batch, x.dim()))
    if granularity == "row":
        return x, (along,)
    cols, rows = x.shape[-1], x.shape[-2] if x.dim() > 1 else 1
    if granularity == "tile" and along == -2:
        if rows <= block:  # one tile per column: the column itself
            return x, (-2,)
        x = F.pad(x, (0, 0, 0, -rows % block)) if rows % block else x
        return x.view(*x.shape[:-2], x.shape[-2] // block, block, cols), (-2,)
    if granularity == "tile":
        if cols <= block:  # one tile per row: the row itself, no padding needed
            return x, (-1,)
        x = F.pad(x, (0, -cols % block)) if cols % block else x
        return x.view(*x.shape[:-1], x.shape[-1] // block, block), (-1,)
    if rows <= block and cols <= block:  # one block per matrix
        return x, (-2, -1)
    x = F.pad(x, (0, -cols % block, 0, -rows % block)) if cols % block or rows % block else x
    *lead, Mp, Kp = x.shape
    return x.view(*lead, Mp // block, block, Kp // block, block), (-3, -1)


def _ungrouped(xg: torch.Tensor, shape: torch.Size, granularity: str, along: int = -1) -> torch.Tensor:
    """Undo _grouped: back to the padded layout, then crop the padding."""
    if xg.shape == shape:  # tensor, row, and the single-tile / single-block cases
        return xg
    if granularity == "tile" and along == -2:
        return xg.flatten(-3, -2)[..., :shape[-2], :]
    if granularity == "tile":
        return xg.flatten(-2)[..., :shape[-1]]
    *lead, Mb, b, Kb, b2 = xg.shape
    return xg.reshape(*lead, Mb * b, Kb * b2)[..., :shape[-2], :shape[-1]]


def _scale(amax: torch.Tensor, max_value: float, pow2_scale: bool) -> torch.Tensor:
    """amax / fmax, floored; pow2_scale rounds it up to a power of two (so nothing saturates)."""
    scale = amax.clamp_min(AMAX_FLOOR) / max_value
    if pow2_scale:
        m, e = torch.frexp(scale)  # scale = m * 2^e, 0.5 <= m < 1: the next power of two up is 2^e ...
        scale = torch.ldexp(torch.ones_like(scale), e - (m == 0.5).int())  # ... unless it is one already
    return scale


def _quantize_grouped(x: torch.Tensor, fmt: str, granularity: str, block: int, pow2_scale: bool,
                      batch: int = 0, along: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) in the grouped view of _grouped, scale with keepdim (broadcasts against q)."""
    xg, dims = _grouped(x.float(), granularity, block, batch, along)
    scale = _scale(xg.abs().amax(dim=dims, keepdim=True), FMAX[fmt], pow2_scale)
    # |x| / scale <= fmax by construction, so the cast never saturates or overflows, on any device
    return (xg / scale).to(DTYPES[fmt]), scale


def quantize(x: torch.Tensor, fmt: str = "e4m3", granularity: str = "tensor", block: int = BLOCK,
             pow2_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) with x ~ q * scale: q a float8 tensor of x's shape, scale fp32 (>= AMAX_FLOOR / fmax).

    granularity, the group that shares one scale = its amax / fmax, and the shape of scale:
      "tensor"  the whole tensor                          ()
      "row"     each row of the last dim                  x.shape[:-1] + (1,)
      "tile"    1 x block along the last dim (DeepSeek's  x.shape[:-1] + (ceil(K / block),)
                activations: per token, per 128 channels)
      "block"   block x block over the last two dims      x.shape[:-2] + (ceil(M / block), ceil(K / block))
                (DeepSeek's weights; leading dims such as experts are batched)
    A last tile or block that does not fill `block` is zero-padded internally (the zeros never
    raise an amax). pow2_scale rounds every scale up to a power of two, so rescaling is exact.
    """
    _check_granularity(x, granularity, block)
    qg, scale = _quantize_grouped(x, _fmt(fmt), granularity, block, pow2_scale)
    blocks = lambda n: math.ceil(x.shape[n] / block)  # noqa: E731
    shape = {"tensor": (), "row": (*x.shape[:-1], 1), "tile": (*x.shape[:-1], blocks(-1)),
             "block": (*x.shape[:-2], blocks(-2), blocks(-1))}[granularity]
    return _ungrouped(qg, x.shape, granularity).contiguous(), scale.reshape(shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, granularity: str, block: int = BLOCK) -> torch.Tensor:
    """q * scale as fp32, each scale spread over its group; the inverse of quantize up to rounding."""
    _check_granularity(q, granularity, block)
    if granularity == "tile":
        want = (*q.shape[:-1], math.ceil(q.shape[-1] / block))
    elif granularity == "block":
        want = (*q.shape[:-2], math.ceil(q.shape[-2] / block), math.ceil(q.shape[-1] / block))
    else:
        want = () if granularity == "tensor" else (*q.shape[:-1], 1)
    if tuple(scale.shape) != want:
        raise ValueError(f"scale has shape {tuple(scale.shape)}; granularity {granularity!r} with block "
                         f"{block} needs {want} for q of shape {tuple(q.shape)}")
    if granularity == "tile":
        scale = scale.repeat_interleave(block, -1)[..., :q.shape[-1]]
    elif granularity == "block":
        scale = scale.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :q.shape[-2], :q.shape[-1]]
    return q.float() * scale


def _as_float16(q: torch.Tensor, fmt: str) -> tuple[torch.Tensor, float]:
    """(h, f) with q.float() == h.float() * f: every E5M2 value is an fp16 value (its top byte) and
    every E4M3 value is one times 2^8. Bit moves, because torch's CPU float8 -> fp32 cast goes one
    element at a time (about 5x slower than the rest of fake_quantize together)."""
    h = q.view(torch.int8).to(torch.int16)  # sign-extended: bits 15..8 copy the sign
    if fmt == "e5m2":
        return h.bitwise_left_shift_(8).view(torch.float16), 1.0
    # s eeee mmm -> s 0eeee mmm0000000: fp16's exponent bias (15) is 8 more than E4M3's (7)
    return h.bitwise_left_shift_(7).bitwise_and_(_E4M3_TO_FP16_MASK).view(torch.float16), 256.0


_E4M3_TO_FP16_MASK = torch.tensor(~0x4000, dtype=torch.int16)  # clears bit 14, a copy of the sign


def fake_quantize(x: torch.Tensor, fmt: str = "e4m3", granularity: str = "tensor", block: int = BLOCK,
                  pow2_scale: bool = False) -> torch.Tensor:
    """dequantize(*quantize(x, ...)) in one pass over the grouped view: the values an FP8 GEMM sees."""
    _check_granularity(x, granularity, block)
    return _fake_quantize(x, _fmt(fmt), granularity, block, pow2_scale)


def _fake_quantize(x: torch.Tensor, fmt: str, granularity: str, block: int = BLOCK, pow2_scale: bool = False,
                   batch: int = 0, along: int = -1) -> torch.Tensor:
    """fake_quantize without the checks; along=-2 equals _fake_quantize(x^T, ...)^T, without copies."""
    qg, scale = _quantize_grouped(x, fmt, granularity, block, pow2_scale, batch, along)
    h, factor = _as_float16(qg, fmt)
    return _ungrouped(h * (scale * factor), x.shape, granularity, along)  # fp16 * fp32 -> fp32, exact


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio, 20 log10(|ref| / |ref - approx|), in dB (inf if equal)."""
    ref, approx = ref.detach().double(), approx.detach().double()
    noise = (ref - approx).norm()
    return math.inf if noise == 0 else float(20 * torch.log10(ref.norm() / noise))


# ---------------------------------------------------------------------------- accumulation
def _round_bits(v: torch.Tensor, mantissa_bits: int, rounding: str) -> torch.Tensor:
    """v (fp64) kept to mantissa_bits bits after the leading one; exponent unbounded."""
    m, e = torch.frexp(v)
    kept = torch.ldexp(m, torch.tensor(mantissa_bits + 1, dtype=torch.int32))
    kept = torch.round(kept) if rounding == "nearest" else torch.trunc(kept)
    return torch.ldexp(kept, e - (mantissa_bits + 1))


def _limited_sum(p: torch.Tensor, mantissa_bits: int, rounding: str) -> torch.Tensor:
    """Sum p along its last dim in order, rounding the running sum after every addition."""
    s = p.new_zeros(p.shape[:-1])
    for k in range(p.shape[-1]):  # a loop over K, each step vectorised over every row (and chunk)
        s = _round_bits(s + p[..., k], mantissa_bits, rounding)
    return s


def accumulate_dot(a: torch.Tensor, b: torch.Tensor, mantissa_bits: int, promote_every: int | None = None,
                   rounding: str = "truncate") -> torch.Tensor:
    """sum_k a[..., k] * b[..., k] as an FP8 tensor core would add it up, per row; fp64 result.

    Products are exact (two FP8 values multiply exactly in 8 bits), the running sum keeps only
    `mantissa_bits` bits after its leading one. DeepSeek measured about 14 on H800 tensor cores
    and a relative error of nearly 2% for K = 4096. rounding="truncate" (drop the low bits, the
    default) reproduces that size of error; "nearest" is about 30x more accurate, so the
    hardware's dropped bits are modelled as a truncation (an assumption consistent with the
    report, not a documented property of the hardware).
    promote_every = N_C: the fix of section 3.3.2. Each run of N_C products is summed on the
    tensor core as above (from zero), then added to an fp32 accumulator on the CUDA cores (where
    DeepSeek also applies the per-128 dequantisation scales). N_C = 128 = 4 WGMMAs in the report.
    """
    if not (isinstance(mantissa_bits, int) and 1 <= mantissa_bits <= 52):
        raise ValueError(f"mantissa_bits must be an integer in [1, 52], got {mantissa_bits!r}")
    if rounding not in ("truncate", "nearest"):
        raise ValueError(f"rounding must be 'truncate' or 'nearest', got {rounding!r}")
    p = a.double() * b.double()  # [..., K]
    if promote_every is None:
        return _limited_sum(p, mantissa_bits, rounding)
    if not (isinstance(promote_every, int) and promote_every > 0):
        raise ValueError(f"promote_every must be a positive integer or None, got {promote_every!r}")
    p = F.pad(p, (0, -p.shape[-1] % promote_every))  # zeros leave a partial sum unchanged
    partial = _limited_sum(p.view(*p.shape[:-1], -1, promote_every), mantissa_bits, rounding)  # all chunks at once
    acc = torch.zeros(partial.shape[:-1], dtype=torch.float32, device=p.device)
    for c in range(partial.shape[-1]):  # the fp32 accumulator, one promotion after another
        acc = acc + partial[..., c].float()
    return acc.double()


# ---------------------------------------------------------------------------- recipes
class Recipe(NamedTuple):
    """How the GEMMs of a layer are fake-quantised."""

    name: str  # "blockwise", "rowwise", "tensorwise", "bf16" (a key of GEMMS)
    fmt: str = "e4m3"  # activations and weights
    grad_fmt: str = "e4m3"  # output gradients (DeepSeek: E4M3 everywhere; the hybrid recipe: "e5m2")


# recipe -> GEMM -> granularity of (A, B) in C_TN = A_TK @ B_NK^T, both scaled along K
GEMMS: dict[str, dict[str, tuple[str | None, str | None]]] = {
    # DeepSeek-V3: activations and gradients in 1x128 tiles along K, weights in 128x128 blocks
    # (which serve W and W^T alike); for wgrad both operands are tiled along the tokens
    "blockwise": {"fprop": ("tile", "block"), "dgrad": ("tile", "block"), "wgrad": ("tile", "tile")},
    # one scale per row of each operand along K (torchao's rowwise recipe)
    "rowwise": {"fprop": ("row", "row"), "dgrad": ("row", "row"), "wgrad": ("row", "row")},
    # one scale per tensor (per-tensor scaling, as the first FP8 training recipes)
    "tensorwise": {"fprop": ("tensor", "tensor"), "dgrad": ("tensor", "tensor"), "wgrad": ("tensor", "tensor")},
    # the baseline simulated the same way: GEMM inputs rounded to bf16, no scales, fp32 accumulation
    "bf16": {"fprop": (None, None), "dgrad": (None, None), "wgrad": (None, None)},
}
RECIPES = ("none", *GEMMS)  # ModelConfig.fp8 accepts these


def make_recipe(name: str, fmt: str = "e4m3", grad_fmt: str = "e4m3") -> Recipe | None:
    """A validated Recipe (None for "none": a plain high-precision linear)."""
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {list(RECIPES)}, got {name!r}")
    if name == "none":
        return None
    if name == "bf16":
        return Recipe("bf16", "bf16", "bf16")
    for flag, f in (("fmt", fmt), ("grad_fmt", grad_fmt)):
        if f not in FORMATS:
            raise ValueError(f"{flag} must be one of {list(FORMATS)}, got {f!r}")
    return Recipe(name, fmt, grad_fmt)


def _fq(t: torch.Tensor, fmt: str, granularity: str | None, batch: int = 0, along: int = -1) -> torch.Tensor:
    """A GEMM operand as the low-precision GEMM sees it, in fp32 (along=-2: scaled down the columns)."""
    if granularity is None:  # bf16: round to nearest even, no scale (the same as round_to_format(t, 8, 7))
        return t.to(torch.bfloat16).float()
    return _fake_quantize(t, fmt, granularity, batch=batch, along=along)


def quantize_weight(w_NK: torch.Tensor, recipe: Recipe, dgrad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W as fprop sees it and W as dgrad sees it (both [..., N, K]; the same tensor when the
    granularity ignores transposition: 128x128 blocks, one scale, none). Leading dims are a
    stack of experts, each quantised on its own. dgrad=False skips the second (no backward)."""
    with torch.no_grad():
        g_fprop, g_dgrad = GEMMS[recipe.name]["fprop"][1], GEMMS[recipe.name]["dgrad"][1]
        batch = w_NK.dim() - 2
        if g_fprop == "block" and not w_NK.is_contiguous() and w_NK.mT.is_contiguous():
            w_fprop = _fq(w_NK.mT, recipe.fmt, "block", batch).mT  # blocks are square: quantise the storage
        else:
            w_fprop = _fq(w_NK, recipe.fmt, g_fprop, batch)
        if not dgrad:
            return w_fprop, None
        if g_fprop == g_dgrad and g_fprop != "row":
            return w_fprop, w_fprop
        return w_fprop, _fq(w_NK, recipe.fmt, g_dgrad, batch, along=-2)  # W^T's rows: W's columns


class _QuantMM(torch.autograd.Function):
    """y_TN = x_TK W_NK^T with the inputs of all three GEMMs fake-quantised; straight-through.

    Saved for backward: x in high precision (wgrad re-quantises it along the tokens, never from
    a copy tiled along K) and W as dgrad sees it. Everything is fp32.
    """

    @staticmethod
    def forward(ctx, x_TK, w_NK, recipe):
        gemms = GEMMS[recipe.name]
        w_fprop, w_dgrad = quantize_weight(w_NK, recipe, dgrad=ctx.needs_input_grad[0])
        ctx.recipe = recipe
        ctx.save_for_backward(x_TK, w_dgrad)
        return _fq(x_TK, recipe.fmt, gemms["fprop"][0]) @ w_fprop.t()

    @staticmethod
    def backward(ctx, g_TN):
        x_TK, w_dgrad = ctx.saved_tensors
        r, gemms = ctx.recipe, GEMMS[ctx.recipe.name]
        g_TN = g_TN.float()
        gx = gw = None
        if ctx.needs_input_grad[0]:  # dgrad: K = N here, dy tiled along the output features
            gx = _fq(g_TN, r.grad_fmt, gemms["dgrad"][0]) @ w_dgrad
        if ctx.needs_input_grad[1]:  # wgrad: K = tokens, dy^T and x^T both tiled along them
            a, b = gemms["wgrad"]
            gw = _fq(g_TN, r.grad_fmt, a, along=-2).t() @ _fq(x_TK, r.fmt, b, along=-2)
        return gx, gw, None


def quantized_linear(x: torch.Tensor, w_NK: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """x @ w_NK^T (x: [..., K]) with all three GEMMs fake-quantised by `recipe`; fp32."""
    with torch.autocast(x.device.type, enabled=False):  # the fp32 accumulation must stay fp32
        y = _QuantMM.apply(x.reshape(-1, x.shape[-1]).float(), w_NK, recipe)
    return y.view(*x.shape[:-1], w_NK.shape[0])


class _ExpertsQuantMM(torch.autograd.Function):
    """For each stacked weight W_ENK: y_N = x_N W_e^T on expert e's slice of the sorted rows.

    The weights share the input (w1 and w3 do): x is quantised once for all of them. Row-local
    scales (tiles, rows) are computed over all N rows at once, which equals quantising each
    expert's slice; "tensor" gives the dispatched rows one scale, each expert's weight its own.
    wgrad tiles along each expert's own tokens, so that part loops over the experts.
    """

    @staticmethod
    def forward(ctx, x_NK, sizes, recipe, *w_ENK):
        gemms = GEMMS[recipe.name]
        need_dgrad = ctx.needs_input_grad[0]
        quantized = [quantize_weight(w, recipe, dgrad=need_dgrad) for w in w_ENK]
        xq_NK = _fq(x_NK, recipe.fmt, gemms["fprop"][0])
        outs = []
        for w, (w_fprop, _) in zip(w_ENK, quantized):
            y_NO = x_NK.new_empty(x_NK.shape[0], w.shape[1])
            for e, (x_nK, y_nO) in enumerate(zip(xq_NK.split(sizes), y_NO.split(sizes))):
                if x_nK.shape[0]:
                    torch.mm(x_nK, w_fprop[e].t(), out=y_nO)
            outs.append(y_NO)
        ctx.recipe, ctx.sizes = recipe, sizes
        ctx.save_for_backward(x_NK, *(w_dgrad for _, w_dgrad in quantized))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *g_NO):
        x_NK, *w_dgrad = ctx.saved_tensors
        r, sizes, gemms = ctx.recipe, ctx.sizes, GEMMS[ctx.recipe.name]
        g_NO = [g.float() for g in g_NO]
        gx_NK = None
        if ctx.needs_input_grad[0]:  # dgrad, summed over the weights that read x
            gx_NK = torch.zeros_like(x_NK)
            for g, w_d in zip(g_NO, w_dgrad):
                gq_NO = _fq(g, r.grad_fmt, gemms["dgrad"][0])
                for e, (g_nO, gx_nK) in enumerate(zip(gq_NO.split(sizes), gx_NK.split(sizes))):
                    if g_nO.shape[0]:
                        gx_nK.addmm_(g_nO, w_d[e])
        a, b = gemms["wgrad"]
        gws = []
        xq_per_expert = None
        for i, g in enumerate(g_NO):
            if not ctx.needs_input_grad[3 + i]:
                gws.append(None)
                continue
            if xq_per_expert is None:  # each expert's x, scaled along its own tokens: shared by all weights
                xq_per_expert = [_fq(x_nK, r.fmt, b, along=-2) if x_nK.shape[0] else None
                                 for x_nK in x_NK.split(sizes)]
            gw = x_NK.new_zeros(len(sizes), g.shape[1], x_NK.shape[1])
            for e, (g_nO, xq_nK) in enumerate(zip(g.split(sizes), xq_per_expert)):
                if xq_nK is not None:
                    torch.mm(_fq(g_nO, r.grad_fmt, a, along=-2).t(), xq_nK, out=gw[e])
            gws.append(gw)
        return gx_NK, None, None, *gws


def experts_fp8(x_ND: torch.Tensor, counts_E: torch.Tensor, w1_EDI: torch.Tensor, w3_EDI: torch.Tensor,
                w2_EID: torch.Tensor, scale_N: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """moe.experts.experts_loop with every GEMM fake-quantised, each expert's weights per 128x128 block.

    x_ND: the routed rows sorted by expert (counts_E rows each). The stacked weights are quantised
    in one call (no loop over blocks or experts); a loop over the experts runs the GEMMs.
    scale_N (routing weights) multiplies the hidden activation before w2, as experts_grouped
    does. Weights are stored [in, out], so an expert's (out, in) matrix is a transposed view.
    """
    sizes = counts_E.tolist()
    with torch.autocast(x_ND.device.type, enabled=False):
        a_NI, b_NI = _ExpertsQuantMM.apply(x_ND.float(), sizes, recipe, w1_EDI.transpose(-1, -2),
                                           w3_EDI.transpose(-1, -2))
        h_NI = F.silu(a_NI) * b_NI * scale_N.float().unsqueeze(-1)
        (y_ND,) = _ExpertsQuantMM.apply(h_NI, sizes, recipe, w2_EID.transpose(-1, -2))
    return y_ND.to(x_ND.dtype)


# ---------------------------------------------------------------------------- the real path
def _scaled_gemm(a_MK: torch.Tensor, b_NK: torch.Tensor, fmt_a: str, fmt_b: str, granularity: str) -> torch.Tensor:
    """A @ B^T through torch._scaled_mm: real FP8 operands, tensor-wise or row-wise scales."""
    qa, sa = quantize(a_MK, fmt_a, granularity)
    qb, sb = quantize(b_NK, fmt_b, granularity)
    if granularity == "row":
        sb = sb.reshape(1, -1)
    return torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb, out_dtype=torch.float32)


class _ScaledMM(torch.autograd.Function):
    """_QuantMM with torch._scaled_mm doing the GEMMs (tensorwise and rowwise recipes)."""

    @staticmethod
    def forward(ctx, x_TK, w_NK, recipe):
        ctx.recipe = recipe
        ctx.save_for_backward(x_TK, w_NK)
        g = GEMMS[recipe.name]["fprop"][0]
        return _scaled_gemm(x_TK, w_NK, recipe.fmt, recipe.fmt, g)

    @staticmethod
    def backward(ctx, g_TN):
        x_TK, w_NK = ctx.saved_tensors
        r = ctx.recipe
        g = GEMMS[r.name]["fprop"][0]
        g_TN = g_TN.float()
        gx = _scaled_gemm(g_TN, w_NK.t(), r.grad_fmt, r.fmt, g) if ctx.needs_input_grad[0] else None
        gw = _scaled_gemm(g_TN.t(), x_TK.t(), r.grad_fmt, r.fmt, g) if ctx.needs_input_grad[1] else None
        return gx, gw, None


# ---------------------------------------------------------------------------- modules
BACKENDS = ("sim", "scaled_mm")


class Float8Linear(nn.Linear):
    """nn.Linear (same .weight [out, in], same state-dict keys) whose three GEMMs run in simulated FP8.

    recipe: "blockwise" (DeepSeek-V3: x and dy in 1x128 tiles, W in 128x128 blocks, wgrad's
    operands tiled along the tokens), "rowwise", "tensorwise", "bf16" (inputs rounded to bf16) or
    "none" (exactly nn.Linear). fmt / grad_fmt: "e4m3" (DeepSeek, all tensors) or "e5m2".
    backend "scaled_mm" runs tensorwise/rowwise GEMMs through torch._scaled_mm (CPU or CUDA).
    The output and every gradient are fp32 (DeepSeek: bf16 outputs, fp32 weight gradients).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, recipe: str = "blockwise",
                 fmt: str = "e4m3", grad_fmt: str = "e4m3", backend: str = "sim", device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.set_recipe(recipe, fmt, grad_fmt, backend)

    def set_recipe(self, recipe: str, fmt: str = "e4m3", grad_fmt: str = "e4m3", backend: str = "sim") -> None:
        self.recipe = make_recipe(recipe, fmt, grad_fmt)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
        if backend == "scaled_mm" and recipe not in ("tensorwise", "rowwise"):
            raise ValueError(f"backend 'scaled_mm' supports recipe 'tensorwise' or 'rowwise', got {recipe!r} "
                             "(torch 2.13 on CPU rejects block scales); use backend='sim'")
        self.backend = backend

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: str = "blockwise", fmt: str = "e4m3", grad_fmt: str = "e4m3",
                    backend: str = "sim") -> Float8Linear:
        """A Float8Linear holding linear's own parameters (no copy, no random numbers drawn)."""
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, linear.bias is not None, recipe, fmt, grad_fmt,
                      backend)
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recipe is None:
            return super().forward(x)
        if self.backend == "scaled_mm":
            y = _ScaledMM.apply(x.reshape(-1, x.shape[-1]).float(), self.weight.float(), self.recipe)
            y = y.view(*x.shape[:-1], self.out_features)
        else:
            y = quantized_linear(x, self.weight, self.recipe)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        r = self.recipe
        what = "recipe=none" if r is None else f"recipe={r.name}, fmt={r.fmt}, grad_fmt={r.grad_fmt}"
        return f"{super().extra_repr()}, {what}" + (f", backend={self.backend}" if self.backend != "sim" else "")


def convert(model: nn.Module, recipe: str, fmt: str = "e4m3", grad_fmt: str = "e4m3") -> nn.Module:
    """Run model's GEMMs in simulated FP8 the way DeepSeek-V3 trains (section 3.3.1); in place.

    Swapped for Float8Linear (same parameters, same state-dict keys): the linear layers of
    attention (MHA/MLA), of dense FFNs and shared experts, and the MTP projection. The stacked
    routed experts get the recipe too (moe.experts.Experts then calls experts_fp8: per expert,
    per 128x128 block). Untouched, as in the report: embedding, output head, router, and every
    norm (the MLA latent norms included). recipe "none" turns a converted model back to plain
    GEMMs. Returns the model.
    """
    from moe.attention import MHA, MLA
    from moe.experts import Experts
    from moe.layer import MLP
    from moe.mtp import MTPModule

    r = make_recipe(recipe, fmt, grad_fmt)
    for module in list(model.modules()):
        if isinstance(module, Experts):
            module.fp8 = r
        if isinstance(module, Float8Linear):
            module.set_recipe(recipe, fmt, grad_fmt)
        if not isinstance(module, (MHA, MLA, MLP, MTPModule)):
            continue
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and r is not None:
                setattr(module, name, Float8Linear.from_linear(child, recipe, fmt, grad_fmt))
    return model
