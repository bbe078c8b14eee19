"""How close a converted model is to transformers': logits, greedy generation, round trips.

For tiny random transformers DeepseekV3 and Mixtral models (every weight, norm and correction
bias random; fp32, CPU), converts each with moe.interop.hf.from_hf and reports:
  - the largest |logit difference| over all positions of a batch (YaRN variants run past
    their original context), and the largest logit for scale;
  - whether greedy generation of N tokens is the same as transformers' generate;
  - whether to_hf(from_hf(model)) gives back every tensor bit for bit.
Writes OUT/results.json and prints a table. Needs transformers (a dev dependency).

    python experiments/interop_parity.py --out runs/interop [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from moe.cli import out_folder, positive_int  # noqa: E402

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
DEEPSEEK = dict(vocab_size=300, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
                topk_group=2, first_k_dense_replace=2, n_shared_experts=1, routed_scaling_factor=2.5, q_lora_rank=24,
                kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=128,
                rope_parameters=YARN, num_nextn_predict_layers=0, attn_implementation="eager")
VARIANTS = {
    "deepseek_v3 q_lora, YaRN, 4 groups keep 2, bias, 2 dense": ("deepseek_v3", {}),
    "deepseek_v3 no q_lora, YaRN, 3 dense": ("deepseek_v3", dict(q_lora_rank=None, first_k_dense_replace=3)),
    "deepseek_v3 rotate-half, plain RoPE, tied": ("deepseek_v3", dict(
        rope_interleave=False, rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        tie_word_embeddings=True, n_group=1, topk_group=1, norm_topk_prob=False)),
    "mixtral GQA 4/2 heads, top-2 of 4": ("mixtral", dict(
        vocab_size=300, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
        attn_implementation="eager")),
}


@torch.no_grad()
def randomised(model, seed: int = 0):
    """Every weight random, the norms around 1, the correction bias non-zero (tests/test_interop.py uses it too)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        noise = torch.randn(p.shape, generator=g)
        p.copy_(1 + 0.3 * noise if p.dim() == 1 else 0.2 * noise)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.2 * torch.randn(b.shape, generator=g))
    return model.eval()


def random_hf_model(arch: str, settings: dict, seed: int):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, MixtralConfig, MixtralForCausalLM

    if arch == "deepseek_v3":
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**{**DEEPSEEK, **settings}))
    else:
        model = MixtralForCausalLM(MixtralConfig(**settings))
    return randomised(model, seed)


@torch.no_grad()
def measure(arch: str, settings: dict, seq_len: int, new_tokens: int, seed: int = 0) -> dict:
    from moe.generate import generate
    from moe.interop.hf import from_hf, to_hf

    hf = random_hf_model(arch, settings, seed)
    cfg, ours = from_hf(hf)
    tokens = torch.randint(0, cfg.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(seed + 1))
    ref = hf(tokens).logits
    diff = (ours(tokens)[0] - ref).abs().max().item()
    prompt = tokens[0, :7].tolist()
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False)[0, len(prompt):].tolist()
    got = generate(ours, prompt, new_tokens, temperature=0.0)
    _, back = to_hf(ours, layout="fused")
    _, again = from_hf(to_hf(ours)[1], config=to_hf(ours)[0])
    exact_hf = all(torch.equal(back[k], v) for k, v in hf.state_dict().items()) if settings.get(
        "rope_interleave", True) else None  # to_hf writes interleaved RoPE: a rotate-half source differs there
    exact_ours = all(torch.equal(again.state_dict()[k], v) for k, v in ours.state_dict().items())
    return {"positions": seq_len, "yarn": cfg.max_seq_len > cfg.original_seq_len and seq_len > cfg.original_seq_len,
            "max_abs_logit_diff": diff, "max_abs_logit": ref.abs().max().item(),
            "greedy_tokens": new_tokens, "greedy_equal": got == want,
            "to_hf_of_from_hf_exact": exact_hf, "from_hf_of_to_hf_exact": exact_ours}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=out_folder, default="runs/interop", help="output folder")
    ap.add_argument("--quick", action="store_true", help="64 positions and 10 generated tokens instead of 120 and 20")
    ap.add_argument("--threads", type=positive_int, default=1, help="torch threads (tiny models: 1 is fastest)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    seq_len, new_tokens = (64, 10) if args.quick else (120, 20)
    results = {name: measure(arch, settings, seq_len, new_tokens) for name, (arch, settings) in VARIANTS.items()}
    width = max(map(len, results))
    print(f"{'model':<{width}}  positions  max|dlogit|  max|logit|  greedy=  round trips exact")
    for name, r in results.items():
        trips = f"{r['to_hf_of_from_hf_exact']}/{r['from_hf_of_to_hf_exact']}"
        print(f"{name:<{width}}  {r['positions']:>9}  {r['max_abs_logit_diff']:>11.2e}  {r['max_abs_logit']:>10.2f}"
              f"  {str(r['greedy_equal']):>7}  {trips}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"quick": args.quick, "torch": torch.__version__, "results": results}, f, indent=2)
    print("wrote", os.path.join(args.out, "results.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
