"""Sampling with a KV cache, and speculative decoding with the MTP module as the drafter.

Shapes: B batch (1 here), S new positions, V vocabulary, D model dim.

Plain decoding feeds the prompt once (prefill), then one token per forward, reusing the
cached keys/values (MLA caches only its small latent).

Speculative decoding (DeepSeek-V3 section 5.4.3 uses its MTP module this way): the main
model's last hidden state h_i and the token it just chose, t_{i+1}, go through MTP module 1,
which drafts t_{i+2}. The next main forward takes [t_{i+1}, draft] together: its first
output checks the draft, its second is the token after it. If the draft is accepted, one
main forward has produced two tokens; if not, the main model's own choice replaces it and
the cache slot of the bad draft is simply overwritten later. Acceptance uses the standard
rule (accept with probability min(1, p/q), else sample from max(0, p - q)), which keeps the
output distribution exactly the main model's; with greedy decoding that reduces to "accept
iff the draft equals the main model's argmax", so greedy speculative == greedy.
With n_mtp >= 2, draft_len=2 chains modules 1 and 2 (module 2 reads module 1's draft) and
the verify forward checks both drafts: up to three tokens per main forward.
"""

from __future__ import annotations

import argparse
import codecs
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moe.cli import non_negative_float, positive_int, probability
from moe.data import ByteTokenizer
from moe.model import Transformer

TokenCallback = Callable[[int], None]


# ------------------------------------------------------------------------------ sampling
def next_token_probs(logits_V: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None) -> torch.Tensor:
    """The distribution to sample from: temperature, then top-k, then top-p; 0 = greedy one-hot."""
    logits_V = logits_V.float()
    if temperature <= 0:
        return torch.nn.functional.one_hot(logits_V.argmax(), logits_V.numel()).float()
    logits_V = logits_V / temperature
    if top_k is not None and top_k < logits_V.numel():
        kth = logits_V.topk(top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    probs_V = logits_V.softmax(dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs_V.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the top token always stays)
        drop = sorted_p.cumsum(0) - sorted_p >= top_p
        probs_V = probs_V.scatter(0, order, sorted_p.masked_fill(drop, 0.0))
        probs_V = probs_V / probs_V.sum()
    return probs_V


def sample(probs_V: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One token id from probs; a one-hot (greedy) needs no randomness."""
    if probs_V.max() >= 1.0:
        return int(probs_V.argmax())
    return int(torch.multinomial(probs_V.cpu(), 1, generator=generator))


def _cache_len(model: Transformer, prompt: list[int], max_new_tokens: int, drafts: int = 1) -> int:
    """Cache slots a generation can touch (the prompt, the new tokens, the speculative drafts), not
    max_seq_len: DeepSeek-V3's 163840 positions would be 23 GB of fp32 latent cache."""
    return min(model.cfg.max_seq_len, len(prompt) + max_new_tokens + drafts)


def _check_prompt(model: Transformer, prompt: list[int]) -> None:
    """A prompt must leave room for at least one new token."""
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token (one byte of text)")
    limit = model.cfg.max_seq_len
    if len(prompt) >= limit:
        room = ", which leaves no room for a new token" if len(prompt) == limit else ""
        raise ValueError(f"the prompt is {len(prompt)} tokens but the model's max_seq_len is {limit}{room}; "
                         "shorten it")


def _validate(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be a positive integer, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


@torch.no_grad()
def generate(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
             generator: torch.Generator | None = None, on_token: TokenCallback | None = None) -> list[int]:
    """New tokens after prompt; stops at max_new_tokens or when the sequence fills max_seq_len.

    use_cache=False recomputes the whole sequence every step: slow, kept as the reference.
    """
    _validate(max_new_tokens, temperature, top_k, top_p)
    _check_prompt(model, prompt)
    device = model.embed.weight.device
    seq = list(prompt)
    new: list[int] = []
    cache = model.new_cache(1, _cache_len(model, prompt, max_new_tokens)) if use_cache else None
    fed = 0  # positions already in the cache
    while len(new) < max_new_tokens and len(seq) < model.cfg.max_seq_len:
        if use_cache:
            x_BS = torch.tensor([seq[fed:]], device=device)
            logits_BSV = model(x_BS, cache=cache, start_pos=fed)[0]
            fed = len(seq)
        else:
            logits_BSV = model(torch.tensor([seq], device=device))[0]
        tok = sample(next_token_probs(logits_BSV[0, -1], temperature, top_k, top_p), generator)
        seq.append(tok)
        new.append(tok)
        if on_token is not None:
            on_token(tok)
    return new


# ------------------------------------------------------------------------------ speculative decoding
@dataclass
class SpecStats:
    new_tokens: int = 0
    main_forwards: int = 0  # forwards of the main model, the prefill included
    drafted: int = 0  # MTP drafts the main model checked (a draft after a rejected one is not checked)
    accepted: int = 0
    seconds: float = 0.0
    draft_seconds: float = 0.0  # of which in the MTP modules (wall clock, no device sync)
    drafted_by_depth: list[int] = field(default_factory=list)  # [j]: drafts j+1 tokens ahead checked
    accepted_by_depth: list[int] = field(default_factory=list)

    @property
    def acceptance(self) -> float:
        return self.accepted / max(self.drafted, 1)

    @property
    def acceptance_by_depth(self) -> list[float]:
        """Per draft position: accepted / checked, i.e. given that every earlier draft was accepted."""
        return [a / max(d, 1) for a, d in zip(self.accepted_by_depth, self.drafted_by_depth)]

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / max(self.main_forwards, 1)


Choose = Callable[[torch.Tensor], tuple[int, torch.Tensor]]  # logits_V -> (token, the probs it came from)


class _MTPDrafter:
    """MTP modules 1..depth chained as a drafter, each with its own KV cache.

    Module k at position i reads h^{k-1}_i (h^0: the main model's last hidden state) and
    Emb(t_{i+k}), and predicts t_{i+k+1}, as in training. At the newest position the token
    module k reads is module k-1's draft, so the chain drafts depth tokens ahead. Positions
    whose inputs included a draft are fed again on the next call (their cache slots are
    overwritten), so what the caches keep was computed from confirmed tokens only.
    """

    def __init__(self, model: Transformer, depth: int = 1, max_len: int | None = None):
        if not 1 <= depth <= len(model.mtp):
            raise ValueError(f"draft_len must be between 1 and the model's n_mtp ({len(model.mtp)}), got {depth}")
        self.model, self.depth = model, depth
        w = model.embed.weight
        L = max_len or model.cfg.max_seq_len
        self.caches = [m.block.attn.new_cache(1, L, w.device, w.dtype) for m in model.mtp[:depth]]
        self.hidden = [w.new_zeros(1, L, model.cfg.dim) for _ in range(depth)]  # [k]: h^k, input of module k+1
        self.fed = [0] * depth  # module k+1's cache is final below this position

    def __call__(self, h_BSD: torch.Tensor, next_tokens: list[int], start_pos: int) -> torch.Tensor:
        """Module 1 alone: feed positions start_pos.. (main hidden states and the tokens after them);
        logits of the last. (`draft` chains the modules and keeps track of what is confirmed.)"""
        return self._module(1, h_BSD, next_tokens, start_pos)[1]

    def _module(self, k: int, h_BSD: torch.Tensor, tokens: list[int],
                start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Module k over positions start_pos..: its output states and the logits at the last one."""
        m, module = self.model, self.model.mtp[k - 1]
        S = h_BSD.shape[1]
        emb_BSD = m.embed(torch.tensor([tokens], device=h_BSD.device))
        cos, sin = m.rope_cos[start_pos:start_pos + S], m.rope_sin[start_pos:start_pos + S]
        x_BSD, _ = module(h_BSD, emb_BSD, cos, sin, self.caches[k - 1], start_pos)
        return x_BSD, m.head(module.norm(x_BSD[:, -1]))[0]

    def draft(self, h_BSD: torch.Tensor, start_pos: int, seq: list[int], n: int,
              choose: Choose) -> tuple[list[int], list[torch.Tensor]]:
        """Store the main model's hidden states of positions start_pos.. (the newest is len(seq) - 2,
        seq[-1] is not fed yet), then draft n <= depth tokens after seq: (drafts, their probs)."""
        last = len(seq) - 2
        self.hidden[0][:, start_pos:start_pos + h_BSD.shape[1]] = h_BSD
        tokens = list(seq)  # grows by each draft
        drafts, probs = [], []
        for k in range(1, n + 1):
            lo = self.fed[k - 1]
            x_BSD, logits_V = self._module(k, self.hidden[k - 1][:, lo:last + 1], tokens[lo + k:last + k + 1], lo)
            if k < self.depth:
                self.hidden[k][:, lo:last + 1] = x_BSD
            tok, q_V = choose(logits_V)
            drafts.append(tok)
            probs.append(q_V)
            tokens.append(tok)
            self.fed[k - 1] = len(seq) - k  # positions i <= len(seq) - 1 - k read confirmed tokens only
        return drafts, probs


@torch.no_grad()
def speculative_generate(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
                         top_k: int | None = None, top_p: float | None = None,
                         generator: torch.Generator | None = None,
                         on_token: TokenCallback | None = None, draft_len: int = 1) -> tuple[list[int], SpecStats]:
    """Like generate (same stopping rule), drafting draft_len tokens ahead with MTP modules 1..draft_len.

    One verify forward of the main model checks all drafts at once: draft j is accepted with
    probability min(1, p_j/q_j) (greedy: iff it is the main model's argmax); the first rejected
    one is replaced by a sample of max(0, p_j - q_j), and if all pass the forward's last output
    gives one more token. So a step yields 1 to draft_len + 1 tokens, distributed as plain sampling.
    """
    if not len(model.mtp):
        raise ValueError("speculative decoding needs an MTP module, but this model has n_mtp=0; "
                         "train one with --set n_mtp=1")
    if not isinstance(draft_len, int) or not 1 <= draft_len <= len(model.mtp):
        raise ValueError(f"draft_len must be between 1 and the model's n_mtp ({len(model.mtp)}), got {draft_len!r}")
    _validate(max_new_tokens, temperature, top_k, top_p)
    _check_prompt(model, prompt)
    t0 = time.perf_counter()
    device = model.embed.weight.device
    limit = model.cfg.max_seq_len
    stats = SpecStats(drafted_by_depth=[0] * draft_len, accepted_by_depth=[0] * draft_len)
    seq, new = list(prompt), []
    probs = lambda logits_V: next_token_probs(logits_V, temperature, top_k, top_p)

    def choose(logits_V: torch.Tensor) -> tuple[int, torch.Tensor]:
        q_V = probs(logits_V)
        return sample(q_V, generator), q_V

    def emit(tok: int) -> bool:
        """Append a token; False once generation must stop."""
        seq.append(tok)
        new.append(tok)
        if on_token is not None:
            on_token(tok)
        return len(new) < max_new_tokens and len(seq) < limit

    if max_new_tokens == 0 or len(seq) >= limit:
        return new, stats
    cache_len = _cache_len(model, prompt, max_new_tokens, draft_len)
    cache = model.new_cache(1, cache_len)
    drafter = _MTPDrafter(model, draft_len, cache_len)
    logits_BSV, _, h_BSD = model(torch.tensor([seq], device=device), cache=cache, start_pos=0, return_hidden=True)
    stats.main_forwards += 1
    going = emit(sample(probs(logits_BSV[0, -1]), generator))
    h_start = 0  # h_BSD holds the main hidden states of positions h_start.. with confirmed inputs
    while going:
        pos = len(seq) - 1  # position of the newest token, not yet fed to the main model
        t_draft = time.perf_counter()
        drafts, q_list = drafter.draft(h_BSD, h_start, seq, min(draft_len, cache_len - len(seq)), choose)
        stats.draft_seconds += time.perf_counter() - t_draft
        logits_BSV, _, h_BSD = model(torch.tensor([[seq[-1], *drafts]], device=device), cache=cache,
                                     start_pos=pos, return_hidden=True)
        stats.main_forwards += 1
        n_ok = 0
        for j, (draft, q_V) in enumerate(zip(drafts, q_list)):
            stats.drafted += 1
            stats.drafted_by_depth[j] += 1
            p_V = probs(logits_BSV[0, j])
            accept_prob = float(p_V[draft] / q_V[draft].clamp_min(1e-30))
            if accept_prob >= 1.0 or accept_prob <= 0.0:  # always the case when greedy: no randomness
                accepted = accept_prob >= 1.0
            else:
                accepted = float(torch.rand((), generator=generator)) < accept_prob
            if not accepted:
                residual_V = (p_V - q_V).clamp_min(0.0)
                residual_V = residual_V / residual_V.sum() if residual_V.sum() > 0 else p_V
                going = emit(sample(residual_V, generator))
                break
            stats.accepted += 1
            stats.accepted_by_depth[j] += 1
            n_ok += 1
            going = emit(draft)
            if not going:
                break
        else:  # every draft accepted: the forward's last output is one more token
            going = emit(sample(probs(logits_BSV[0, len(drafts)]), generator))
        # the rejected drafts' cache slots (main and MTP) get overwritten from pos + 1 + n_ok on
        h_BSD, h_start = h_BSD[:, :1 + n_ok], pos
    stats.new_tokens = len(new)
    stats.seconds = time.perf_counter() - t0
    return new, stats


# ------------------------------------------------------------------------------ CLI
def escape_controls(text: str) -> str:
    """Control characters (ESC, BEL, ...) as visible escapes, so sampled bytes cannot drive the
    terminal; newlines and tabs stay as they are."""
    return "".join(c if c.isprintable() or c in "\n\t" else f"\\x{ord(c):02x}" if ord(c) < 256
                   else f"\\u{ord(c):04x}" for c in text)


class StreamPrinter:
    """Prints tokens as they come; bytes of a multi-byte character wait for the rest of it."""

    def __init__(self, stream=None, escape: bool = False):
        self.stream = stream or sys.stdout
        self.escape = escape
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(self, text: str) -> None:
        self.stream.write(escape_controls(text) if self.escape else text)
        self.stream.flush()

    def __call__(self, tok: int) -> None:
        text = self.decoder.decode(bytes([tok]))
        if text:
            self.write(text)

    def finish(self) -> None:
        self.write(self.decoder.decode(b"", final=True))
        self.write("\n")


class HFTokenizer:
    """A transformers tokenizer (of a converted checkpoint) behind ByteTokenizer's encode/decode."""

    def __init__(self, folder: str):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ValueError(f"{folder} holds a transformers tokenizer, but transformers is not installed; "
                             "install it or pass --tokenizer bytes") from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as e:  # transformers raises many kinds
            raise ValueError(f"cannot load the tokenizer in {folder} ({type(e).__name__}: {e}); "
                             "pass --tokenizer bytes or another folder") from None

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def load_tokenizer(run_folder: str, choice: str = "auto") -> ByteTokenizer | HFTokenizer:
    """'bytes', a folder with a transformers tokenizer, or 'auto': the run's tokenizer/ folder (written by
    python -m moe convert) when it has one, else bytes."""
    if choice == "bytes":
        return ByteTokenizer()
    folder = os.path.join(run_folder, "tokenizer") if choice == "auto" else choice
    if choice == "auto" and not os.path.isdir(folder):
        return ByteTokenizer()
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--tokenizer {choice}: no such folder")
    return HFTokenizer(folder)


class TextStreamPrinter(StreamPrinter):
    """Streams a multi-byte tokenizer's output: decodes all new ids, prints what was not shown yet."""

    def __init__(self, tokenizer: HFTokenizer, stream=None, escape: bool = False):
        super().__init__(stream, escape)
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def __call__(self, tok: int) -> None:
        self.ids.append(tok)
        text = self.tokenizer.decode(self.ids)
        if text.startswith(self.shown) and not text.endswith("\ufffd"):  # wait for a complete character
            self.write(text[len(self.shown):])
            self.shown = text

    def finish(self) -> None:
        text = self.tokenizer.decode(self.ids)
        self.write((text[len(self.shown):] if text.startswith(self.shown) else "") + "\n")


def run_generate(args: argparse.Namespace) -> int:
    from moe.checkpoint import load_model

    model, ckpt = load_model(args.run, args.device)
    tok = load_tokenizer(os.path.dirname(ckpt.path), args.tokenizer)
    prompt = tok.encode(args.prompt)
    temperature = 0.0 if args.greedy else args.temperature
    _validate(args.max_new_tokens, temperature, args.top_k, args.top_p)
    _check_prompt(model, prompt)  # before anything is printed
    if args.speculative and not len(model.mtp):
        raise ValueError(f"--speculative needs an MTP module, but {args.run} has n_mtp=0; "
                         "train with --set n_mtp=1")
    escape = not args.raw and sys.stdout.isatty()
    generator = torch.Generator().manual_seed(args.seed)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        printer = (StreamPrinter(escape=escape) if isinstance(tok, ByteTokenizer)
                   else TextStreamPrinter(tok, escape=escape))
        if args.stream:
            printer.write(args.prompt)
        t0 = time.perf_counter()
        on_token = printer if args.stream else None
        try:
            if args.speculative:
                new, stats = speculative_generate(model, prompt, args.max_new_tokens, temperature, args.top_k,
                                                  args.top_p, generator, on_token)
            else:
                new = generate(model, prompt, args.max_new_tokens, temperature, args.top_k, args.top_p,
                               generator=generator, on_token=on_token)
        except KeyboardInterrupt:
            printer.finish()
            print("[interrupted]", file=sys.stderr)
            return 130
        dt = time.perf_counter() - t0
        if args.stream:
            printer.finish()
        else:
            printer.write(tok.decode(prompt + new) + "\n")
        line = f"[{len(new)} tokens in {dt:.2f} s, {len(new) / max(dt, 1e-9):.0f} tokens/s"
        if len(new) < args.max_new_tokens:
            line += f"; stopped at max_seq_len={model.cfg.max_seq_len}"
        if args.speculative:
            line += (f"; MTP drafts accepted {stats.accepted}/{stats.drafted} = {stats.acceptance:.0%}, "
                     f"{stats.tokens_per_forward:.2f} tokens per main-model forward")
        print(line + "]", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate", help="sample text from a trained run (KV cache; optional MTP speculative decoding)",
        description="Stream text from the last checkpoint of a run folder. Examples: "
                    "python -m moe generate runs/demo --prompt 'def ' --max-new-tokens 200 ; "
                    "python -m moe generate runs/demo --prompt 'The ' --greedy --speculative")
    p.add_argument("run", metavar="OUT", help="run folder written by train (or one of its ckpt-* folders)")
    p.add_argument("--prompt", default="The ", help="text to continue (UTF-8; default: 'The ')")
    p.add_argument("--max-new-tokens", type=positive_int, default=200,
                   help="tokens (bytes) to add; generation also stops when the sequence fills max_seq_len "
                        "(default: 200)")
    p.add_argument("--temperature", type=non_negative_float, default=0.8,
                   help="sampling temperature, 0 = greedy (default: 0.8)")
    p.add_argument("--top-k", type=positive_int, default=None,
                   help="sample among the k most likely tokens only (default: all)")
    p.add_argument("--top-p", type=probability, default=None,
                   help="nucleus sampling: the smallest set of tokens holding this probability mass (default: off)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token (= --temperature 0)")
    p.add_argument("--speculative", action="store_true",
                   help="draft with the MTP module and verify with the main model (needs n_mtp >= 1); "
                        "reports acceptance and tokens per main-model forward")
    p.add_argument("--num-samples", type=positive_int, default=1, help="independent samples to draw (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--no-stream", dest="stream", action="store_false",
                   help="print the text once at the end (default: stream tokens as they come)")
    p.add_argument("--tokenizer", default="auto", metavar="auto|bytes|DIR",
                   help="bytes (the byte tokenizer of trained runs), a folder holding a transformers tokenizer, or "
                        "auto: the run's tokenizer/ folder (copied there by python -m moe convert) if it has one, "
                        "else bytes (default: auto)")
    p.add_argument("--raw", action="store_true",
                   help="write sampled bytes as they are; by default control characters (ESC ...) are shown "
                        "escaped when the output is a terminal")
    p.set_defaults(func=run_generate)
