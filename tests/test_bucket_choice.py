"""choose_buckets against an exhaustive search over every bucket set, and run_cost against a
per-batch loop."""
import itertools

import numpy as np
import pytest

from adapters_jax.data.bucket_choice import choose_buckets, run_cost


def _loop_cost(buckets, lengths, step_s, compile_s):
    used = [min(b for b in buckets if b >= n) for n in lengths]
    return compile_s * len(set(used)) + sum(step_s(u) for u in used)


@pytest.mark.parametrize("seed", range(6))
def test_choice_is_the_exhaustive_optimum(seed):
    rng = np.random.default_rng(seed)
    max_length, multiple = 64, 8
    lengths = np.minimum(rng.gamma(4.0, 6.0, size=int(rng.integers(5, 300))).astype(int) + 1, max_length)
    a, b, c = rng.uniform(0, 0.05), rng.uniform(1e-3, 1e-2), rng.uniform(0, 1e-4)
    step_s = lambda n: a + b * n + c * n * n  # noqa: E731  a step: fixed + per token + attention
    compile_s = float(rng.choice([0.0, 0.5, 3.0, 50.0]))
    inner = list(range(multiple, max_length, multiple))
    brute = min(_loop_cost(tuple(s) + (max_length,), lengths, step_s, compile_s)
                for r in range(len(inner) + 1) for s in itertools.combinations(inner, r))
    chosen = choose_buckets(lengths, step_s, compile_s, max_length, multiple)
    assert chosen[-1] == max_length and list(chosen) == sorted(set(chosen))
    assert all(x % multiple == 0 for x in chosen[:-1])
    assert _loop_cost(chosen, lengths, step_s, compile_s) == pytest.approx(brute, rel=1e-12)
    assert run_cost(chosen, lengths, step_s, compile_s) == pytest.approx(brute, rel=1e-12)


def test_free_compiles_give_every_needed_bucket_and_dear_ones_give_one():
    lengths = [3, 9, 9, 17, 30, 31]
    step_s = lambda n: float(n)  # noqa: E731
    assert choose_buckets(lengths, step_s, 0.0, 32, 8) == (8, 16, 24, 32)  # each batch at its own bucket
    assert choose_buckets(lengths, step_s, 1e6, 32, 8) == (32,)  # one compile beats any padding
    assert choose_buckets([], step_s, 1.0, 32, 8) == (32,)


def test_unused_max_length_costs_nothing():
    step_s = lambda n: float(n)  # noqa: E731
    assert run_cost((16, 128), [5, 16], step_s, 10.0) == pytest.approx(10.0 + 32.0)


def test_bad_lengths_name_the_limit():
    with pytest.raises(ValueError, match="max_length=32"):
        choose_buckets([40], float, 1.0, 32)
    with pytest.raises(ValueError, match="largest bucket 32"):
        run_cost((16, 32), [40], float, 1.0)


def test_choose_buckets_cli_times_its_optimum_and_beats_the_other_sets(tmp_path):
    """The tool on the smoke config: every bucket of its pick was timed (not interpolated), and
    its predicted time is the least of the sets it reports."""
    import json
    import subprocess
    import sys
    out = tmp_path / "buckets.json"
    run = subprocess.run([sys.executable, "-m", "experiments.choose_buckets", "--config=configs/houlsby_r64.py:smoke",
                          "--config.train.num_steps=40", "--lengths=16", "--steps=2", f"--out={out}"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert result["steps"] == 40 and set(rows) == {"config", "optimum", "one bucket", "every 8"}
    assert {str(b) for b in rows["optimum"]["buckets"]} <= set(result["measured"])
    assert all(rows["optimum"]["total_s"] <= r["total_s"] + 1e-9 for r in rows.values())
    for r in rows.values():
        assert r["total_s"] == pytest.approx(r["compile_s"] + r["steps_s"])
        assert r["compiles"] == pytest.approx(r["compile_s"] / result["compile_s"])
    assert (tmp_path / "buckets.md").exists() and (tmp_path / "buckets.png").stat().st_size > 0
