"""Bad configs and bad data rows through the real CLI (`python -m experiments.train`): each fails
with exit status 1 and ONE line `error: ...` naming the field or the row, never a traceback;
with `data.skip_bad_rows=True` training goes on and reports what it skipped.

The cases run in one driver process (this file run as a module) that imports the library once
and forks a child per command line. Each child executes experiments/train.py as `__main__`
with its own argv, exactly as the shell would. The driver runs with 8 forced host devices, so
the global-batch case sees a real device count of 8.
"""
import json
import os
import runpy
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, L = "configs/houlsby_r64.py:smoke", "configs/lora_r8.py:smoke"

# (config, overrides, text the one error line must hold). The field is named in every needle.
CASES = [
    # unknown adapter type or site
    (H, ["--config.adapter.method=houlsbie"], "adapter.method='houlsbie' is unknown"),
    (L, ["--config.adapter.lora_sites=('query','valu')"], "adapter.lora_sites=('query', 'valu'): choose from"),
    (H, ["--config.adapter.activation=softplus"], "adapter.activation='softplus'"),
    # bottleneck_dim <= 0 or > d_model
    (H, ["--config.adapter.bottleneck_dim=0"], "adapter.bottleneck_dim=0 must be > 0"),
    (H, ["--config.adapter.bottleneck_dim=-3"], "adapter.bottleneck_dim=-3 must be > 0"),
    (H, ["--config.adapter.bottleneck_dim=1000"], "adapter.bottleneck_dim=1000 exceeds the model width d_model=32"),
    # layers out of range or unreadable
    (H, ["--config.adapter.layers=0-9"], "adapter.layers: adapter layer 2 is out of range"),
    (H, ["--config.adapter.layers=first"], "adapter.layers='first'"),
    (H, ["--config.adapter.adapter_drop=99"], "adapter.adapter_drop=99 must be in 0..2"),
    # lr <= 0 and other numeric ranges
    (H, ["--config.optim.lr=-1"], "optim.lr=-1.0 must be > 0"),
    (H, ["--config.optim.lr=0"], "optim.lr=0.0 must be > 0"),
    (H, ["--config.optim.warmup_ratio=2"], "optim.warmup_ratio=2.0 must be in [0, 1]"),
    (H, ["--config.head.dropout=1.5"], "head.dropout=1.5 must be in [0, 1)"),
    (H, ["--config.data.max_length=1"], "data.max_length=1 must be >= 2"),
    (H, ["--config.train.batch_size=0"], "train.batch_size=0 must be > 0"),
    (H, ["--config.train.accum_steps=3"], "train.batch_size=8 is not divisible by train.accum_steps=3"),
    (H, ["--config.train.streams=0"], "train.streams=0 must be > 0"),
    (H, ["--config.train.cpu_scheduler=fast"], "train.cpu_scheduler='fast' is not one of ['default', 'memory']"),
    (H, ["--config.parallelism=pmap", "--config.train.cpu_scheduler=memory"],
     "train.cpu_scheduler='memory' needs parallelism='jit'"),
    # global batch not divisible by the device count (8 forced host devices)
    (H, ["--config.train.batch_size=12", "--config.data.pack=false"],
     "train.batch_size=12 is not divisible by the device count 8"),
    (H, ["--config.data.pack_rows=4"], "data.pack_rows=4 is not divisible by the device count 8"),
    (H, ["--config.data.pack_rows=3", "--config.train.accum_steps=2"],
     "data.pack_rows=3 must be 0 (auto) or a positive multiple of train.accum_steps=2"),
    (H, ["--config.data.pack=yes"], "data.pack='yes' must be 'auto', 'true' or 'false'"),
    (H, ["--config.model.name=tiny-random-llama", "--config.data.pack=true", "--config.task=lm",
         "--config.metric=perplexity"], "data.pack=true: task='lm' (packing is for classification"),
    (H, ["--config.mesh.fsdp=3"], "mesh.fsdp=3 must divide the device count 8"),
    (H, ["--config.mesh.cpu_devices=-2"], "mesh.cpu_devices=-2 must be an integer >= 0"),
    # a causal decoder's first token has read nothing after it
    (H, ["--config.model.name=tiny-random-llama", "--config.head.pooling=cls"], "head.pooling='cls' reads the first token"),
    # unknown names
    (H, ["--config.data.name=imdb"], "data.name='imdb': unknown dataset"),
    (H, ["--config.metric=f1"], "metric='f1' is not a classification metric"),
    (H, ["--config.model.dtype=fp8"], "model.dtype='fp8'"),
    (H, ["--config.model.frozen_dtype=int8"], "model.frozen_dtype='int8'"),
    (H, ["--config.model.attention_backward=flash"], "model.attention_backward='flash' is not one of"),
    (H, ["--config.head.pooling=max"], "head.pooling='max'"),
    (H, ["--config.optim.schedule=step"], "optim.schedule='step'"),
    (H, ["--config.parallelism=tpu"], "parallelism='tpu'"),
    (H, ["--config.train.batch_sise=8"], "unknown config field"),
    (H, ["--config.init_from=/nonexistent/run/adapter"], "init_from: /nonexistent/run/adapter/adapter_config.json: missing"),
    # wrongly typed overrides
    (H, ["--config.train.batch_size=eight"], "--config.train.batch_size=eight"),
    (H, ["--config.optim.lr=fast"], "--config.optim.lr=fast"),
    (H, ["--config.adapter.bottleneck_dim=1.5"], "--config.adapter.bottleneck_dim=1.5"),
    (H, ["--config.train.skip_nonfinite=maybe"], "--config.train.skip_nonfinite=maybe"),
    (H, ["--config.model.skip_unread_rows=maybe"], "--config.model.skip_unread_rows=maybe"),
]


def _id(case):
    return case[1][0].split("--config.")[-1][:40]


# --- the driver: one fork per command line ----------------------------------------------------

def _child(argv, out_path, err_path):
    with open(out_path, "w") as o, open(err_path, "w") as e:
        os.dup2(o.fileno(), 1)
        os.dup2(e.fileno(), 2)
    sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
    sys.argv = ["experiments/train.py", *argv]
    code = 0
    try:
        runpy.run_module("experiments.train", run_name="__main__", alter_sys=True)
    except SystemExit as ex:
        code = ex.code if isinstance(ex.code, int) else (0 if ex.code is None else 1)
        if not isinstance(ex.code, (int, type(None))):
            print(ex.code, file=sys.stderr)
    except BaseException:  # what the interpreter does with an uncaught exception
        import traceback
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_cli(cases: list) -> list:
    """[{rc, stdout, stderr}] for each argv in `cases` (call only in a process with no JAX backend)."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, argv in enumerate(cases):
            out, err = os.path.join(tmp, f"{i}.out"), os.path.join(tmp, f"{i}.err")
            pid = os.fork()
            if pid == 0:
                _child(argv, out, err)
            _, status = os.waitpid(pid, 0)
            results.append({"rc": os.waitstatus_to_exitcode(status), "stdout": open(out).read(),
                            "stderr": open(err).read()})
    return results


def run_cli_in_subprocess(cases: list, devices: int = 8) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "cases.json"), os.path.join(tmp, "results.json")
        with open(src, "w") as f:
            json.dump(cases, f)
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        out = subprocess.run([sys.executable, "-m", "tests.test_bad_inputs", src, dst], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        with open(dst) as f:
            return json.load(f)


# --- the tests --------------------------------------------------------------------------------

def _rows_csv(path, bad_rows):
    good = ["a warm and funny film,pos", "dull and far too long,neg", "a delight from start to end,pos",
            "the plot never lands,neg", "great cast and score,pos", "tedious,neg"] * 3
    lines = ["text,label"] + good[:2] + bad_rows + good[2:]
    path.write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    return str(path)


BAD_ROWS = [",neg", "no label here,", "caf\xe9 au lait,pos", "y" * 100_001 + ",pos", "one,two,three"]


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """Every command line of this file, run once: {key: result}."""
    tmp = tmp_path_factory.mktemp("cli")
    argvs = {f"case{i}": [f"--config={cfg}", f"--workdir={tmp / f'case{i}'}", *over]
             for i, (cfg, over, _) in enumerate(CASES)}
    files = f"train={_rows_csv(tmp / 'train.csv', BAD_ROWS)},validation={_rows_csv(tmp / 'dev.csv', [])}"
    data = [H, "--config.data.name=files", f"--config.data.files={files}", f"--config.data.data_dir={tmp / 'tfds'}"]
    argvs["rows_strict"] = [f"--config={data[0]}", f"--workdir={tmp / 'strict'}", *data[1:]]
    argvs["rows_skip"] = [f"--config={data[0]}", f"--workdir={tmp / 'skip'}", *data[1:],
                          "--config.data.skip_bad_rows=True", "--config.train.num_steps=2",
                          f"--config.data.data_dir={tmp / 'tfds_skip'}"]
    keys = list(argvs)
    return dict(zip(keys, run_cli_in_subprocess([argvs[k] for k in keys])))


def _one_error_line(result) -> str:
    assert result["rc"] == 1, (result["rc"], result["stdout"][-1000:], result["stderr"][-2000:])
    assert "Traceback" not in result["stderr"], result["stderr"][-3000:]
    last = result["stderr"].strip().splitlines()[-1]
    assert last.startswith("error: "), result["stderr"][-2000:]
    return last


def test_the_table_covers_the_issue():
    assert len(CASES) >= 15
    needles = " ".join(n for _, _, n in CASES)
    for what in ("adapter.method", "lora_sites", "bottleneck_dim=0", "exceeds the model width", "out of range",
                 "optim.lr=0.0", "device count 8", "data.name", "batch_size=eight"):
        assert what in needles


@pytest.mark.parametrize("index", range(len(CASES)), ids=[_id(c) for c in CASES])
def test_bad_config_fails_in_one_line_naming_the_field(cli, index):
    last = _one_error_line(cli[f"case{index}"])
    assert CASES[index][2] in last, last


def test_bad_rows_are_refused_with_their_row_number(cli):
    last = _one_error_line(cli["rows_strict"])
    assert "train.csv: row 3: empty or missing text" in last and "skip_bad_rows" in last


def test_bad_rows_are_skipped_and_counted_and_training_proceeds(cli):
    r = cli["rows_skip"]
    assert r["rc"] == 0, r["stderr"][-3000:]
    assert "adapter export" in r["stdout"]
    out = r["stdout"] + r["stderr"]
    line = next((l for l in out.splitlines() if "skipped bad rows" in l), "")
    for reason in ("empty_text", "missing_label", "non_utf8", "too_long", "malformed"):
        assert f"'{reason}': 1" in line, out[-3000:]


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import absl.flags  # noqa: F401  the heavy imports, once; no JAX backend is created here
    import ml_collections.config_flags  # noqa: F401
    import adapters_jax.train_loop  # noqa: F401
    with open(sys.argv[1]) as f:
        todo = json.load(f)
    with open(sys.argv[2], "w") as f:
        json.dump(run_cli(todo), f)
