"""adapters_jax: adapter-based parameter-efficient fine-tuning in JAX/Flax.

Entry points: `hub.load_backbone` (a pretrained base and its tokenizer),
`adapters.spec_from_config` / `adapters.AdapterSetup` (what fills the backbone's sites),
`peft.make_rules` (what trains), `train_loop.train_and_evaluate` (a whole run) and
`serving.AdapterServer` (many adapters on one base). Submodules are imported on demand, so
that `import adapters_jax` stays cheap.
"""
