"""Expert and data parallelism on real torch.distributed (gloo, CPU processes).

Each test forks 2 or 4 processes that join a gloo process group on 127.0.0.1 and compares what
they compute with one process computing the same global batch. Every multi-process run has a
hard deadline, so a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

from moe import parallel
from moe.accounting import ep_traffic
from moe.balance import update_bias
from moe.checkpoint import load_checkpoint, load_model, read_metrics
from moe.config import PRESETS
from moe.layer import MoE, moe_layers, reset_routing_stats
from moe.model import Transformer
from moe.parallel import ExpertParallel, combine, dispatch
from moe.train import TrainConfig, build_optimizer, train

from .test_train import SENTENCES

pytestmark = pytest.mark.usefixtures("one_thread")

DEADLINE_S = 90  # per multi-process run: a hang fails instead of blocking CI
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 8 experts so that 2 and 4 ranks both divide them; top-2, 4 groups keep 2, bias and every balance loss on
LAYER_CFG = PRESETS["toy"].replace(dim=16, moe_inter_dim=8, n_routed_experts=8, n_activated_experts=2,
                                   n_expert_groups=4, n_limited_groups=2, aux_loss_alpha=0.3,
                                   seq_aux_loss_alpha=0.1, z_loss_coef=0.01, bias_update_speed=0.01)
# a whole model, small enough for 4 processes on 2 cores (MTP on: its block has an MoE layer too)
MODEL_CFG = LAYER_CFG.replace(n_layers=2, n_heads=2, max_seq_len=32, kv_lora_rank=8, qk_nope_head_dim=8,
                              qk_rope_head_dim=4, v_head_dim=8, inter_dim=32, n_mtp=1)


# ------------------------------------------------------------------------------ running ranks
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out_dir: str, fn, args) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.save(fn(rank, world, *args), os.path.join(out_dir, f"rank{rank}.pt"))


def run_ranks(world: int, fn, *args, tmp_path) -> list:
    """fn(rank, world, *args) in `world` forked processes with torchrun's environment; their results.

    Fork, not spawn: a child starts in milliseconds instead of re-importing torch.
    """
    out_dir = tmp_path / f"ranks-{time.monotonic_ns()}"
    out_dir.mkdir()
    ctx = mp.start_processes(_rank_main, args=(world, free_port(), str(out_dir), fn, args), nprocs=world,
                             join=False, start_method="fork")
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} ranks of {fn.__name__} did not finish within {DEADLINE_S} s (a hang)")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def gather_full(model_state: dict[str, torch.Tensor], shards: list[dict[str, torch.Tensor]], names) -> dict:
    """One process's view from the ranks' states: expert shards concatenated in rank order."""
    return {k: torch.cat([s[k] for s in shards]) if k in names else model_state[k] for k in model_state}


# ------------------------------------------------------------------------------ the layer, step by step
def _uneven_bias(case: str, world: int) -> torch.Tensor:
    """Router biases that force the loads the tests need (the bias is replicated: every rank gets it)."""
    E = LAYER_CFG.n_routed_experts
    bias = torch.zeros(E)
    if case == "uneven":
        bias[0], bias[1] = 0.05, 0.04  # rank 0's experts get most of the rows
    elif case == "empty":
        bias[E - E // world:] = -1e3  # the last rank's experts: zero tokens from every rank, so it receives none
        bias[0] = 0.2
    return bias


def _layer_tokens(world: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(world * 2, 3, LAYER_CFG.dim, generator=g)  # 2 sequences of 3 tokens per rank


def _layer_loss(y_BSD: torch.Tensor, losses: dict, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(200 + step)
    w = torch.randn(y_BSD.shape[-1], generator=g)
    return (y_BSD * w).square().mean() + sum(losses.values())  # a mean over this rank's tokens


def fresh_layer(case: str, world: int, impl: str) -> MoE:
    torch.manual_seed(0)
    m = MoE(LAYER_CFG.replace(expert_impl=impl))
    m.router.bias.copy_(_uneven_bias(case, world))
    return m


def layer_steps(rank: int, world: int, case: str, impl: str) -> dict:
    """Two optimizer steps of one EP MoE layer on this rank's 2 sequences; what the reference must match."""
    ps = parallel.setup("ep", None, torch.device("cpu"), timeout_s=60)
    layer = ps.parallelize(fresh_layer(case, world, impl))
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    out = {"first": layer.experts.first, "steps": []}
    for step in range(2):
        x = _layer_tokens(world, step)[2 * rank:2 * rank + 2]
        y, losses = layer(x)
        _layer_loss(y, losses, step).backward()
        ps.reduce_gradients(layer)
        grads = {k: p.grad.clone() for k, p in layer.named_parameters()}
        opt.step()
        opt.zero_grad()
        ps.all_reduce_routing_stats(layer)
        counts = layer.tokens_per_expert_E.clone()
        update_bias(layer)
        reset_routing_stats(layer)
        out["steps"].append({"y": y.detach(), "grads": grads, "counts": counts, "bias": layer.router.bias.clone(),
                             "weights": {k: v.clone() for k, v in layer.state_dict().items()}})
    parallel.teardown(ps)
    return out


def reference_layer_steps(case: str, world: int, impl: str = "loop") -> list[dict]:
    layer = fresh_layer(case, world, impl)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    steps = []
    for step in range(2):
        x = _layer_tokens(world, step)
        y, losses = layer(x)
        _layer_loss(y, losses, step).backward()
        grads = {k: p.grad.clone() for k, p in layer.named_parameters()}
        opt.step()
        opt.zero_grad()
        counts = layer.tokens_per_expert_E.clone()
        update_bias(layer)
        reset_routing_stats(layer)
        steps.append({"y": y.detach(), "grads": grads, "counts": counts, "bias": layer.router.bias.clone(),
                      "weights": {k: v.clone() for k, v in layer.state_dict().items()}})
    return steps


EXPERT_NAMES = {"experts.w1", "experts.w2", "experts.w3"}


@pytest.mark.parametrize("world,case,impl", [(2, "uneven", "grouped"), (4, "empty", "loop"), (4, "uneven", "auto")])
def test_ep_layer_matches_one_process_in_outputs_every_gradient_and_the_bias(world, case, impl, tmp_path):
    """impl: the expert compute each rank runs on its rows (the reference is always the loop)."""
    ranks = run_ranks(world, layer_steps, case, impl, tmp_path=tmp_path)
    ref = reference_layer_steps(case, world)
    L = LAYER_CFG.n_routed_experts // world
    assert [r["first"] for r in ranks] == [r * L for r in range(world)]
    for step, want in enumerate(ref):
        got = [r["steps"][step] for r in ranks]
        y = torch.cat([g["y"] for g in got])
        torch.testing.assert_close(y, want["y"], rtol=1e-5, atol=1e-6)
        grads = gather_full(got[0]["grads"], [g["grads"] for g in got], EXPERT_NAMES)
        assert grads.keys() == want["grads"].keys()
        for k in want["grads"]:  # router, shared expert, every routed expert
            torch.testing.assert_close(grads[k], want["grads"][k], rtol=1e-4, atol=1e-7, msg=k)
        weights = gather_full(got[0]["weights"], [g["weights"] for g in got], EXPERT_NAMES)
        for k in want["weights"]:
            torch.testing.assert_close(weights[k], want["weights"][k], rtol=1e-5, atol=1e-6, msg=k)
        for g in got:  # the global load, and the same bias step on every rank
            torch.testing.assert_close(g["counts"], want["counts"])
            torch.testing.assert_close(g["bias"], want["bias"])
    counts = ref[0]["counts"].view(world, L).sum(1)
    if case == "uneven":
        assert counts[0] > 2 * counts[1:].min()  # uneven splits really happened
        assert (ref[0]["counts"] == 0).any()  # and an expert got no token from any rank
    else:
        assert counts[-1] == 0 and all(c > 0 for c in counts[:-1])  # the last rank received no row at all


# ------------------------------------------------------------------------------ dispatch and combine alone
def _routing_of(rank: int, n_tokens: int, E: int, K: int) -> torch.Tensor:
    """Rank r's (token, expert) choices: K distinct experts per token, never expert E-1."""
    g = torch.Generator().manual_seed(rank)
    return torch.stack([torch.randperm(E - 1, generator=g)[:K] for _ in range(n_tokens)]) if n_tokens else \
        torch.zeros(0, K, dtype=torch.long)


def round_trip(rank: int, world: int) -> dict:
    ps = parallel.setup("ep", None, torch.device("cpu"), timeout_s=60)
    sent_bytes = [0]  # float bytes this rank sends to other ranks, forward and backward
    a2a = torch.distributed.all_to_all_single

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, **kw):
        if input.is_floating_point():
            row = input[0].numel() * input.element_size() if input.shape[0] else 0
            sent_bytes[0] += row * (sum(input_split_sizes) - input_split_sizes[rank])
        return a2a(output, input, output_split_sizes, input_split_sizes, **kw)

    torch.distributed.all_to_all_single = counting
    E, K, L, D = 8, 3, 8 // world, 5
    T = [4, 7, 0, 2][rank]  # uneven, and rank 2 (of 4) sends nothing
    x_TD = torch.randn(T, D)
    x_TD[:, 0], x_TD[:, 1] = rank, torch.arange(T)  # each row says where it comes from
    x_TD.requires_grad_(True)
    experts_TK = _routing_of(rank, T, E, K)
    x_RD, expert_R, plan = dispatch(x_TD, experts_TK, L, ps.ep_group)
    y_TD = combine(x_RD, torch.full((T, K), 1.0 / K), plan, T)  # identity experts, weights 1/K
    g_TD = torch.randn(T, D)
    (y_TD * g_TD).sum().backward()
    sent = sent_bytes[0]
    # the same rows in bf16 and float8 (gloo has no float8: it travels as uint8 bytes)
    rows_ND = x_TD.detach().index_select(0, plan.token_N)
    wire = {str(dt): torch.equal(parallel._all_to_all(rows_ND.to(dt), plan.recv_W, plan.send_W, ps.ep_group)
                                 .view(torch.uint8), x_RD.detach().to(dt).view(torch.uint8))
            for dt in (torch.bfloat16, torch.float8_e4m3fn)}
    parallel.teardown(ps)
    torch.distributed.all_to_all_single = a2a
    return {"x": x_TD.detach(), "y": y_TD.detach(), "grad": x_TD.grad, "g": g_TD, "recv_W": plan.recv_W,
            "x_RD": x_RD.detach(), "expert_R": expert_R, "T": T, "sent_bytes": sent,
            "rows_out": sum(plan.send_W) - plan.send_W[rank], "wire": wire}


def test_dispatch_then_combine_restores_the_input_and_rows_trace_to_their_source(tmp_path):
    world, E, K = 4, 8, 3
    L = E // world
    ranks = run_ranks(world, round_trip, tmp_path=tmp_path)
    for me, r in enumerate(ranks):
        assert all(r["wire"].values()), r["wire"]  # bf16 and float8 rows arrive bit for bit
        torch.testing.assert_close(r["y"], r["x"])  # K copies out, K results back, weights 1/K
        torch.testing.assert_close(r["grad"], r["g"])  # and the backward is the identity too
        # every received row: from the source its block says, a token of that source that chose my expert
        sources = torch.arange(world).repeat_interleave(torch.tensor(r["recv_W"]))
        assert torch.equal(r["x_RD"][:, 0], sources.float())
        for src in range(world):
            chose = _routing_of(src, ranks[src]["T"], E, K)
            block = sources == src
            tokens, experts = r["x_RD"][block, 1].long(), me * L + r["expert_R"][block]
            assert all(e in chose[t] for t, e in zip(tokens.tolist(), experts.tolist()))
            assert block.sum() == ((chose >= me * L) & (chose < (me + 1) * L)).sum()  # all of them, once
            assert torch.equal(experts, experts.sort().values)  # sorted by expert inside a source's block
    assert ranks[-1]["expert_R"].numel() == ranks[-1]["x_RD"].shape[0]
    assert not (ranks[-1]["expert_R"] == L - 1).any()  # expert E-1 gets nothing from anyone
    # the calculator's model of the traffic: 4 transfers (dispatch, combine; forward, backward) of
    # one D-wide row per assignment that leaves its token's rank; here D = 5, fp32. Per rank the
    # bytes differ (a busy expert's rank sends more results back); summed over ranks they agree.
    t = ep_traffic(LAYER_CFG.replace(dim=5, n_activated_experts=K), world, "fp32")
    per_row = t["bytes_per_token_per_layer"]["total"] / t["rows_per_token_per_layer"]
    assert per_row == 4 * 5 * 4
    assert sum(r["sent_bytes"] for r in ranks) == per_row * sum(r["rows_out"] for r in ranks) > 0


# ------------------------------------------------------------------------------ the whole model
def model_steps(rank: int, world: int, mode: str, ep_size: int | None) -> dict:
    """Two optimizer steps (with global clipping) of the Transformer on this rank's share of the batch."""
    ps = parallel.setup(mode, ep_size, torch.device("cpu"), timeout_s=60)
    torch.manual_seed(0)
    model = ps.parallelize(Transformer(MODEL_CFG))
    opt = build_optimizer(model, TrainConfig(lr=1e-2))
    params = [p for p in model.parameters() if p.requires_grad]
    B = 4 // world  # 4 sequences in the global batch
    steps = []
    for step in range(2):
        tokens = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(step))[rank * B:(rank + 1) * B]
        _, losses = model(tokens[:, :-1], tokens[:, 1:])
        losses["loss"].backward()
        ps.reduce_gradients(model)
        norm = ps.clip_grad_norm_(model, params, 0.5)
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        ps.all_reduce_routing_stats(model)
        update_bias(model)
        reset_routing_stats(model)
        terms = ps.mean({k: float(v.detach()) for k, v in losses.items()})
        steps.append({"grads": grads, "norm": norm, "terms": terms})
    sd, osd = ps.full_state(model, opt)
    parallel.teardown(ps)
    return {"steps": steps, "state": sd if sd is not None else model.state_dict(), "ep_rank": rank % (ep_size or 1)}


def reference_model_steps() -> dict:
    torch.manual_seed(0)
    model = Transformer(MODEL_CFG)
    opt = build_optimizer(model, TrainConfig(lr=1e-2))
    params = [p for p in model.parameters() if p.requires_grad]
    steps = []
    for step in range(2):
        tokens = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(step))
        _, losses = model(tokens[:, :-1], tokens[:, 1:])
        losses["loss"].backward()
        norm = float(torch.nn.utils.clip_grad_norm_(params, 0.5))
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        update_bias(model)
        reset_routing_stats(model)
        steps.append({"grads": grads, "norm": norm, "terms": {k: float(v.detach()) for k, v in losses.items()}})
    return {"steps": steps, "state": model.state_dict()}


def expert_names(model_cfg=MODEL_CFG) -> set[str]:
    with torch.device("meta"):
        m = Transformer(model_cfg)
    return {f"{prefix}.experts.{k}" for prefix, mod in m.named_modules() if isinstance(mod, MoE)
            for k in ("w1", "w2", "w3")}


@pytest.mark.parametrize("world,mode,ep_size", [(2, "ep", None), (4, "ep", 2), (2, "dp", None)])
def test_model_gradients_match_one_process_over_two_steps(world, mode, ep_size, tmp_path):
    """Every parameter's gradient, the clipped norm, the losses and the final weights, EP and DP.

    world 4 with ep_size 2: two copies of the experts, each split over 2 ranks, so an expert's
    gradient is summed over its own EP group and then over its data-parallel replica.
    """
    ranks = run_ranks(world, model_steps, mode, ep_size, tmp_path=tmp_path)
    ref = reference_model_steps()
    names = expert_names()
    ep = ep_size or (world if mode == "ep" else 1)
    for step, want in enumerate(ref["steps"]):
        for r in ranks:
            assert r["steps"][step]["norm"] == pytest.approx(want["norm"], rel=1e-5)
            for k, v in want["terms"].items():
                assert r["steps"][step]["terms"][k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
        for group in range(world // ep):  # each data-parallel copy of the experts
            shards = [r["steps"][step]["grads"] for r in ranks[group * ep:(group + 1) * ep]]
            grads = gather_full(shards[0], shards, names if ep > 1 else set())
            assert grads.keys() == want["grads"].keys()
            for k in want["grads"]:
                torch.testing.assert_close(grads[k], want["grads"][k], rtol=1e-4, atol=1e-6, msg=k)
    for r in ranks:  # full_state gathers the experts: every rank can name the whole model
        for k, v in ref["state"].items():  # (AdamW divides tiny gradients by their own size: atol)
            torch.testing.assert_close(r["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)


# ------------------------------------------------------------------------------ training runs
def write_text(path) -> str:
    path.write_text("".join(SENTENCES[(i * 7 + i // 3) % len(SENTENCES)] for i in range(400)), encoding="utf-8")
    return str(path)


TRAIN_CFG = MODEL_CFG.replace(n_mtp=0)


def run_config(tmp_path, name: str, **changes) -> TrainConfig:
    base = TrainConfig(out=str(tmp_path / name), steps=6, batch_size=4, seq_len=16, lr=1e-2, min_lr=1e-3,
                       warmup_steps=2, eval_interval=3, eval_windows=4, seed=0, device="cpu",
                       data=str(tmp_path / "text.txt"), progress=False, plots=False, dist_timeout=60)
    return dataclasses.replace(base, **changes)


def train_ranks(rank: int, world: int, tc: TrainConfig, resume: bool) -> dict:
    result = train(tc, None if resume else TRAIN_CFG, resume=resume)
    return {"step": result.step, "checkpoint": result.checkpoint}


def _losses(out: str, key: str = "loss") -> list[float]:
    return [r[key] for r in read_metrics(out)]


@pytest.mark.slow
def test_training_on_1_2_and_4_processes_gives_the_same_losses_and_a_one_process_checkpoint(tmp_path):
    write_text(tmp_path / "text.txt")
    one = train(run_config(tmp_path, "one", grad_accum=2), TRAIN_CFG)  # 2 micro-batches of 4 sequences per step
    two = run_config(tmp_path, "ep2", batch_size=2, parallel="ep", grad_accum=2)
    four = run_config(tmp_path, "ep4", batch_size=1, parallel="ep", grad_accum=2)
    run_ranks(2, train_ranks, two, False, tmp_path=tmp_path)
    run_ranks(4, train_ranks, four, False, tmp_path=tmp_path)
    for tc in (two, four):
        for key in ("loss", "ce", "seq_aux", "aux", "z", "grad_norm", "tokens"):
            assert _losses(tc.out, key) == pytest.approx(_losses(one.out, key), rel=1e-4, abs=1e-6), key
        evals = [r for r in read_metrics(tc.out) if "val_loss" in r]
        want = [r for r in read_metrics(one.out) if "val_loss" in r]
        assert [r["tokens_per_expert"] for r in evals] == [r["tokens_per_expert"] for r in want]
        assert [r["val_loss"] for r in evals] == pytest.approx([r["val_loss"] for r in want], rel=1e-5)
        # rank 0 wrote a normal checkpoint of the whole model: one process loads it
        model, ckpt = load_model(tc.out)
        assert ckpt.state["world_size"] in (2, 4)
        for k, v in one.model.state_dict().items():
            torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-4, atol=1e-5, msg=k)
        assert not os.path.exists(os.path.join(tc.out, "plots"))  # plots=False; nothing else written


@pytest.mark.slow
def test_resume_across_world_sizes_keeps_the_optimizer_moments(tmp_path):
    """A one-process checkpoint resumed under EP, and an EP checkpoint resumed by one process,
    continue the straight run (to float tolerance: sums run in another order)."""
    write_text(tmp_path / "text.txt")
    straight = train(run_config(tmp_path, "straight"), TRAIN_CFG)
    # one process to step 3, then 2 EP ranks to step 6
    train(run_config(tmp_path, "a", stop_at=3), TRAIN_CFG)
    run_ranks(2, train_ranks, run_config(tmp_path, "a", batch_size=2, parallel="ep"), True, tmp_path=tmp_path)
    # 2 EP ranks to step 3, then one process to step 6
    run_ranks(2, train_ranks, run_config(tmp_path, "b", batch_size=2, parallel="ep", stop_at=3), False,
              tmp_path=tmp_path)
    ckpt = load_checkpoint(os.path.join(tmp_path, "b"))
    assert ckpt.step == 3 and ckpt.tensors["layers.1.ffn.experts.w1"].shape[0] == TRAIN_CFG.n_routed_experts
    moments = ckpt.state["optimizer"]["state"]
    assert any(v["exp_avg"].shape[0] == TRAIN_CFG.n_routed_experts and v["exp_avg"].dim() == 3
               for v in moments.values())  # the experts' AdamW moments were gathered too
    train(run_config(tmp_path, "b"), resume=True)
    for name in ("a", "b"):
        assert _losses(os.path.join(tmp_path, name)) == pytest.approx(_losses(straight.out), rel=1e-4), name


@pytest.mark.slow
def test_ep_resume_on_the_same_world_size_is_bit_for_bit(tmp_path):
    write_text(tmp_path / "text.txt")
    run_ranks(2, train_ranks, run_config(tmp_path, "straight", batch_size=2, parallel="ep"), False, tmp_path=tmp_path)
    run_ranks(2, train_ranks, run_config(tmp_path, "split", batch_size=2, parallel="ep", stop_at=3), False,
              tmp_path=tmp_path)
    run_ranks(2, train_ranks, run_config(tmp_path, "split", batch_size=2, parallel="ep"), True, tmp_path=tmp_path)
    a, b = load_checkpoint(str(tmp_path / "straight")), load_checkpoint(str(tmp_path / "split"))
    assert _losses(str(tmp_path / "straight")) == _losses(str(tmp_path / "split"))
    assert a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


# ------------------------------------------------------------------------------ errors, never hangs
def split_error(rank: int, world: int, tmp: str) -> str:
    tc = TrainConfig(out=os.path.join(tmp, "never"), steps=2, seq_len=16, parallel="ep", device="cpu",
                     data=os.path.join(tmp, "text.txt"), dist_timeout=30, progress=False)
    try:
        train(tc, TRAIN_CFG.replace(n_routed_experts=3, n_expert_groups=1, n_limited_groups=1))
    except ValueError as e:
        return str(e)
    return "no error"


def test_experts_not_divisible_by_the_world_is_a_clear_error_before_the_run_folder(tmp_path):
    write_text(tmp_path / "text.txt")
    errors = run_ranks(2, split_error, str(tmp_path), tmp_path=tmp_path)
    for e in errors:
        assert "n_routed_experts divisible by 2" in e and "n_routed_experts=3" in e, e
    assert not os.path.exists(tmp_path / "never")


def never_joined(rank: int, world: int, tmp: str) -> tuple[int, str, float]:
    """Rank 0 of a world of 2 whose rank 1 never starts: python -m moe train's exit code and stderr."""
    import contextlib
    import io

    from moe.__main__ import main

    os.environ["WORLD_SIZE"] = "2"
    err = io.StringIO()
    t0 = time.monotonic()
    with contextlib.redirect_stderr(err):
        code = main(["train", "--parallel", "ep", "--dist-timeout", "2", "--out", os.path.join(tmp, "run"),
                     "--device", "cpu"])
    return code, err.getvalue(), time.monotonic() - t0


def test_a_rank_that_never_starts_fails_with_a_clear_error_not_a_hang(tmp_path):
    """The group never forms; after --dist-timeout the CLI says so in one line and exits 2."""
    [(code, err, seconds)] = run_ranks(1, never_joined, str(tmp_path), tmp_path=tmp_path)
    assert code == 2, err
    assert "the 2 processes did not all join" in err and "did every process start" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert seconds < 30
    assert not os.path.exists(tmp_path / "run")


def test_launch_mistakes_are_one_line_errors(monkeypatch, tmp_path):
    from moe.__main__ import main

    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="launch it with torchrun --nproc_per_node N"):
        parallel.setup("ep", None, torch.device("cpu"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="--parallel is none"):
        parallel.setup("none", None, torch.device("cpu"))
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=r"--ep-size 4 must divide the number of processes \(2\)"):
        parallel.setup("ep", 4, torch.device("cpu"))
    assert main(["train", "--out", str(tmp_path / "x"), "--steps", "1"]) == 2
    assert not os.path.exists(tmp_path / "x")


def test_one_process_is_untouched():
    """Without --parallel nothing changes: no process group, the model keeps its Experts."""
    ps = parallel.setup("none", None, torch.device("cpu")) if "WORLD_SIZE" not in os.environ else parallel.Parallel()
    model = ps.parallelize(Transformer(TRAIN_CFG))
    assert ps.group is None and ps.is_main and ps.world == 1
    assert not any(isinstance(m, ExpertParallel) for m in model.modules())
    assert all(m.group is None for m in moe_layers(model))
    assert ps.full_state(model, build_optimizer(model, TrainConfig())) == (None, None)


# ------------------------------------------------------------------------------ the launcher itself
@pytest.mark.slow
def test_torchrun_cli_trains_ep_like_one_process(tmp_path):
    """The command from the README: torchrun --nproc_per_node 2 -m moe train --parallel ep."""
    text = write_text(tmp_path / "text.txt")
    small = {"dim": 16, "n_layers": 2, "n_heads": 2, "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
             "v_head_dim": 8, "inter_dim": 32, "moe_inter_dim": 8}
    one = train(TrainConfig(out=str(tmp_path / "one"), steps=4, batch_size=4, seq_len=16, eval_interval=2,
                            eval_windows=4, data=text, threads=1, progress=False, plots=False, device="cpu"),
                PRESETS["toy"].replace(**small))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    ep = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "moe", "train", "--parallel", "ep",
                         *[a for k, v in small.items() for a in ("--set", f"{k}={v}")], "--steps", "4",
                         "--batch-size", "2", "--seq-len", "16", "--eval-interval", "2", "--eval-windows", "4",
                         "--data", text, "--threads", "1", "--no-progress", "--no-plots", "--device", "cpu",
                         "--dist-timeout", "60", "--out", str(tmp_path / "ep")],
                        env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}, capture_output=True,
                        text=True, timeout=120)
    assert ep.returncode == 0, ep.stderr
    assert ep.stdout.count("run folder:") == 1  # only rank 0 prints the summary
    assert _losses(str(tmp_path / "ep")) == pytest.approx(_losses(one.out), rel=1e-4)
    model, _ = load_model(str(tmp_path / "ep"))
    assert model.layers[1].ffn.experts.w1.shape[0] == PRESETS["toy"].n_routed_experts


# ------------------------------------------------------------------------------ the traffic model
V3 = PRESETS["deepseek-v3"]


def test_rows_leaving_a_rank_match_uniform_routing():
    """K (ep - 1) / ep rows per token leave its rank when every expert is equally likely."""
    E, K, g = V3.n_routed_experts, V3.n_activated_experts, torch.Generator().manual_seed(0)
    experts_TK = torch.rand(20000, E, generator=g).topk(K, dim=1).indices  # K distinct, uniform
    for ep in (8, 64):
        left = (experts_TK // (E // ep) != 0).sum(1).float().mean()  # the token lives on rank 0
        assert float(left) == pytest.approx(ep_traffic(V3, ep)["rows_per_token_per_layer"], rel=0.01)


def test_node_counts_match_sampling_and_the_limit_halves_v3s_cross_node_rows():
    E, K, g = V3.n_routed_experts, V3.n_activated_experts, torch.Generator().manual_seed(0)
    n = ep_traffic(V3, 64, "fp8", max_nodes=4)["node_limited"]
    assert (n["nodes"], n["gpus_per_node"], n["max_nodes"]) == (8, 8, 4)
    experts_TK = torch.rand(20000, E, generator=g).topk(K, dim=1).indices
    node_TK = experts_TK // (E // 8)
    remote_nodes = torch.stack([(node_TK == j).any(1) for j in range(1, 8)], 1).sum(1).float().mean()
    rows = n["cross_node_rows_per_token_per_layer"]
    assert float(remote_nodes) == pytest.approx(rows["once_per_node"], rel=0.01)
    assert rows["per_assignment"] == 7.0 and rows["node_limited"] == 3.5 and rows["node_limited_max"] == 4
    assert n["reduction"] == 2.0


def test_traffic_bytes_per_token_and_step():
    t = ep_traffic(V3, 64, "fp8", batch_tokens=1000)
    D, rows = V3.dim, 8 * 63 / 64
    assert t["row_bytes"] == {"to_experts": D + 4 * D // 128, "to_tokens": 2 * D}  # FP8 + a scale per 128
    layer = t["bytes_per_token_per_layer"]
    assert layer["dispatch_fwd"] == layer["combine_bwd"] == rows * (D + 4 * D // 128)
    assert layer["combine_fwd"] == layer["dispatch_bwd"] == rows * 2 * D
    assert t["moe_layers"] == 58 + 1  # 58 MoE blocks and the MTP module's
    assert t["bytes_per_token"] == layer["total"] * 59 and t["bytes_per_step"] == 1000 * t["bytes_per_token"]
    bf16 = ep_traffic(V3, 64, "bf16")
    assert bf16["bytes_per_token_per_layer"]["total"] == 4 * rows * 2 * D
    assert ep_traffic(V3, 1)["bytes_per_token"] == 0  # one rank holds every expert: nothing moves


def test_calc_ep_flags(capsys):
    import json

    from moe.__main__ import main

    assert main(["calc", "--preset", "deepseek-v3", "--ep", "64", "--nodes", "4", "--comm-dtype", "fp8",
                 "--batch-tokens", "62914560", "--gpus", "2048", "--json"]) == 0
    a = json.loads(capsys.readouterr().out)["all_to_all"]
    assert a["ep"] == 64 and a["node_limited"]["max_nodes"] == 4
    assert a["bytes_per_step_per_gpu"] == pytest.approx(a["bytes_per_token"] * 62914560 / 2048)
    assert main(["calc", "--preset", "deepseek-v3", "--ep", "64", "--nodes", "4"]) == 0
    text = capsys.readouterr().out
    assert "all-to-all, EP over 64 ranks (bf16)" in text and "node-limited (2x less)" in text
    for bad, msg in ((["--ep", "3"], "--ep must be a divisor of n_routed_experts=256, got 3"),
                     (["--nodes", "4"], "--nodes (each token's experts on at most M nodes) needs --ep N"),
                     (["--ep", "64", "--nodes", "9"], "--nodes must be between 1 and the 8 node(s)")):
        assert main(["calc", "--preset", "deepseek-v3", *bad]) == 2
        assert msg in capsys.readouterr().err
