"""Shared fixtures: the real MiniLM (loaded once per session) and its PyTorch oracle twin."""
import atexit
import os
import shutil
import tempfile

import pytest

# Tests see the CPU only and never fetch anything.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# One persistent XLA compilation cache for the session, shared with every subprocess the tests
# start: most CLI tests compile the same smoke programs, and a warm cache halves a smoke run
# (13.9 s -> 6.7 s measured). Results are unchanged: the cache is keyed by the program and flags.
# Under pytest-xdist the controller loads this file first, and its workers inherit the variable:
# they share its cache, and only the process that made the folder removes it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="adapters_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The quick brown fox jumps over the lazy dog.",
    "It's a lovely, heartfelt film that never once condescends to its audience.",
    "Dull.",
    "Despite strong performances, the script meanders for two hours without finding a point, "
    "and the ending feels both rushed and unearned.",
    "Stock markets in Asia fell sharply on Tuesday after weak manufacturing data.",
    "Can you recommend a good book about the history of mathematics?",
    "Ok",
]


@pytest.fixture(scope="session")
def minilm():
    from adapters_jax.hub import load_backbone
    return load_backbone("minilm-l6")


@pytest.fixture(scope="session")
def torch_minilm(minilm):
    transformers = pytest.importorskip("transformers")
    return transformers.BertModel.from_pretrained(minilm.path).eval()


@pytest.fixture(scope="session")
def export(tmp_path_factory):
    """A real adapter export (2-step Houlsby smoke run on the tiny random BERT), shared by the
    bad-adapter-file and property tests."""
    import importlib
    from adapters_jax.train_loop import train_and_evaluate
    config = importlib.import_module("configs.houlsby_r64").get_config("smoke")
    config.train.num_steps = 2
    work = tmp_path_factory.mktemp("run")
    train_and_evaluate(config, str(work))
    return str(work / "adapter")


@pytest.fixture(scope="session")
def server():
    """An AdapterServer over the tiny random BERT."""
    from adapters_jax.serving import AdapterServer
    return AdapterServer("tiny-random-bert", max_length=32)
