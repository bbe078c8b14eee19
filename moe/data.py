"""Bytes in, batches out: the byte tokenizer, the embedded default corpus, and batching.

Shapes: B batch, S sequence length, N tokens in a split.

The default corpus is built at run time from text that ships with every Python install, so
nothing is downloaded and nothing is copied into this repo:
  - "prose": the English help topics of `pydoc_data.topics` (what `help("if")` prints);
  - "code":  a deterministic sample of the standard library's .py files (test folders excluded).
Every byte carries a domain id, so routing can be compared between English and Python.
Documents go to train or validation by a hash of their name: the split is disjoint and the
same on every run with the same Python. The result is cached as one JSON file.
`--data FILE` takes any UTF-8 text file instead (one domain "text"; last 10% is validation).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass

import torch

from moe.config import atomic_write_text

CORPUS_VERSION = 2  # bump when the build rule changes: the cache key includes it
CODE_BUDGET_BYTES = 1_000_000  # stdlib source to sample; the prose topics are ~0.5 MB
MAX_FILE_BYTES = 100_000  # skip the few huge (often generated) stdlib modules
DEFAULT_MAX_DATA_MB = 512  # --data files larger than this are refused (--max-data-mb raises it)
VAL_PERCENT = 10  # share of documents (default corpus) or bytes (--data) held out
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "pydoc_data"}


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, no unknowns, exact round trip for any string."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Bytes back to text; a sampled byte sequence may be invalid UTF-8, shown as U+FFFD."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return bytes(ids).decode("utf-8", errors="replace")


@dataclass
class Split:
    """One split of the corpus: token ids and the domain id of every token."""

    tokens_N: torch.Tensor  # uint8 bytes
    domain_N: torch.Tensor  # uint8 index into Corpus.domains

    def __len__(self) -> int:
        return self.tokens_N.numel()


@dataclass
class Corpus:
    name: str  # "embedded" or the --data path
    domains: tuple[str, ...]  # domain names, indexed by the ids in Split.domain_N
    train: Split
    val: Split

    def fingerprint(self) -> str:
        """A short hash of the training bytes: resume checks it is training on the same data."""
        return hashlib.sha256(self.train.tokens_N.numpy().tobytes()).hexdigest()[:16]

    def check_fits(self, seq_len: int) -> None:
        """Both splits must hold at least one window of seq_len inputs plus its target."""
        for name, split in (("train", self.train), ("validation", self.val)):
            if len(split) < seq_len + 1:
                raise ValueError(f"data {self.name} is too short: its {name} split has {len(split)} bytes, "
                                 f"but seq_len={seq_len} needs at least {seq_len + 1}; use a longer file "
                                 "or a smaller --seq-len")


# ------------------------------------------------------------------------------ the embedded corpus
def cache_dir() -> str:
    """$MOE_CACHE_DIR, else $XDG_CACHE_HOME/moe, else ~/.cache/moe."""
    if os.environ.get("MOE_CACHE_DIR"):
        return os.environ["MOE_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "moe")


def _doc_hash(key: str) -> int:
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:12], 16)


def _prose_documents() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return [(f"prose:{name}", topics[name].strip() + "\n") for name in sorted(topics)]


def _code_documents(budget: int = CODE_BUDGET_BYTES) -> list[tuple[str, str]]:
    """A fixed sample of stdlib modules: files in hash order of their path until the budget."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        rel_folder = os.path.relpath(folder, root)
        for f in sorted(files):
            if f.endswith(".py") and not f.startswith("test_"):
                paths.append(os.path.normpath(os.path.join(rel_folder, f)).replace(os.sep, "/"))
    paths.sort(key=lambda p: (_doc_hash(p), p))
    docs, total = [], 0
    for rel in paths:
        with open(os.path.join(root, rel), "rb") as fh:
            raw = fh.read()
        if not raw.strip() or len(raw) > MAX_FILE_BYTES or b"\0" in raw:
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue  # a few modules declare another encoding; skip rather than guess
        docs.append((f"code:{rel}", text.strip() + "\n"))
        total += len(raw)
        if total >= budget:
            break
    return docs


def build_embedded_corpus() -> dict:
    """Collect the documents, split them by name hash, and join each split (shuffled by hash)."""
    docs = {"prose": _prose_documents(), "code": _code_documents()}
    out: dict = {"version": CORPUS_VERSION, "python": sys.version, "domains": list(docs)}
    splits: dict[str, list[tuple[int, str, int, str]]] = {"train": [], "val": []}
    for d, (domain, items) in enumerate(docs.items()):
        if len(items) < 2:
            raise RuntimeError(f"found only {len(items)} {domain} documents in this Python install")
        # validation: documents in hash order until VAL_PERCENT of this domain's bytes (at least
        # one document, never all), so each domain is held out in proportion
        sizes = {name: len(text.encode("utf-8")) for name, text in items}
        target = sum(sizes.values()) * VAL_PERCENT / 100
        val_names, held = set(), 0
        for name, _ in sorted(items, key=lambda it: (_doc_hash("split:" + it[0]), it[0])):
            if held >= target or len(val_names) == len(items) - 1:
                break
            val_names.add(name)
            held += sizes[name]
        for name, text in items:
            splits["val" if name in val_names else "train"].append((_doc_hash("order:" + name), name, d, text))
    for split, items in splits.items():
        items.sort()
        out[split] = {"text": "\n".join(t for *_, t in items),
                      "spans": [],  # [start_byte, end_byte, domain id]; a doc owns the "\n" after it
                      "documents": [n for _, n, _, _ in items]}
        pos = 0
        for i, (_, _, d, text) in enumerate(items):
            n = len(text.encode("utf-8")) + (1 if i < len(items) - 1 else 0)
            out[split]["spans"].append([pos, pos + n, d])
            pos += n
    return out


def _split_from_json(s: dict) -> Split:
    raw = s["text"].encode("utf-8")
    tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    domain = torch.empty_like(tokens)
    for start, end, d in s["spans"]:
        domain[start:end] = d
    if s["spans"] and s["spans"][-1][1] != len(raw):
        raise ValueError("corpus cache is inconsistent (spans do not cover the text)")
    return Split(tokens, domain)


def embedded_corpus_path() -> str:
    key = hashlib.sha256(f"{CORPUS_VERSION}|{sys.version}|{sysconfig.get_paths()['stdlib']}".encode()).hexdigest()
    v = sys.version_info
    return os.path.join(cache_dir(), f"corpus-v{CORPUS_VERSION}-py{v.major}.{v.minor}.{v.micro}-{key[:10]}.json")


def load_embedded_corpus(rebuild: bool = False) -> Corpus:
    """The default corpus, from the cache or built (seconds) and cached atomically."""
    path = embedded_corpus_path()
    data = None
    if not rebuild and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            corpus = Corpus("embedded", tuple(data["domains"]), _split_from_json(data["train"]),
                            _split_from_json(data["val"]))
            return corpus
        except (OSError, ValueError, KeyError, TypeError):
            data = None  # a damaged cache is rebuilt, never trusted
    data = build_embedded_corpus()
    try:
        atomic_write_text(path, json.dumps(data, ensure_ascii=False))
    except OSError as e:  # a read-only home or cache folder must not stop training
        print(f"warning: cannot cache the corpus at {path} ({e.strerror or e}); using it from memory "
              "(set MOE_CACHE_DIR to a writable folder to cache it)", file=sys.stderr)
    return Corpus("embedded", tuple(data["domains"]), _split_from_json(data["train"]), _split_from_json(data["val"]))


# ------------------------------------------------------------------------------ --data FILE
def read_text_file(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_DATA_MB * 2**20) -> bytes:
    """The bytes of a UTF-8 text file, or a one-line error saying what is wrong with it.

    Reads at most max_bytes + 1 bytes, so an endless file (/dev/zero, a pipe) cannot fill memory.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    if os.path.isdir(path):
        raise ValueError(f"data path is a directory, expected a UTF-8 text file: {path}")
    with open(path, "rb") as f:
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise ValueError(f"data file is larger than {max_bytes / 2**20:g} MiB: {path}; raise the limit with "
                         "--max-data-mb if it really is that big")
    if not raw:
        raise ValueError(f"data file is empty: {path}")
    nul = raw.find(b"\0")
    if nul >= 0:
        raise ValueError(f"data file looks binary (NUL byte at offset {nul}), expected UTF-8 text: {path}")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"data file is not valid UTF-8 (bad byte 0x{raw[e.start]:02x} at offset {e.start}): "
                         f"{path}") from None
    return raw


def load_text_corpus(path: str | os.PathLike, min_bytes: int = 64,
                     max_bytes: int = DEFAULT_MAX_DATA_MB * 2**20) -> Corpus:
    """Any UTF-8 file as a corpus: the first 90% trains, the last 10% validates."""
    raw = read_text_file(path, max_bytes)
    if len(raw) < min_bytes:
        raise ValueError(f"data file is too short ({len(raw)} bytes; need at least {min_bytes}): {os.fspath(path)}")
    tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    cut = len(raw) - max(len(raw) * VAL_PERCENT // 100, 1)
    train, val = tokens[:cut].clone(), tokens[cut:].clone()
    return Corpus(os.fspath(path), ("text",), Split(train, torch.zeros_like(train)), Split(val, torch.zeros_like(val)))


def load_corpus(data: str | os.PathLike | None = None, seq_len: int | None = None,
                max_bytes: int = DEFAULT_MAX_DATA_MB * 2**20) -> Corpus:
    """The embedded corpus (data=None) or a text file; checks it fits seq_len when given."""
    corpus = load_embedded_corpus() if data is None else load_text_corpus(data, max_bytes=max_bytes)
    if seq_len is not None:
        corpus.check_fits(seq_len)
    return corpus


# ------------------------------------------------------------------------------ batching
def batch_generator(seed: int, step: int, micro: int = 0) -> torch.Generator:
    """The random stream for one micro-batch, a pure function of (seed, step, micro).

    No sampler state to save: resuming at step n draws exactly the batches a straight run would.
    """
    key = hashlib.sha256(f"{seed}|{step}|{micro}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))


def random_starts(split: Split, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """B random window starts, each window seq_len inputs plus one target."""
    return torch.randint(0, len(split) - seq_len, (batch_size,), generator=generator)


def eval_starts(split: Split, seq_len: int, n_windows: int) -> torch.Tensor:
    """Evenly spaced, fixed window starts over the split: the same validation set at every eval."""
    last = len(split) - seq_len - 1
    n = max(1, min(n_windows, last + 1))
    return torch.linspace(0, last, n).round().long().unique()


def windows(split: Split, starts_B: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs_BS, targets_BS) as int64: targets are the inputs shifted left by one."""
    idx_BS = starts_B[:, None] + torch.arange(seq_len + 1)[None, :]
    chunk = split.tokens_N[idx_BS].long()
    return chunk[:, :-1], chunk[:, 1:]


def domain_ids(split: Split, starts_B: torch.Tensor, seq_len: int) -> torch.Tensor:
    """domain_BS: the domain id of every input token of the windows at starts_B."""
    idx_BS = starts_B[:, None] + torch.arange(seq_len)[None, :]
    return split.domain_N[idx_BS].long()


def domain_spans(split: Split) -> list[tuple[int, int, int]]:
    """The split as (start, end, domain id) runs of one domain each."""
    d = split.domain_N
    if d.numel() == 0:
        return []
    change = (d[1:] != d[:-1]).nonzero().flatten() + 1
    bounds = [0, *change.tolist(), d.numel()]
    return [(a, b, int(d[a])) for a, b in zip(bounds[:-1], bounds[1:])]


def get_batch(split: Split, batch_size: int, seq_len: int, seed: int, step: int,
              micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The training micro-batch for (seed, step, micro): (inputs_BS, targets_BS)."""
    starts = random_starts(split, batch_size, seq_len, batch_generator(seed, step, micro))
    return windows(split, starts, seq_len)


def unigram_loss(corpus: Corpus) -> float:
    """Validation cross entropy (nats/byte) of byte frequencies counted on train (add-one smoothed).

    The floor any model must beat: it knows which bytes are common, nothing about context.
    """
    counts = torch.bincount(corpus.train.tokens_N.long(), minlength=256).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[corpus.val.tokens_N.long()].mean())
