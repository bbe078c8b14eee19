"""Every module initialises itself with the project's one rule (moe.init), built alone or in a model."""

from __future__ import annotations

import math

import pytest
import torch

from moe.attention import MHA, MLA
from moe.config import PRESETS, ModelConfig
from moe.experts import Experts
from moe.init import init_weights, is_out_projection
from moe.layer import MLP, MoE
from moe.model import Block, Transformer
from moe.mtp import MTPModule
from moe.router import Router

CFG = PRESETS["toy"].replace(dim=64, n_layers=8, n_heads=4, inter_dim=128, moe_inter_dim=64, q_lora_rank=32)
OUT_STD = CFG.init_std / math.sqrt(2 * CFG.n_layers)  # = init_std / 4

BUILDERS = {
    "Router": lambda: Router(CFG),
    "Experts": lambda: Experts(CFG),
    "MLP": lambda: MLP(CFG, CFG.inter_dim),
    "MoE": lambda: MoE(CFG),
    "MLA": lambda: MLA(CFG),
    "MHA": lambda: MHA(CFG.replace(attn="mha")),
    "Block": lambda: Block(CFG, use_moe=True),
    "MTPModule": lambda: MTPModule(CFG),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_a_module_built_alone_follows_the_init_rule(name):
    torch.manual_seed(0)
    module = BUILDERS[name]()
    matrices = [(n, p) for n, p in module.named_parameters() if p.dim() >= 2]
    assert matrices
    for n, p in matrices:
        assert torch.isfinite(p).all(), n  # torch.empty memory used to leak through as NaN/garbage
        expected = OUT_STD if is_out_projection(n) else CFG.init_std
        assert p.std().item() == pytest.approx(expected, rel=0.15), n
        assert abs(p.mean().item()) < 3 * expected / math.sqrt(p.numel()) + 1e-6, n
    for n, p in module.named_parameters():
        if p.dim() == 1:
            assert torch.equal(p, torch.ones_like(p)), n  # RMSNorm gains


def test_out_projections_are_the_residual_writers():
    names = [n for n, _ in Transformer(CFG).named_parameters() if is_out_projection(n)]
    assert names and all(n.endswith(("attn.wo.weight", "ffn.w2.weight", "shared.w2.weight", "experts.w2"))
                         for n in names)
    assert not is_out_projection("layers.1.ffn.experts.w1") and not is_out_projection("layers.0.attn.wkv_b.weight")


def test_readme_moe_example_gives_finite_outputs_in_fresh_modules():
    """The bug: MoE(cfg) alone left Router.weight and the experts as torch.empty (NaN outputs)."""
    for seed in range(3):
        torch.manual_seed(seed)
        moe = MoE(PRESETS["toy"])
        y, _ = moe(torch.randn(2, 16, PRESETS["toy"].dim))
        assert torch.isfinite(y).all()


def test_transformer_draws_every_matrix_once_in_parameter_order():
    """Its final pass is the rule over the whole model: a seed gives one model, however it was built."""
    a, b = Transformer(CFG), Transformer(CFG)
    torch.manual_seed(0)
    a.init_weights()
    torch.manual_seed(0)
    init_weights(b, CFG)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_init_std_follows_the_config():
    torch.manual_seed(0)
    wide = Experts(ModelConfig(dim=64, moe_inter_dim=64, n_routed_experts=8, init_std=0.006, n_layers=2))
    assert wide.w1.std().item() == pytest.approx(0.006, rel=0.1)
    assert wide.w2.std().item() == pytest.approx(0.006 / 2, rel=0.1)
