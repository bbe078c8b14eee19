"""experiments/parallel_traffic.py --quick: the figures and the JSON behind docs/parallel.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parallel_traffic_quick(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "parallel_traffic.py"), "--quick",
                        "--out", str(out)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": REPO})
    assert p.returncode == 0, p.stderr
    assert "DeepSeek-V3 all-to-all per token" in p.stdout
    for name in ("parallel_dispatch.png", "parallel_traffic.png", "results.json"):
        assert (out / name).stat().st_size > 1000, name
    r = json.loads((out / "results.json").read_text())
    v3 = r["deepseek_v3"]
    assert v3["ep_sizes"] == [8, 64]
    fp8, bf16 = v3["traffic"]["fp8"], v3["traffic"]["bf16"]
    assert all(a["bytes_per_token"] < b["bytes_per_token"] for a, b in zip(fp8, bf16))  # FP8 dispatch saves
    assert fp8[0]["bytes_per_token"] < fp8[1]["bytes_per_token"]  # more ranks: fewer rows stay home
    assert v3["node_limited"]["node_limited"]["reduction"] == 2.0
    assert v3["bytes_per_step_per_gpu_fp8"] == v3["node_limited"]["bytes_per_step"] / 2048
    ex = r["dispatch_example"]
    assert len(ex["experts_by_rank"]) == 2 and all(len(set(t)) == 2 for rank in ex["experts_by_rank"] for t in rank)
