"""Byte tokenizer, the embedded corpus (deterministic, cached, split, labelled) and --data files."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe import data
from moe.data import ByteTokenizer


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("MOE_CACHE_DIR", str(d))
    return d


# ------------------------------------------------------------------------------ tokenizer
@settings(max_examples=200, deadline=None)
@given(st.text())
def test_tokenizer_round_trip_any_text(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_tokenizer_non_ascii_is_multi_byte():
    tok = ByteTokenizer()
    text = "héllo — 世界 🙂"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8")) > len(text)
    assert tok.decode(torch.tensor(ids)) == text


def test_decode_of_invalid_utf8_does_not_raise():
    assert ByteTokenizer().decode([0xE4, 0xB8]) == "\ufffd"  # a cut-off 3-byte character


# ------------------------------------------------------------------------------ embedded corpus
def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_CACHE_DIR", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert data.cache_dir() == str(tmp_path / "a")
    monkeypatch.delenv("MOE_CACHE_DIR")
    assert data.cache_dir() == os.path.join(str(tmp_path / "b"), "moe")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data.cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "moe")


def test_corpus_build_is_deterministic_and_cached(cache):
    a = data.build_embedded_corpus()
    b = data.build_embedded_corpus()
    assert a == b
    corpus = data.load_embedded_corpus()
    assert os.path.isfile(data.embedded_corpus_path())
    assert str(cache) in data.embedded_corpus_path()
    again = data.load_embedded_corpus()  # from the cache this time
    assert torch.equal(corpus.train.tokens_N, again.train.tokens_N)
    assert torch.equal(corpus.val.domain_N, again.val.domain_N)
    assert corpus.fingerprint() == again.fingerprint()


def test_corpus_is_moderate_and_has_both_domains(cache):
    corpus = data.load_embedded_corpus()
    assert corpus.domains == ("prose", "code")
    total = len(corpus.train) + len(corpus.val)
    assert 500_000 < total < 4_000_000
    for split in (corpus.train, corpus.val):
        counts = torch.bincount(split.domain_N.long(), minlength=2)
        assert (counts > 0).all()
    # validation is about 10% of each domain
    for d in range(2):
        val = int((corpus.val.domain_N == d).sum())
        train = int((corpus.train.domain_N == d).sum())
        assert 0.05 < val / (val + train) < 0.2


def test_split_is_disjoint_by_document(cache):
    built = data.build_embedded_corpus()
    train_docs, val_docs = set(built["train"]["documents"]), set(built["val"]["documents"])
    assert train_docs and val_docs and not train_docs & val_docs
    assert not any("/test/" in d or "/tests/" in d or d.startswith("code:test/") for d in train_docs | val_docs)
    assert any(d.startswith("prose:") for d in val_docs) and any(d.startswith("code:") for d in val_docs)


def test_domain_labels_match_the_text(cache):
    corpus = data.load_embedded_corpus()
    tok = ByteTokenizer()
    spans = data.domain_spans(corpus.train)
    assert spans[0][0] == 0 and spans[-1][1] == len(corpus.train)
    code = [s for s in spans if s[2] == corpus.domains.index("code")]
    prose = [s for s in spans if s[2] == corpus.domains.index("prose")]
    code_text = "".join(tok.decode(corpus.train.tokens_N[a:b]) for a, b, _ in code[:20])
    prose_text = "".join(tok.decode(corpus.train.tokens_N[a:b]) for a, b, _ in prose[:20])
    assert code_text.count("def ") + code_text.count("import ") > 10
    assert prose_text.count(" the ") > 10 * max(1, prose_text.count("def "))


def test_domain_ids_of_a_batch(cache):
    corpus = data.load_embedded_corpus()
    starts = torch.tensor([0, 1000, len(corpus.val) - 65])
    dom = data.domain_ids(corpus.val, starts, 64)
    assert dom.shape == (3, 64)
    for row, s in zip(dom, starts.tolist()):
        assert torch.equal(row, corpus.val.domain_N[s:s + 64].long())


def test_damaged_cache_is_rebuilt(cache):
    path = data.embedded_corpus_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write('{"truncated": ')
    corpus = data.load_embedded_corpus()
    assert len(corpus.train) > 0
    with open(path) as f:
        assert json.load(f)["version"] == data.CORPUS_VERSION


# ------------------------------------------------------------------------------ --data FILE
def test_text_file_split_is_last_tenth(tmp_path):
    p = tmp_path / "t.txt"
    text = "".join(f"line {i} ünïcode\n" for i in range(200))
    p.write_text(text, encoding="utf-8")
    corpus = data.load_corpus(str(p), seq_len=32)
    raw = text.encode("utf-8")
    assert corpus.domains == ("text",)
    assert bytes(corpus.train.tokens_N.tolist()) + bytes(corpus.val.tokens_N.tolist()) == raw
    assert abs(len(corpus.val) - len(raw) // 10) <= 1


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"hello\x00world" * 20, "looks binary (NUL byte at offset 5)"),
    (b"caf\xe9 au lait " * 20, "not valid UTF-8 (bad byte 0xe9 at offset 3)"),
    (b"tiny", "too short"),
])
def test_text_file_errors_say_what_is_wrong(tmp_path, content, message):
    p = tmp_path / "bad.txt"
    p.write_bytes(content)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        data.load_corpus(str(p))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        data.load_corpus(str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="is a directory"):
        data.load_corpus(str(tmp_path))


def test_file_too_short_for_seq_len(tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("x" * 500)
    data.load_corpus(str(p), seq_len=16)
    with pytest.raises(ValueError, match="validation split has 50 bytes, but seq_len=128"):
        data.load_corpus(str(p), seq_len=128)


# ------------------------------------------------------------------------------ batching
def test_batches_are_a_pure_function_of_seed_and_step(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("".join(chr(97 + i % 26) for i in range(5000)))
    split = data.load_corpus(str(p)).train
    x1, y1 = data.get_batch(split, 4, 16, seed=0, step=3)
    x2, y2 = data.get_batch(split, 4, 16, seed=0, step=3)
    x3, _ = data.get_batch(split, 4, 16, seed=0, step=4)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert x1.dtype == torch.int64 and x1.shape == (4, 16)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are inputs shifted by one


def test_eval_windows_are_fixed_and_in_range(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("abc" * 3000)
    split = data.load_corpus(str(p)).val
    starts = data.eval_starts(split, 32, 10)
    assert torch.equal(starts, data.eval_starts(split, 32, 10))
    assert starts.min() >= 0 and starts.max() + 33 <= len(split)


def test_unigram_baseline_is_between_zero_and_uniform(cache):
    corpus = data.load_embedded_corpus()
    u = data.unigram_loss(corpus)
    assert 2.0 < u < math.log(256)
