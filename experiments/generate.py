"""Greedy continuation from a decoder base, with or without a trained LM adapter export.

    python -m experiments.generate --adapter runs/smollm2_lm/adapter_best --prompt "Review (rotten):"
    python -m experiments.generate --base smollm2-135m --prompt "The capital of France is"

The export names its base (model short name or path) and sha256; a different base is refused.
"""
import sys

from absl import app, flags

flags.DEFINE_string("adapter", None, "an LM run's adapter export directory (adapter/ or adapter_best/)")
flags.DEFINE_string("base", None, "base model (short name, directory or .gguf); default: the export's")
flags.DEFINE_multi_string("prompt", ["Review (fresh):", "Review (rotten):"], "prompt(s), one row each")
flags.DEFINE_integer("max_new_tokens", 40, "tokens to add at most (stops at EOS)")
FLAGS = flags.FLAGS


def load(adapter, base):
    """(tokenizer, logits_fn [B, L] -> [B, L, V]) for the base plus the export's adapters."""
    import jax
    import jax.numpy as jnp

    from adapters_jax import checkpoint
    from adapters_jax.heads import BackboneLogits
    from adapters_jax.hub import load_backbone
    from adapters_jax.model import AdaptedModel, init_with_base
    meta, tree, spec = {}, None, None
    if adapter:
        meta, tree = checkpoint.read_adapter(adapter)
        if meta.get("task") != "lm":
            raise ValueError(f"{adapter}: export is for task={meta.get('task')!r}, not 'lm'")
        spec = checkpoint.spec_from_dict(meta.get("spec"), adapter)
    base = base or meta.get("base_model")
    if not base:
        raise ValueError("--base is required without --adapter")
    backbone = load_backbone(base)
    model = AdaptedModel(backbone.model.clone(filler=spec), BackboneLogits())
    ids = jnp.zeros((1, 2), jnp.int32)
    params = init_with_base(model, backbone.params, jax.random.PRNGKey(0), {"input_ids": ids})
    if tree is not None:
        if meta.get("base_sha256") != checkpoint.base_fingerprint(backbone.path):
            raise ValueError(f"{adapter}: adapter was trained on a different base than {backbone.path}")
        checkpoint.check_fits(params, tree, adapter)
        from flax import traverse_util
        flat = traverse_util.flatten_dict(dict(params))
        flat.update({k: jnp.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()})
        params = traverse_util.unflatten_dict(flat)
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, {"input_ids": x}))
    return backbone.tokenizer, lambda x: fwd(params, x)


def main(argv):
    del argv
    from adapters_jax.generation import greedy
    try:
        tok, logits_fn = load(FLAGS.adapter, FLAGS.base)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    prompts = [tok.encode_ids(p)[0] for p in FLAGS.prompt]
    outs = greedy(logits_fn, prompts, FLAGS.max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id)
    for text, new in zip(FLAGS.prompt, outs):
        print(f"{text}{tok.decode(new)}")


if __name__ == "__main__":
    app.run(main)
