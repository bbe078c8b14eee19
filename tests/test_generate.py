"""Sampling: the KV cache changes nothing, filters behave, speculative greedy == greedy."""

from __future__ import annotations

import io
import math
import random

import pytest
import torch

from moe.config import PRESETS
from moe.generate import StreamPrinter, generate, next_token_probs, sample, speculative_generate
from moe.model import Transformer
from moe.train import TrainConfig, train

# init_std 0.3 spreads the logits of an untrained model, so greedy choices are not near-ties
TINY = PRESETS["toy"].replace(dim=32, n_layers=2, n_heads=2, max_seq_len=64, kv_lora_rank=16,
                              qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, inter_dim=64,
                              moe_inter_dim=16, n_routed_experts=4, n_activated_experts=2,
                              n_expert_groups=2, n_limited_groups=1, init_std=0.3, n_mtp=0)


pytestmark = pytest.mark.usefixtures("one_thread")


def random_model(**changes) -> Transformer:
    torch.manual_seed(0)
    return Transformer(TINY.replace(**changes)).eval()


def train_tiny_mtp(d, n_mtp: int) -> Transformer:
    """A tiny model trained briefly on a periodic text: its MTP drafts are often right."""
    (d / "t.txt").write_text("the quick brown fox jumps over the lazy dog. " * 60)
    tc = TrainConfig(out=str(d / "run"), steps=60, batch_size=8, seq_len=48, lr=1e-2, min_lr=1e-3,
                     warmup_steps=5, eval_interval=0, device="cpu", threads=1, data=str(d / "t.txt"),
                     progress=False, plots=False)
    return train(tc, TINY.replace(n_mtp=n_mtp, init_std=0.02)).model.eval()


@pytest.fixture(scope="module")
def trained_mtp_model(tmp_path_factory):
    return train_tiny_mtp(tmp_path_factory.mktemp("mtp"), n_mtp=1)


@pytest.fixture(scope="module")
def trained_mtp2_model(tmp_path_factory):
    return train_tiny_mtp(tmp_path_factory.mktemp("mtp2"), n_mtp=2)


# ------------------------------------------------------------------------------ sampling filters
def test_greedy_probs_are_one_hot():
    logits = torch.tensor([0.1, 2.0, -1.0, 1.9])
    p = next_token_probs(logits, temperature=0)
    assert p.tolist() == [0.0, 1.0, 0.0, 0.0]
    assert sample(p) == 1


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    p = next_token_probs(logits, temperature=1.0, top_k=2)
    assert (p[2:] == 0).all() and p[:2].sum() == pytest.approx(1.0)
    assert p[0] / p[1] == pytest.approx(0.5 / 0.3)
    p = next_token_probs(logits, temperature=1.0, top_p=0.8)  # 0.5 + 0.3 reaches 0.8
    assert (p[2:] == 0).all() and p[0] == pytest.approx(0.5 / 0.8)
    p = next_token_probs(logits, temperature=1.0, top_p=0.1)  # the top token always stays
    assert p.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_temperature_sharpens():
    logits = torch.tensor([1.0, 0.0])
    assert next_token_probs(logits, 0.5)[0] > next_token_probs(logits, 1.0)[0] > next_token_probs(logits, 2.0)[0]


def test_sampling_is_reproducible_with_a_seeded_generator():
    model = random_model()
    a = generate(model, [65, 66], 20, temperature=1.0, generator=torch.Generator().manual_seed(1))
    b = generate(model, [65, 66], 20, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert a == b


# ------------------------------------------------------------------------------ the KV cache
@pytest.mark.parametrize("attn", ["mla", "mha"])
def test_greedy_with_cache_equals_without(attn):
    model = random_model(attn=attn)
    prompt = list(b"def f(x):")
    with_cache = generate(model, prompt, 30, temperature=0, use_cache=True)
    without = generate(model, prompt, 30, temperature=0, use_cache=False)
    assert with_cache == without
    # and the logits themselves agree, position by position
    seq = torch.tensor([prompt + with_cache])
    full = model(seq)[0]
    cache = model.new_cache(1)
    step = [model(seq[:, :len(prompt)], cache=cache, start_pos=0)[0]]
    for i in range(len(prompt), seq.shape[1]):
        step.append(model(seq[:, i:i + 1], cache=cache, start_pos=i)[0])
    torch.testing.assert_close(torch.cat(step, dim=1), full, rtol=1e-4, atol=1e-4)


def test_stops_at_max_new_tokens_and_at_max_seq_len():
    model = random_model()
    assert len(generate(model, [1, 2, 3], 5, temperature=0)) == 5
    prompt = list(range(60))
    assert len(generate(model, prompt, 100, temperature=0)) == 64 - 60
    with pytest.raises(ValueError, match="max_seq_len is 64, which leaves no room for a new token"):
        generate(model, list(range(64)), 10, temperature=0)  # used to return [] with no reason


def test_bad_prompts_and_settings_are_rejected():
    model = random_model()
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, [], 5)
    with pytest.raises(ValueError, match="prompt is 65 tokens but the model's max_seq_len is 64"):
        generate(model, [0] * 65, 5)
    with pytest.raises(ValueError, match="top_p must be in"):
        generate(model, [1], 5, top_p=1.5)
    with pytest.raises(ValueError, match="speculative decoding needs an MTP module"):
        speculative_generate(model, [1], 5)


# ------------------------------------------------------------------------------ speculative decoding
@pytest.mark.parametrize("prompt", [b"the quick", b"lazy dog. the", b"x"])
def test_speculative_greedy_equals_plain_greedy(trained_mtp_model, prompt):
    model = trained_mtp_model
    plain = generate(model, list(prompt), 40, temperature=0)
    spec, stats = speculative_generate(model, list(prompt), 40, temperature=0)
    assert spec == plain
    assert stats.new_tokens == 40
    assert stats.accepted > 0  # the accept path is exercised...
    assert stats.tokens_per_forward > 1.0  # ...and saves main-model forwards
    assert stats.main_forwards == 1 + stats.drafted


@pytest.mark.parametrize("prompt", [b"the quick", b"lazy dog. the", b"x"])
@pytest.mark.parametrize("draft_len", [1, 2])
def test_speculative_greedy_equals_plain_greedy_with_two_mtp_modules(trained_mtp2_model, prompt, draft_len):
    model = trained_mtp2_model
    plain = generate(model, list(prompt), 40, temperature=0)
    spec, stats = speculative_generate(model, list(prompt), 40, temperature=0, draft_len=draft_len)
    assert spec == plain
    assert len(stats.drafted_by_depth) == draft_len and stats.drafted == sum(stats.drafted_by_depth)
    assert stats.accepted_by_depth[-1] > 0  # the deepest draft is accepted sometimes...
    assert stats.tokens_per_forward > 1.0
    verifies = stats.main_forwards - 1
    assert stats.drafted_by_depth[0] == verifies
    if draft_len == 2:
        assert stats.drafted_by_depth[1] <= stats.accepted_by_depth[0]  # ...and checked only after draft 1 passed
        assert (stats.new_tokens - 1) / verifies > 1 + stats.acceptance_by_depth[0] - 0.05  # > one draft's worth


@pytest.mark.parametrize("draft_len", [1, 2])
def test_speculative_greedy_equals_plain_with_many_rejections(draft_len):
    model = random_model(n_mtp=2)  # an untrained drafter is mostly wrong: the reject path
    for prompt in ([5], list(b"hello world")):
        plain = generate(model, prompt, 25, temperature=0)
        spec, stats = speculative_generate(model, prompt, 25, temperature=0, draft_len=draft_len)
        assert spec == plain
        assert stats.drafted > stats.accepted


def test_draft_len_is_checked():
    model = random_model(n_mtp=1)
    for bad in (0, 2):
        with pytest.raises(ValueError, match=r"draft_len must be between 1 and the model's n_mtp \(1\)"):
            speculative_generate(model, [1], 5, draft_len=bad)


def test_speculative_respects_the_limits(trained_mtp_model):
    model = trained_mtp_model
    for n in (1, 2, 3, 7):
        new, _ = speculative_generate(model, list(b"the "), n, temperature=0)
        assert len(new) == n
    new, _ = speculative_generate(model, list(range(97, 97 + 61)), 100, temperature=0)
    assert len(new) == 64 - 61


@pytest.mark.parametrize("prompt_len", [60, 61, 62, 63])
def test_two_drafts_stop_at_max_seq_len(trained_mtp2_model, prompt_len):
    prompt = list(range(97, 97 + prompt_len))
    plain = generate(trained_mtp2_model, prompt, 100, temperature=0)
    new, _ = speculative_generate(trained_mtp2_model, prompt, 100, temperature=0, draft_len=2)
    assert new == plain and len(new) == 64 - prompt_len


def test_speculative_sampling_runs_and_streams(trained_mtp_model):
    got = []
    new, stats = speculative_generate(trained_mtp_model, list(b"the "), 30, temperature=0.8, top_k=20,
                                      generator=torch.Generator().manual_seed(0), on_token=got.append)
    assert got == new and len(new) == 30
    assert 0 <= stats.acceptance <= 1


def test_stream_printer_waits_for_whole_characters():
    out = io.StringIO()
    printer = StreamPrinter(out)
    for b in "né 世".encode():
        printer(b)
    printer.finish()
    assert out.getvalue() == "né 世\n"


@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_drafter_with_cache_matches_the_training_path(depth):
    """Module k at position i sees h^{k-1}_i and Emb(t_{i+k}) -> logits for t_{i+k+1}, as in training,
    whatever chunks the positions arrive in, and after wrong drafts too (those slots are fed again)."""
    from moe.generate import _MTPDrafter

    model = random_model(n_mtp=2)
    S = 28
    seq = torch.randint(0, 256, (1, S), generator=torch.Generator().manual_seed(0))
    toks = seq[0].tolist()
    with torch.no_grad():
        _, _, h_BSD = model(seq, return_hidden=True)
        full = []  # full[k-1][i]: module k's logits at position i (predicting t_{i+k+1})
        for k, mtp in enumerate(model.mtp[:depth], start=1):
            n = S - k
            h_BSD, _ = mtp(h_BSD[:, :n], model.embed(seq[:, k:k + n]), model.rope_cos[:n], model.rope_sin[:n])
            full.append(model.head(mtp.norm(h_BSD))[0])
        drafter, cache = _MTPDrafter(model, depth), model.new_cache(1)
        rng = random.Random(0)
        got, wrong_drafts = [], 0
        a, b = 0, 8
        while b <= S - 1 - depth:
            _, _, h = model(seq[:, a:b], cache=cache, start_pos=a, return_hidden=True)
            state = {"k": 0, "true": True}

            def choose(logits_V, b=b, state=state):
                state["k"] += 1
                k = state["k"]
                if state["true"]:  # every token module k read at position b - 1 is the real one
                    got.append((logits_V, full[k - 1][b - 1]))
                tok = toks[b + k]
                if rng.random() < 0.3:
                    tok, state["true"] = (tok + 1) % 256, False
                return tok, torch.zeros(256)

            drafter.draft(h, a, toks[:b + 1], depth, choose)
            wrong_drafts += not state["true"]
            a, b = b, b + rng.choice([1, 2, 3])
    assert len(got) >= 8 and (depth == 1 or wrong_drafts > 2)  # depth 2: re-feeding after a wrong draft
    torch.testing.assert_close(torch.stack([g for g, _ in got]), torch.stack([w for _, w in got]),
                               rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ sampling keeps the distribution
def exact_first_tokens(model: Transformer, prompt: list[int], n: int, **filters) -> dict[tuple[int, ...], float]:
    """P(first n new tokens) of plain sampling, by enumerating every prefix (tiny vocabularies only)."""
    dist: dict[tuple[int, ...], float] = {(): 1.0}
    with torch.no_grad():
        for _ in range(n):
            grown = {}
            for prefix, p in dist.items():
                probs_V = next_token_probs(model(torch.tensor([prompt + list(prefix)]))[0][0, -1], **filters)
                grown.update({prefix + (t,): p * float(q) for t, q in enumerate(probs_V.tolist()) if q > 0})
            dist = grown
    return dist


def chi_square(counts: dict, expected_p: dict, n: int) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom; cells expecting < 5 are pooled into one."""
    stat, pooled_obs, pooled_exp, cells = 0.0, 0, 0.0, 0
    for cell in set(expected_p) | set(counts):
        e, o = n * expected_p.get(cell, 0.0), counts.get(cell, 0)
        if e < 5:
            pooled_obs, pooled_exp = pooled_obs + o, pooled_exp + e
        else:
            stat, cells = stat + (o - e) ** 2 / e, cells + 1
    if pooled_exp > 0:
        stat, cells = stat + (pooled_obs - pooled_exp) ** 2 / pooled_exp, cells + 1
    elif pooled_obs:
        stat = float("inf")  # a sequence plain sampling can never produce
    return stat, cells - 1


def chi_square_critical(df: int, z: float = 3.0902) -> float:
    """Upper 0.1% point of chi-square(df), Wilson-Hilferty approximation (z = the normal 99.9% point)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.slow
@pytest.mark.parametrize("draft_len, filters", [(1, {"temperature": 1.0}),
                                                (2, {"temperature": 0.8, "top_k": 3})])
def test_speculative_sampling_keeps_the_distribution(draft_len, filters):
    """Chi-square of the first 3 sampled tokens (1500 seeds) against plain sampling's exact distribution.

    Token 1 comes from the prefill; tokens 2-3 pass the accept/reject rule of one or two drafts.
    A random drafter disagrees with the main model often, so both branches are taken.
    """
    model = random_model(vocab_size=5, n_layers=1, n_dense_layers=1, attn="mha", n_mtp=2)  # fast, same rule
    prompt, n, N = [1, 3], 3, 1500
    exact = exact_first_tokens(model, prompt, n, **filters)
    counts: dict[tuple[int, ...], int] = {}
    accepted = drafted = 0
    for seed in range(N):
        new, stats = speculative_generate(model, prompt, n, generator=torch.Generator().manual_seed(seed),
                                          draft_len=draft_len, **filters)
        counts[tuple(new)] = counts.get(tuple(new), 0) + 1
        accepted, drafted = accepted + stats.accepted, drafted + stats.drafted
    assert 0.2 < accepted / drafted < 0.9  # both the accept and the residual branch are exercised
    stat, df = chi_square(counts, exact, N)
    assert df >= 10 and stat < chi_square_critical(df), (stat, df)
    # the same samples are far from a slightly different distribution: the test has power
    hotter = exact_first_tokens(model, prompt, n, **{**filters, "temperature": filters["temperature"] * 1.3})
    stat_wrong, df_wrong = chi_square(counts, hotter, N)
    assert stat_wrong > chi_square_critical(df_wrong), (stat_wrong, df_wrong)
