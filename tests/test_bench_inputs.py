"""Bad input to a benchmark: exit code 2 and one line naming the flag, before anything is built or timed."""

from __future__ import annotations

import functools
import importlib.util
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="--device cuda is valid here")


@functools.cache
def bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cases(script: str, *bad: tuple) -> list:
    """(script, argv, the flag the error names) per bad input; a 4th item: pytest marks."""
    return [pytest.param(script, argv.split(), flag, marks=rest, id=f"{script} {argv}") for argv, flag, *rest in bad]


BAD = [
    *cases("moe_layer",
           ("--sizes 8y256", "--sizes"), ("--sizes 0x256", "--sizes"), ("--sizes 8x256,", "--sizes"),
           ("--device xyz", "--device"), ("--device cuda", "--device", NO_CUDA),
           ("--impls xyz", "--impls"), ("--hf-impls xyz", "--hf-impls"),
           ("--rounds 0", "--rounds"), ("--steps -1", "--steps"), ("--threads 0", "--threads"),
           ("--warmup -1", "--warmup"), ("--max-gb -1", "--max-gb"), ("--repeat 0", "--repeat"),
           ("--crossover-tokens 8,abc", "--crossover-tokens"), ("--crossover-tokens 0", "--crossover-tokens"),
           ("--set foo=1", "--set"), ("--set dim=abc", "--set"), ("--set n_activated_experts=100", "--set"),
           ("--crossover --breakdown", "--breakdown"), ("--roofline --crossover", "--crossover"),
           ("--preset-size nosuch", "--preset-size")),
    *cases("train_step",
           ("--preset nosuch", "--preset"), ("--set foo=1", "--set"), ("--set n_activated_experts=100", "--set"),
           ("--impls xyz", "--impls"), ("--fp8 xyz", "--fp8"), ("--batch-size 0", "--batch-size"),
           ("--seq-len -1", "--seq-len"), ("--seq-len 100000", "--seq-len"),
           ("--device xyz", "--device"), ("--device cuda", "--device", NO_CUDA),
           ("--threads 0", "--threads"), ("--rounds 0", "--rounds"), ("--steps -1", "--steps"),
           ("--segment 0", "--segment"), ("--segment 5", "--segment"),
           ("--warmup -1", "--warmup"), ("--profile-rows -1", "--profile-rows")),
    *cases("decode",
           ("--preset nosuch", "--preset"), ("--set foo=1", "--set"), ("--attn xyz", "--attn"),
           ("--set n_heads=3 --attn mha", "--attn"), ("--impls xyz", "--impls"),
           ("--checkpoint /nonexist", "--checkpoint"), ("--checkpoint /etc/passwd", "--checkpoint"),
           ("--prompt-len 0", "--prompt-len"), ("--prompt-len 100000", "--prompt-len"),
           ("--prompt-len 256", "--prompt-len"), ("--prompt-len 200 --new 100", "--new"), ("--new -1", "--new"),
           ("--device xyz", "--device"), ("--device cuda", "--device", NO_CUDA),
           ("--threads 0", "--threads"), ("--rounds 0", "--rounds")),
    *cases("ep_step",
           ("--worlds 0", "--worlds"), ("--worlds abc", "--worlds"), ("--worlds 3", "--worlds 3"),
           ("--worlds 2 --set capacity_factor=1.0", "--worlds 2"), ("--preset nosuch", "--preset"),
           ("--set foo=1", "--set"), ("--batch-size 0", "--batch-size"), ("--seq-len -1", "--seq-len"),
           ("--steps 0", "--steps"), ("--warmup -1", "--warmup")),
]


@pytest.mark.parametrize("script, argv, flag", BAD)
def test_bad_input_exits_2_naming_the_flag_before_any_work(script, argv, flag, capsys):
    threads = torch.get_num_threads()
    with pytest.raises(SystemExit) as e:
        bench(script).main(argv)
    assert e.value.code == 2
    out, err = capsys.readouterr()
    message = err.strip().splitlines()[-1]
    assert ": error: " in message and flag in message.split(": error: ", 1)[1], err
    assert "Traceback" not in err and out == ""  # nothing printed: no run started
    assert torch.get_num_threads() == threads  # nor any setting changed


def test_the_error_says_what_is_allowed(capsys):
    for script, argv, allowed in [("moe_layer", ["--impls", "xyz"], "auto|loop|bucketed|grouped"),
                                  ("train_step", ["--fp8", "xyz"], "blockwise"),
                                  ("decode", ["--attn", "xyz"], "mha|mla"),
                                  ("ep_step", ["--worlds", "abc"], "positive integers")]:
        with pytest.raises(SystemExit):
            bench(script).main(argv)
        assert allowed in capsys.readouterr().err
