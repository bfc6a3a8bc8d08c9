"""Serve adapters on one frozen base: load exports, swap them, predict, and time it.

    python -m experiments.predict --adapter runs/houlsby_r64/adapter --text "A gripping, funny film."
    python -m experiments.predict --adapter runs/a/adapter --adapter runs/b/adapter --text ... --swaps 20
    python -m experiments.predict --adapter A --adapter B --mixed --text "A::first text" --text "B::second"

With --mixed each text names its adapter (`NAME::text`, NAME being the adapter's name or its
position 0, 1, ...) and the whole batch runs in one forward pass.
"""
import statistics
import sys
import time

from absl import app, flags

flags.DEFINE_string("model", "minilm-l6", "base model: short name or checkpoint directory")
flags.DEFINE_multi_string("adapter", [], "adapter export directory (repeat for several)")
flags.DEFINE_multi_string("text", [], "text to classify (repeat)")
flags.DEFINE_bool("mixed", False, "texts are NAME::text and run as one mixed batch")
flags.DEFINE_integer("swaps", 0, "also time this many load+swap cycles per adapter")
flags.DEFINE_integer("max_length", 128, "truncation length")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import numpy as np
    from absl import logging
    logging.set_verbosity(logging.WARNING)
    from adapters_jax.serving import AdapterServer
    if not FLAGS.adapter:
        sys.exit("error: give at least one --adapter DIR")
    t = time.perf_counter()
    server = AdapterServer(FLAGS.model, FLAGS.max_length)
    print(f"base {FLAGS.model} loaded in {time.perf_counter() - t:.2f}s")
    names = []
    for d in FLAGS.adapter:
        try:
            a = server.load(d)
        except ValueError as e:
            sys.exit(f"error: {e}")
        names.append(a.name)
        print(f"adapter {a.name!r} from {d}: loaded and placed in {a.load_ms:.1f} ms")
    texts = FLAGS.text or ["A gripping, funny and moving film.", "Tedious, overlong and badly acted."]
    if FLAGS.mixed:
        rows = [t.split("::", 1) for t in texts]
        which = [names[int(n)] if n.isdigit() else n for n, _ in rows]
        logits = server.predict_mixed([t for _, t in rows], which)
        for (n, text), name, lg in zip(rows, which, logits):
            _show(server, name, text, lg)
    else:
        for name in names:
            t = time.perf_counter()
            logits = server.predict(texts, name)
            ms = (time.perf_counter() - t) * 1e3
            print(f"-- {name}: {len(texts)} texts in {ms:.1f} ms (compiled programs so far: {server.compiles})")
            for text, lg in zip(texts, logits):
                _show(server, name, text, lg)
    for d in FLAGS.adapter if FLAGS.swaps else []:
        times = []
        for _ in range(FLAGS.swaps):
            t = time.perf_counter()
            a = server.load(d)
            server.predict(texts[:1], a.name)
            times.append((time.perf_counter() - t) * 1e3)
        loads = [server.load(d).load_ms for _ in range(FLAGS.swaps)]
        print(f"swap {d}: load+place median {statistics.median(loads):.1f} ms; load+place+predict(1 text) "
              f"median {statistics.median(times):.1f} ms over {FLAGS.swaps}; programs compiled in all (one per "
              f"architecture and padded input shape): {server.compiles}")
    del np


def _show(server, name, text, logits):
    import numpy as np
    labels = server.adapters[name].label_names
    p = np.exp(logits - logits.max())
    p /= p.sum()
    k = int(p.argmax())
    print(f"  [{name}] {labels[k] if k < len(labels) else k} ({p[k]:.2f})  {text}")


if __name__ == "__main__":
    app.run(main)
