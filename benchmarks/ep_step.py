"""Training-step time of the toy model under expert parallelism on 1, 2 and 4 CPU processes.

One global batch (default 8 sequences of 128 tokens) is split over the processes; each step
is what `moe.train` does under `--parallel ep`: forward, backward, the gradient reduction,
global clipping, AdamW, the global routing counts and the bias update. Processes are forked
and join a gloo group on 127.0.0.1, one intra-op thread each. Also timed: the all-to-alls
(forward and backward, the counts exchange included) and the gradient all-reduce.

On a machine with fewer cores than processes this is not faster, and it is not meant to be:
the point is that the same code runs distributed, and what the communication costs.

  python benchmarks/ep_step.py                      # 1, 2, 4 processes, 8 x 128 tokens, 10 steps
  python benchmarks/ep_step.py --worlds 1,2 --steps 20 --json runs/ep_step.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe import parallel  # noqa: E402
from moe.balance import update_bias  # noqa: E402
from moe.cli import comma_list, config_from, non_negative_int, positive_int  # noqa: E402
from moe.config import get_preset, parse_overrides  # noqa: E402
from moe.layer import reset_routing_stats  # noqa: E402
from moe.model import Transformer  # noqa: E402
from moe.train import TrainConfig, build_optimizer  # noqa: E402


def _timed(fn, clock: list[float]):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            clock[0] += time.perf_counter() - t0
    return wrapper


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    ps = parallel.setup("ep" if world > 1 else "none", None, torch.device("cpu"), timeout_s=120)
    a2a, reduce = [0.0], [0.0]  # seconds inside the all-to-alls and the gradient all-reduce
    # every all_to_all_single: the counts exchange and the rows, forward and backward
    parallel.dist.all_to_all_single = _timed(parallel.dist.all_to_all_single, a2a)
    cfg = get_preset(args.preset).replace(**parse_overrides(args.set))
    torch.manual_seed(0)
    model = ps.parallelize(Transformer(cfg))
    opt = build_optimizer(model, TrainConfig())
    params = [p for p in model.parameters() if p.requires_grad]
    B = args.batch_size // world
    times, a2a_s, reduce_s = [], [], []
    for step in range(args.warmup + args.steps):
        g = torch.Generator().manual_seed(step)
        tokens = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), generator=g)
        tokens = tokens[rank * B:(rank + 1) * B]
        ps.barrier()
        a2a[0] = reduce[0] = 0.0
        t0 = time.perf_counter()
        _, losses = model(tokens[:, :-1], tokens[:, 1:])
        losses["loss"].backward()
        t1 = time.perf_counter()
        ps.reduce_gradients(model)
        reduce[0] = time.perf_counter() - t1
        ps.clip_grad_norm_(model, params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ps.all_reduce_routing_stats(model)
        update_bias(model)
        reset_routing_stats(model)
        ps.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            a2a_s.append(a2a[0])
            reduce_s.append(reduce[0])
    parallel.teardown(ps)
    if rank == 0:
        with open(os.path.join(out_dir, f"world{world}.json"), "w") as f:
            json.dump({"step_s": times, "all_to_all_s": a2a_s, "grad_reduce_s": reduce_s}, f)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="EP step time on 1, 2, 4 CPU processes")
    ap.add_argument("--worlds", default="1,2,4", help="process counts, comma-separated",
                    type=comma_list(lambda w: w.isdecimal() and int(w) > 0, "positive integers"))
    ap.add_argument("--preset", default="toy")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--batch-size", type=positive_int, default=8,
                    help="sequences in the global batch (split over ranks)")
    ap.add_argument("--seq-len", type=positive_int, default=128)
    ap.add_argument("--steps", type=positive_int, default=10)
    ap.add_argument("--warmup", type=non_negative_int, default=2)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    cfg = config_from(ap, args.preset, args.set)  # as each worker builds it: checked once, before any fork
    if args.seq_len > cfg.max_seq_len:
        ap.error(f"--seq-len {args.seq_len}: longer than the model's max_seq_len={cfg.max_seq_len}")
    worlds = [int(w) for w in args.worlds.split(",")]
    for w in worlds:
        if args.batch_size % w:
            ap.error(f"--worlds {w}: --batch-size {args.batch_size} must be divisible by every world size")
        if w > 1:
            try:
                parallel.check_expert_split(cfg, w)  # what the workers' expert sharding would refuse
            except ValueError as e:
                ap.error(f"--worlds {w}: {e}")
    rows = {}
    with tempfile.TemporaryDirectory() as out_dir:
        for w in worlds:
            mp.start_processes(worker, args=(w, free_port(), args, out_dir), nprocs=w, start_method="fork")
            with open(os.path.join(out_dir, f"world{w}.json")) as f:
                r = json.load(f)
            rows[w] = {"step_ms_median": 1e3 * statistics.median(r["step_s"]),
                       "all_to_all_ms_median": 1e3 * statistics.median(r["all_to_all_s"]),
                       "grad_reduce_ms_median": 1e3 * statistics.median(r["grad_reduce_s"]),
                       "tokens_per_s": args.batch_size * args.seq_len / statistics.median(r["step_s"]), **r}
    base = rows[worlds[0]]["step_ms_median"]
    print(f"{args.preset}, global batch {args.batch_size} x {args.seq_len} tokens, {args.steps} steps, "
          "1 thread per process, gloo on 127.0.0.1")
    print(f"{'processes':>9} {'step ms':>9} {'vs ' + str(worlds[0]):>6} {'all-to-all ms':>14} "
          f"{'grad all-reduce ms':>19} {'tokens/s':>9}")
    for w, r in rows.items():
        print(f"{w:>9} {r['step_ms_median']:>9.1f} {r['step_ms_median'] / base:>6.2f} "
              f"{r['all_to_all_ms_median']:>14.1f} {r['grad_reduce_ms_median']:>19.1f} {r['tokens_per_s']:>9.0f}")
    lscpu = os.popen("lscpu 2>/dev/null | grep 'Model name'").read().split(":")[-1].strip()
    meta = {"host": lscpu, "cores": os.cpu_count(), "load": os.getloadavg(), "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "args": vars(args)}
    print(f"host: {meta['host']} ({meta['cores']} cores), load {meta['load'][0]:.2f}, {meta['date']}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
