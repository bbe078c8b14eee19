"""Load balancing: auxiliary losses, and DeepSeek-V3's auxiliary-loss-free bias update.

Shapes: B sequences, S positions, T = B*S tokens, E experts, K experts per token.

Without balancing, a router collapses onto a few experts: they get all the gradient, grow
better, and get chosen more. Three remedies are here:
  - switch_aux_loss: E * sum_i f_i * P_i over the batch (Switch Transformer, GShard,
    DeepSeek-V2's expert-level loss): f_i = share of the T*K assignments that went to expert
    i, P_i = mean normalised score of expert i.
  - seq_aux_loss: the same quantity per sequence, averaged (DeepSeek-V3's "complementary
    sequence-wise" loss, used with a tiny alpha next to the bias).
  - update_bias: no loss at all. After each optimizer step, raise the selection bias of
    underloaded experts and lower it for overloaded ones by a fixed step gamma. The bias
    changes which experts are chosen, never the weights, so it adds no gradient noise.
Plus the router z-loss (ST-MoE), which keeps router logits small; it does not balance.

f_i counts the experts the router actually chose (biased, group-limited selection), the same
choice the dispatch uses, before any capacity drop. Each aux loss is exactly 1.0 when the load
and the scores are uniform. The layer multiplies each by its coefficient and sums per layer (a
loss over all layers' tokens at once lets one layer's imbalance cancel another's).
`valid_T` (optional) leaves tokens out (positions without a target, i.e. padding).

MODES names the usual recipes as values of the four config fields, for `--balance NAME`.
"""

from __future__ import annotations

import torch
from torch import nn

# the ModelConfig fields a balancing mode sets (0 = off)
BALANCE_FIELDS = ("bias_update_speed", "aux_loss_alpha", "seq_aux_loss_alpha", "z_loss_coef")

# Coefficients tuned for the toy preset's short runs (docs/balancing.md measures them). For
# reference: Switch/ST-MoE alpha 1e-2, z 1e-3; DeepSeek-V2 expert-level alpha 3e-3; DeepSeek-V3
# gamma 1e-3 with seq alpha 1e-4 over ~500k steps; a toy run of a few hundred steps needs a
# larger gamma for the bias to travel as far as the scores differ.
AUX_ALPHA = 1e-2
SEQ_AUX_ALPHA = 1e-2
Z_COEF = 1e-3
GAMMA = 1e-2
MODES: dict[str, dict[str, float]] = {
    name: {f: dict(values).get(f, 0.0) for f in BALANCE_FIELDS}
    for name, values in {
        "none": {},
        "aux": {"aux_loss_alpha": AUX_ALPHA},
        "seq_aux": {"seq_aux_loss_alpha": SEQ_AUX_ALPHA},
        "z": {"z_loss_coef": Z_COEF},
        "aux+z": {"aux_loss_alpha": AUX_ALPHA, "z_loss_coef": Z_COEF},
        "aux_free": {"bias_update_speed": GAMMA},
        "aux_free+seq_aux": {"bias_update_speed": GAMMA, "seq_aux_loss_alpha": 1e-4},  # as DeepSeek-V3
        "aux_free+z": {"bias_update_speed": GAMMA, "z_loss_coef": Z_COEF},
    }.items()
}


def mode_fields(name: str) -> dict[str, float]:
    """The ModelConfig field values of a balancing mode (cfg.replace(**mode_fields("aux")))."""
    if name not in MODES:
        raise ValueError(f"unknown balancing mode {name!r}; allowed: {', '.join(MODES)}")
    return dict(MODES[name])


def mode_of(cfg) -> str | None:
    """The name of the mode cfg's balancing fields equal, or None for any other mix."""
    values = {f: getattr(cfg, f) for f in BALANCE_FIELDS}
    return next((name for name, fields in MODES.items() if fields == values), None)


def _normalised(scores_TE: torch.Tensor) -> torch.Tensor:
    """Scores as a distribution over experts (a no-op for softmax, needed for sigmoid).

    A clamp, not `+ eps`: with s / (sum s + eps) a sigmoid router could shrink every score
    towards 0 and drive P_i, and the loss, to 0 without balancing anything.
    """
    return scores_TE / scores_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)


def _token_weights(T: int, valid_T: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_ones(T) if valid_T is None else valid_T.to(like.dtype)


def switch_aux_loss(scores_TE: torch.Tensor, experts_TK: torch.Tensor, valid_T: torch.Tensor | None = None,
                    group=None) -> torch.Tensor:
    """E * sum_i f_i * P_i over the (valid) tokens; 1.0 at uniform load.

    f_i = assignments to i / (T*K): normalised by K too, else the loss is K at uniform load.
    P_i = mean of the normalised scores over ALL experts: a mean over the chosen top-k only
    has no gradient towards the experts the router ignores.
    With a process group (data parallel), f_i counts the assignments of every rank's tokens
    (one all-reduce of E counts and the token count, which carry no gradient) and P_i is this
    rank's mean score: the mean of this loss over the ranks is then the loss of the global
    batch, and so is the mean of its gradients (ranks with equal token counts, as in training).
    """
    T, E = scores_TE.shape
    K = experts_TK.shape[1]
    w_T = _token_weights(T, valid_T, scores_TE)
    n = w_T.sum()
    counts_E = scores_TE.new_zeros(E).scatter_add_(0, experts_TK.flatten(), w_T.repeat_interleave(K))
    P_E = (_normalised(scores_TE) * w_T[:, None]).sum(dim=0) / n.clamp_min(1.0)
    if group is not None:
        import torch.distributed as dist

        counts_n = torch.cat([counts_E, n.view(1)]).detach()
        dist.all_reduce(counts_n, group=group)
        counts_E, n = counts_n[:E], counts_n[E]
    f_E = counts_E / (n.clamp_min(1.0) * K)
    return E * (f_E * P_E).sum()


def seq_aux_loss(scores_TE: torch.Tensor, experts_TK: torch.Tensor, batch: int,
                 valid_T: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss: switch_aux_loss per sequence, averaged.

    Sequences without a valid token are left out of the average.
    """
    T, E = scores_TE.shape
    K = experts_TK.shape[1]
    S = T // batch
    w_BS = _token_weights(T, valid_T, scores_TE).reshape(batch, S)
    n_B = w_BS.sum(dim=1)
    counts_BE = scores_TE.new_zeros(batch, E).scatter_add_(
        1, experts_TK.reshape(batch, S * K), w_BS.repeat_interleave(K, dim=1))
    f_BE = counts_BE * E / (n_B.clamp_min(1.0) * K)[:, None]
    P_BE = (_normalised(scores_TE).reshape(batch, S, E) * w_BS[..., None]).sum(dim=1) / n_B.clamp_min(1.0)[:, None]
    has_B = (n_B > 0).to(scores_TE.dtype)
    return ((f_BE * P_BE).sum(dim=-1) * has_B).sum() / has_B.sum().clamp_min(1.0)


def z_loss(logits_TE: torch.Tensor, valid_T: torch.Tensor | None = None) -> torch.Tensor:
    """mean(logsumexp(logits)^2): penalises large router logits."""
    w_T = _token_weights(logits_TE.shape[0], valid_T, logits_TE)
    return (torch.logsumexp(logits_TE, dim=-1).square() * w_T).sum() / w_T.sum().clamp_min(1.0)


def router_entropy_bits(scores_TE: torch.Tensor) -> torch.Tensor:
    """entropy_T: per token, the entropy (bits) of its normalised scores; log2(E) = undecided."""
    p_TE = _normalised(scores_TE)
    return -(p_TE * p_TE.clamp_min(1e-30).log2()).sum(dim=-1)


@torch.no_grad()
def update_bias(model: nn.Module) -> None:
    """One aux-loss-free step for every MoE layer: bias += gamma * sign(mean load - load).

    Uses the tokens-per-expert counts each layer accumulated since the last
    `moe.layer.reset_routing_stats`; call it once per optimizer step (after all its
    micro-batches), before resetting. Every MoE layer, MTP blocks included, has its own bias.
    """
    from moe.layer import MoE

    for m in model.modules():
        if isinstance(m, MoE) and m.router.bias is not None:
            load_E = m.tokens_per_expert_E.float()
            m.router.bias.add_(m.cfg.bias_update_speed * torch.sign(load_E.mean() - load_E))
