"""The hand-written expert paths keep no state between calls that could change a result.

Two micro-batches (or activation checkpointing) run two forwards before their backwards, and a
step's output is kept while the next runs. A saved tensor or an output sharing storage with a later
call's buffers (a reused scratch buffer, a cached view) would be overwritten: these tests catch it.
"""

import torch

from tests.test_perf_paths import FAST, assert_all_close, expert_weights, loop_then_scatter_add, random_dispatch


@FAST
def test_interleaved_calls_give_the_references_values_and_gradients(fast):
    """Two forwards, then their backwards in reverse order: every result equals the reference's."""
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

    assert_all_close(run(fast, [1, 0]), run(loop_then_scatter_add, [0, 1]), rtol=1e-5, atol=1e-5)


@FAST
def test_an_output_is_not_changed_by_the_next_call(fast):
    T, E, K, D, I = 40, 8, 2, 16, 8
    g = torch.Generator().manual_seed(1)
    weights = expert_weights(E, D, I, g)
    d = random_dispatch(T, E, K, g)
    x1, x2, s = torch.randn(T, D, generator=g), torch.randn(T, D, generator=g), torch.rand(T * K, generator=g)
    y1 = fast(x1, d.order_N // K, s, d.counts_E, *weights)
    kept = y1.clone()
    fast(x2, d.order_N // K, s, d.counts_E, *weights)
    torch.testing.assert_close(y1, kept, rtol=0, atol=0)


@FAST
def test_checkpointed_micro_batches_give_the_references_gradients(fast):
    """Activation checkpointing re-runs each forward inside backward, after the other batch's forward."""
    from torch.utils.checkpoint import checkpoint

    T, E, K, D, I = 40, 8, 2, 16, 8
    g = torch.Generator().manual_seed(2)
    weights = expert_weights(E, D, I, g)
    batches = [(random_dispatch(T, E, K, g), torch.randn(T, D, generator=g), torch.rand(T * K, generator=g),
                torch.randn(T, D, generator=g)) for _ in range(2)]

    def grads(fn, ckpt):
        ws = [w.clone().requires_grad_(True) for w in weights]
        ys = []
        for d, x, s, _ in batches:
            args = (x.clone().requires_grad_(True), d.order_N // K, s.clone().requires_grad_(True), d.counts_E, *ws)
            ys.append(checkpoint(fn, *args, use_reentrant=False) if ckpt else fn(*args))
        for y, (*_, gout) in zip(reversed(ys), reversed(batches)):
            y.backward(gout)
        return [w.grad for w in ws]

    assert_all_close(grads(fast, True), grads(loop_then_scatter_add, False), rtol=1e-5, atol=1e-5)
