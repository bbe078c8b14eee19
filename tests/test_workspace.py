"""moe.workspace: the CPU expert paths' scratch buffers are reused, and never change a result.

A lease hands out kept buffers; a nested lease gets fresh ones; the pool keeps at most `keep`;
CUDA-like devices are never pooled. Through the expert paths: results and saved tensors never
alias a scratch buffer, so interleaved forwards and backwards (two micro-batches, activation
checkpointing) give the reference's values and gradients.
"""

import pytest
import torch

from moe.experts import experts_bucketed, experts_loop_add, sort_by_expert
from moe.workspace import WORKSPACE, Workspace
from tests.test_perf_paths import assert_all_close, expert_weights, loop_then_scatter_add, random_dispatch


def test_a_lease_reuses_the_previous_leases_buffer():
    ws, like = Workspace(), torch.zeros(1)
    with ws.lease() as lease:
        first = lease.empty(like, 10, 4)
    with ws.lease() as lease:
        again = lease.empty(like, 9, 4)  # smaller fits in the kept one
        bigger = lease.empty(like, 100, 4)  # does not: a fresh buffer
    assert again.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
    assert bigger.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
    assert again.shape == (9, 4) and again.is_contiguous()


def test_a_nested_lease_gets_fresh_buffers_and_the_pool_stays_bounded():
    ws, like = Workspace(keep=2), torch.zeros(1)
    with ws.lease() as lease:
        kept = lease.empty(like, 8)
    with ws.lease() as outer:
        held = outer.empty(like, 8)
        with ws.lease() as inner:
            other = inner.empty(like, 8)
        assert other.untyped_storage().data_ptr() != held.untyped_storage().data_ptr()
        assert held.untyped_storage().data_ptr() == kept.untyped_storage().data_ptr()
        for n in (1, 2, 3):
            outer.empty(like, n)
    assert len(ws._free) == 2  # the two largest are kept
    assert ws.nbytes() == 2 * 9 * 4  # 8 elements + an eighth spare, fp32
    ws.clear()
    assert ws.nbytes() == 0


def test_dtypes_do_not_share_and_other_devices_are_not_pooled():
    ws = Workspace()
    with ws.lease() as lease:
        f32 = lease.empty(torch.zeros(1), 16)
    with ws.lease() as lease:
        f64 = lease.empty(torch.zeros(1, dtype=torch.float64), 4)
        meta = lease.empty(torch.zeros(1, device="meta"), 16)
    assert f64.dtype == torch.float64 and f64.untyped_storage().data_ptr() != f32.untyped_storage().data_ptr()
    assert meta.device.type == "meta"
    assert all(b.device.type == "cpu" for b in ws._free)


@pytest.mark.parametrize("fast", [experts_loop_add, experts_bucketed], ids=["loop_add", "bucketed"])
def test_interleaved_calls_give_the_references_values_and_gradients(fast):
    """Two forwards, then their backwards in reverse order: every result equals the reference's.
    A saved tensor or an output that lived in a scratch buffer would be overwritten by the second call."""
    T, E, K, D, I = 48, 8, 3, 32, 16
    g = torch.Generator().manual_seed(0)
    weights = expert_weights(E, D, I, g)
    batches = []
    for _ in range(2):
        d = random_dispatch(T, E, K, g)
        batches.append((d.order_N // K, d.counts_E, torch.randn(T, D, generator=g), torch.rand(T * K, generator=g),
                        torch.randn(T, D, generator=g)))

    def run(fn, order):
        leaves = [[w.clone().requires_grad_(True) for w in weights] for _ in batches]
        xs = [(x.clone().requires_grad_(True), s.clone().requires_grad_(True)) for _, _, x, s, _ in batches]
        ys = [fn(x, token_N, s, counts_E, *ws) for (token_N, counts_E, *_), (x, s), ws in zip(batches, xs, leaves)]
        values = [y.detach().clone() for y in ys]
        for i in order:
            ys[i].backward(batches[i][4])
        return values + [t.grad for pair in xs for t in pair] + [w.grad for ws in leaves for w in ws]

    WORKSPACE.clear()
    assert_all_close(run(fast, [1, 0]), run(loop_then_scatter_add, [0, 1]), rtol=1e-5, atol=1e-5)
    assert WORKSPACE.nbytes() > 0  # the fast path did use the pool


def test_an_output_is_not_changed_by_the_next_call():
    T, E, K, D, I = 40, 8, 2, 16, 8
    g = torch.Generator().manual_seed(1)
    weights = expert_weights(E, D, I, g)
    d = sort_by_expert(torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]), E)
    x1, x2, s = torch.randn(T, D, generator=g), torch.randn(T, D, generator=g), torch.rand(T * K, generator=g)
    for fast in (experts_loop_add, experts_bucketed):
        y1 = fast(x1, d.order_N // K, s, d.counts_E, *weights)
        kept = y1.clone()
        fast(x2, d.order_N // K, s, d.counts_E, *weights)
        torch.testing.assert_close(y1, kept, rtol=0, atol=0)
