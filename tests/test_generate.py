"""Sampling: the KV cache changes nothing, filters behave, speculative greedy == greedy."""

from __future__ import annotations

import io

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


@pytest.fixture(scope="module")
def trained_mtp_model(tmp_path_factory):
    """A tiny n_mtp=1 model trained briefly on a periodic text: its MTP drafts are often right."""
    d = tmp_path_factory.mktemp("mtp")
    (d / "t.txt").write_text("the quick brown fox jumps over the lazy dog. " * 60)
    tc = TrainConfig(out=str(d / "run"), steps=60, batch_size=8, seq_len=48, lr=1e-2, min_lr=1e-3,
                     warmup_steps=5, eval_interval=0, device="cpu", threads=1, data=str(d / "t.txt"),
                     progress=False, plots=False)
    return train(tc, TINY.replace(n_mtp=1, init_std=0.02)).model.eval()


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


def test_speculative_greedy_equals_plain_with_many_rejections():
    model = random_model(n_mtp=1)  # an untrained drafter is mostly wrong: the reject path
    for prompt in ([5], list(b"hello world")):
        plain = generate(model, prompt, 25, temperature=0)
        spec, stats = speculative_generate(model, prompt, 25, temperature=0)
        assert spec == plain
        assert stats.drafted > stats.accepted


def test_speculative_respects_the_limits(trained_mtp_model):
    model = trained_mtp_model
    for n in (1, 2, 3, 7):
        new, _ = speculative_generate(model, list(b"the "), n, temperature=0)
        assert len(new) == n
    new, _ = speculative_generate(model, list(range(97, 97 + 61)), 100, temperature=0)
    assert len(new) == 64 - 61


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


def test_mtp_drafter_with_cache_matches_the_training_path():
    """The drafter sees what MTP saw in training: h_i and Emb(t_{i+1}) -> logits for t_{i+2}."""
    from moe.generate import _MTPDrafter

    model = random_model(n_mtp=1)
    seq = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, _, h_BSD = model(seq, return_hidden=True)
        mtp = model.mtp[0]
        n = seq.shape[1] - 1
        x_BSD, _ = mtp(h_BSD[:, :n], model.embed(seq[:, 1:]), model.rope_cos[:n], model.rope_sin[:n])
        full_BSV = model.head(mtp.norm(x_BSD))
        drafter, cache = _MTPDrafter(model), model.new_cache(1)
        _, _, h = model(seq[:, :8], cache=cache, start_pos=0, return_hidden=True)
        got = [drafter(h, seq[0, 1:9].tolist(), 0)]
        for p in range(8, n):
            _, _, h = model(seq[:, p:p + 1], cache=cache, start_pos=p, return_hidden=True)
            got.append(drafter(h, [int(seq[0, p + 1])], p))
    torch.testing.assert_close(torch.stack(got), full_BSV[0, 7:], rtol=1e-4, atol=1e-4)
