"""The base config every experiment file starts from (see configs/houlsby_r64.py)."""
import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = "classification"      # or 'regression'
    c.metric = "accuracy"          # picks the best checkpoint: accuracy | macro_f1 | mcc | pearson | spearman
    c.parallelism = "jit"          # or 'pmap'
    c.init_from = ""               # another run's adapter export directory

    # frozen_dtype: how the frozen base's matrices are stored; 'auto' = dtype (bf16 runs: bf16).
    # attention_backward (XLA:CPU): 'keep' the attention probabilities for the backward (faster),
    # or 'recompute' them (nothing of size T^2 kept: for long sequences).
    # skip_unread_rows: with a cls/pooler head, the last BERT layer computes only the first token
    # (the same logits, 15% less time per MiniLM step); False computes every row
    c.model = ml_collections.ConfigDict(dict(name="minilm-l6", dtype="float32", frozen_dtype="auto",
                                             attention_backward="keep", skip_unread_rows=True))
    c.adapter = ml_collections.ConfigDict(dict(method="none"))
    # pooling: auto (cls for encoders, the last real token for causal decoders) | cls | mean | pooler | last
    c.head = ml_collections.ConfigDict(dict(pooling="auto", dropout=0.1))
    c.freeze = ml_collections.ConfigDict(dict(train_head=True, train_layernorm=False, train_bias=False,
                                              train_all=False))
    # data.name: rotten_tomatoes | bbc_news | tweet_sentiment | files | glue_tsv/<task> | glue/<task>
    # data.files: 'train=a.csv,validation=b.csv' for name=files; data.glue_dir: a local GLUE folder.
    # buckets: padded lengths. Each one a run uses costs a compile; finer ones cut padding.
    # `python -m experiments.choose_buckets --config ...` picks them for a dataset and machine:
    # these are its pick for Rotten Tomatoes on MiniLM (1 or 3 epochs).
    # pack: train on packed rows (several examples per row, each attending only to itself; one compile,
    # almost no padding) instead of buckets. 'auto' packs where it can (BERT-family encoders and
    # GPT-2 and Llama decoders, classification and regression, not prompt tuning), 'true' insists,
    # 'false' uses the buckets.
    # pack_rows 0 fits batch_size examples of the mean length per step; pack_segments caps the
    # examples in one row. Evaluation packs too (eval_batch_size examples per batch on average).
    c.data = ml_collections.ConfigDict(dict(name="rotten_tomatoes", max_length=128,
                                            buckets=(16, 32, 48, 80, 128), data_dir="", files="",
                                            glue_dir="", num_labels=2, skip_bad_rows=False,
                                            pack="auto", pack_rows=0, pack_segments=16))
    # streams: each step's batch split into this many parts computed side by side in one program
    # (trainer.make_train_step): the same loss and gradient (other dropout masks), about the same
    # memory, a compile twice as long; on XLA:CPU the parts' ops overlap on the cores (README,
    # Parallelism). accum_steps: micro-batches run one after another (less memory).
    # cpu_scheduler (XLA:CPU, parallelism 'jit'): 'default', or 'memory' to order the step's ops to
    # hold fewer activations at once (same numbers; with streams > 1 about a third less step memory
    # for an adapter; 0-10% more step time, measured at MiniLM and BERT-base size; README, Performance)
    c.train = ml_collections.ConfigDict(dict(
        batch_size=32, eval_batch_size=64, num_epochs=3, num_steps=-1, accum_steps=1, streams=1,
        cpu_scheduler="default",
        log_every=20, eval_every=-1, ckpt_every=200, max_to_keep=2,  # eval_every -1: once per epoch
        # async_checkpoint: write checkpoints while the next steps run. Off: each save blocks (0.3 s
        # for a MiniLM adapter), but none overlaps a step, which raised the default epoch's peak RSS
        # by ~100 MiB (888 against 986 MiB; README, Performance)
        async_checkpoint=False,
        skip_nonfinite=False))
    c.optim = ml_collections.ConfigDict(dict(lr=1e-3, warmup_ratio=0.06, schedule="linear",
                                             weight_decay=0.01, clip_norm=1.0))
    # cpu_devices: split the host CPU into this many XLA devices, data parallel (0: JAX's default, one);
    # on a 2-core CPU 2 sped up adapter steps at 64-128 tokens (README, Performance). GPU/TPU ignore it
    c.mesh = ml_collections.ConfigDict(dict(fsdp=1, shard_frozen=False, cpu_devices=0))
    return c


def apply_preset(c: ml_collections.ConfigDict, arg) -> ml_collections.ConfigDict:
    """`smoke` shrinks the run to seconds (CI); `key=value,...` sets fields (e.g. `r=16`)."""
    if not arg:
        return c
    for part in str(arg).split(","):
        if part == "smoke":  # a tiny random BERT with MiniLM's vocabulary: seconds on a CPU
            c.model.name = "tiny-random-bert"
            c.train.num_steps, c.train.batch_size, c.train.eval_batch_size = 4, 8, 64
            c.train.log_every, c.train.ckpt_every = 2, 2
            c.data.max_length, c.data.buckets = 32, (32,)
            if "bottleneck_dim" in c.adapter and c.adapter.bottleneck_dim:
                c.adapter.bottleneck_dim = min(c.adapter.bottleneck_dim, 8)
            if "reduction_factor" in c.adapter:
                c.adapter.reduction_factor = 4  # width 32 -> r = 8, divisible by phm_dim 4
        elif part.startswith("r="):
            c.adapter.bottleneck_dim = int(part[2:])
        elif part:
            raise ValueError(f"config preset {part!r} is unknown (known: smoke, r=N)")
    return c
