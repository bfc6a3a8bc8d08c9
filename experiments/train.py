"""python -m experiments.train --config configs/houlsby_r64.py [--workdir DIR] [--config.x=y ...]"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from experiments import host_malloc

config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
flags.DEFINE_string("workdir", None, "run directory (default: runs/<config name>)")
flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() first (pods, multi-host GPU)")
flags.DEFINE_string("coordinator", None, "with --multihost off a cluster: HOST:PORT of process 0")
flags.DEFINE_integer("num_processes", None, "with --coordinator: how many processes")
flags.DEFINE_integer("process_id", None, "with --coordinator: this process's index")
flags.DEFINE_string("compile_cache", os.path.join(os.path.expanduser("~"), ".cache", "adapters_jax", "xla"),
                    "persistent XLA compilation cache directory, so reruns, resumes and sweep trials skip "
                    "recompiling the same steps ('' turns it off; $JAX_COMPILATION_CACHE_DIR wins if set)")
flags.DEFINE_enum("host_malloc", "default", host_malloc.MODES,
                  "'tuned' restarts this process with glibc settings that keep XLA:CPU's step temporaries "
                  "resident, and dispatches synchronously on the CPU (faster CPU steps at about the "
                  "default's peak RSS; experiments/host_malloc.py)")
FLAGS = flags.FLAGS


def default_workdir(config_path: str) -> str:
    name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
    suffix = config_path.split(":", 1)[1].replace(",", "_").replace("=", "") if ":" in config_path else ""
    return os.path.join("runs", name + (f"_{suffix}" if suffix else ""))


def main(argv):
    del argv
    if FLAGS.host_malloc == "tuned":
        if not host_malloc.active():  # glibc reads its settings once, at start: start again
            os.execve(sys.executable, [sys.executable, "-m", "experiments.train", *sys.argv[1:]],
                      host_malloc.child_env("tuned"))
        print("host malloc: tuned (" + " ".join(f"{k}={os.environ.get(k)}" for k in host_malloc.TUNED) + "), "
              "synchronous CPU dispatch")
        host_malloc.configure_jax()
    from absl import logging
    logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
    logging.get_absl_handler().addFilter(_one_line_library_errors)
    import jax
    from adapters_jax.parallel import set_cpu_devices
    try:  # before anything starts the backend
        set_cpu_devices(FLAGS.config.mesh.get("cpu_devices", 0))
    except ValueError as e:
        _exit_with_last_line(f"error: {e}")
    if FLAGS.compile_cache and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", FLAGS.compile_cache)
    if FLAGS.multihost:
        # CPU processes talk via gloo (harmless on GPU/TPU, where the CPU backend is unused).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    from adapters_jax.checkpoint import CheckpointSaveError
    from adapters_jax.train_loop import train_and_evaluate
    workdir = FLAGS.workdir
    if not workdir:
        config_arg = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--config="))
        workdir = default_workdir(config_arg)
        print(f"--workdir not given: using {workdir}")
    try:
        train_and_evaluate(FLAGS.config, workdir)
    except (ValueError, FileNotFoundError, FloatingPointError, CheckpointSaveError) as e:  # one line, no traceback
        _exit_with_last_line(f"error: {e}")


def _exit_with_last_line(message: str) -> None:
    """Exit 1 with `message` as the last line on stderr. After a failed async save, orbax and
    tensorstore threads can still raise or log while the interpreter shuts down; from here on
    their tracebacks and log lines are dropped, so they cannot follow our one line."""
    import threading
    from absl import logging
    logging.get_absl_handler().addFilter(lambda record: "/orbax/" not in record.pathname)
    threading.excepthook = lambda args: None
    sys.exit(message)


def _one_line_library_errors(record) -> bool:
    """orbax logs a failed background save with its traceback; keep its one line (our error follows)."""
    if "/orbax/" in record.pathname:
        record.exc_info, record.exc_text = None, None
    return True


def parse_flags(argv, flag_values=None):
    """absl's parsing, with a bad flag or config override reported in one line, not a traceback."""
    try:
        return (flag_values or FLAGS)(argv)
    except (AttributeError, KeyError) as e:  # ml_collections: a field the locked config does not have
        raw = str(e.args[0] if e.args else e).replace("\\n", " ").replace("\\", "").replace("'", "")
        msg = " ".join(raw.split())
        sys.exit(f"error: unknown config field {msg} (the config is locked: check the spelling)")
    except (flags.Error, TypeError, ValueError) as e:
        sys.exit(f"error: bad command line: {' '.join(str(e).split())}")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=parse_flags)
