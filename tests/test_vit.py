"""Our ViT against transformers' ViTModel (the oracle), its converter, and its adapter sites."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from adapters_jax import peft, rules  # noqa: E402
from adapters_jax.adapters import spec_from_config  # noqa: E402
from adapters_jax.adapters.prefix import head_options  # noqa: E402
from adapters_jax.backbones import hf_io, vit_weights  # noqa: E402
from adapters_jax.backbones.vit import ViTModel, patchify  # noqa: E402
from adapters_jax.hub import load_backbone  # noqa: E402

TINY = dict(image_size=12, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=48, layer_norm_eps=1e-12)
PIXELS = np.random.default_rng(0).normal(size=(3, 12, 12, 3)).astype(np.float32)  # [B, H, W, C]


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """A random ViTModel (norms and biases randomised too, so a swapped mapping shows), saved."""
    path = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    model = transformers.ViTModel(transformers.ViTConfig(**TINY)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    config, params = vit_weights.load(str(path))
    return model, config, params, str(path)


def _torch(model, pixels=PIXELS):
    with torch.no_grad():
        out = model(torch.from_numpy(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True)  # NCHW
    return out


def test_last_hidden_state_and_pooler_match_hf(oracle):
    model, config, params, _ = oracle
    ours = ViTModel(config).apply({"params": params}, jnp.asarray(PIXELS), output_hidden_states=True)
    ref = _torch(model)
    assert ours["last_hidden_state"].shape == (3, 1 + 9, 32)
    assert np.abs(np.asarray(ours["last_hidden_state"]) - ref.last_hidden_state.numpy()).max() <= 1e-4
    assert np.abs(np.asarray(ours["pooler_output"]) - ref.pooler_output.numpy()).max() <= 1e-4
    assert len(ours["hidden_states"]) == len(ref.hidden_states) == 3
    for a, b in zip(ours["hidden_states"], ref.hidden_states):
        assert np.abs(np.asarray(a) - b.numpy()).max() <= 1e-4
    np.testing.assert_array_equal(ours["attention_mask"], np.ones((3, 10)))
    n_ours = sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert n_ours == sum(p.numel() for p in model.parameters())


def test_patchify_is_the_strided_convolution():
    """A Dense over patchify's rows equals torch's Conv2d with the converted kernel."""
    conv = torch.nn.Conv2d(3, 5, kernel_size=4, stride=4)
    kernel = vit_weights.conv_to_dense(conv.weight.detach().numpy())  # [p*p*C, D]
    ours = patchify(jnp.asarray(PIXELS), 4) @ kernel + conv.bias.detach().numpy()  # [B, N, D]
    with torch.no_grad():
        ref = conv(torch.from_numpy(PIXELS.transpose(0, 3, 1, 2))).flatten(2).transpose(1, 2)
    assert np.abs(np.asarray(ours) - ref.numpy()).max() <= 1e-5


def test_save_round_trips_through_transformers(oracle, tmp_path):
    model, config, params, _ = oracle
    vit_weights.save(str(tmp_path / "out"), config, params)
    back = transformers.ViTModel.from_pretrained(tmp_path / "out").eval()
    ref = _torch(model).last_hidden_state.numpy()
    assert np.abs(_torch(back).last_hidden_state.numpy() - ref).max() == 0.0
    _, again = vit_weights.load(str(tmp_path / "out"))
    for k, v in traverse_util.flatten_dict(params).items():
        np.testing.assert_array_equal(traverse_util.flatten_dict(again)[k], v)


def test_prefixed_checkpoint_and_bad_tensor(oracle, tmp_path):
    """ViTForImageClassification stores 'vit.'-prefixed tensors plus a classifier: both read."""
    _, config, params, path = oracle
    state = hf_io.read_state_dict(path)
    from safetensors.numpy import save_file
    save_file({**{"vit." + k: v for k, v in state.items()}, "classifier.weight": np.zeros((2, 32), np.float32)},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "model_type": "vit"}))
    _, loaded = vit_weights.load(str(tmp_path))
    np.testing.assert_array_equal(loaded["encoder"]["layer_1"]["ffn_out"]["kernel"],
                                  params["encoder"]["layer_1"]["ffn_out"]["kernel"])
    state["embeddings.position_embeddings"] = state["embeddings.position_embeddings"][:, :5]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(hf_io.CheckpointError, match="embeddings.position_embeddings has shape"):
        vit_weights.load(str(tmp_path))


def test_load_backbone_reads_a_vit_directory(oracle):
    _, config, params, path = oracle
    backbone = load_backbone(path)
    assert backbone.tokenizer is None and backbone.config == config
    with pytest.raises(ValueError, match=r"pixel_values have shape \(H, W, C\)=\(8, 8, 3\)"):
        backbone.model.apply({"params": params}, jnp.zeros((1, 8, 8, 3)))


def _adapted(config, params, method, **options):
    if method == "prefix":
        options = {**head_options(config), **options}
    spec = spec_from_config(method, name="t", **options)
    model = ViTModel(config, filler=spec)
    init = model.init(jax.random.PRNGKey(1), jnp.asarray(PIXELS))["params"]
    flat = traverse_util.flatten_dict(init)
    flat.update(traverse_util.flatten_dict(params))
    full = traverse_util.unflatten_dict(flat)
    labels = rules.labels_for(full, peft.make_rules(["t"], train_head=False))
    trainable, _ = peft.split(full, labels)
    return model, full, trainable


@pytest.mark.parametrize("method, options, expect_count", [
    ("houlsby", dict(bottleneck_dim=8), lambda d, L: L * 2 * (2 * d * 8 + d + 8)),
    ("lora", dict(r=4, lora_sites=("query", "value")), lambda d, L: L * 2 * 4 * (d + d)),
    ("prefix", dict(prefix_length=3, flat=True), lambda d, L: L * 2 * 3 * d),
    ("prompt", dict(n_tokens=2), lambda d, L: 2 * d),
    ("compacter", dict(reduction_factor=4), None),
])
def test_every_adapter_family_fills_the_vit_sites(oracle, method, options, expect_count):
    """Each kind of site (activation, dense, prefix, prompt, shared/context) takes its adapter:
    it adds its own params and changes the output once they move (IA3 uses LoRA's dense sites)."""
    _, config, params, _ = oracle
    model, full, trainable = _adapted(config, params, method, **options)
    count = sum(x.size for x in jax.tree_util.tree_leaves(trainable))
    assert count > 0
    if expect_count is not None:
        assert count == expect_count(config.hidden_size, config.num_layers)
    plain = ViTModel(config).apply({"params": params}, jnp.asarray(PIXELS))["last_hidden_state"]
    moved = jax.tree_util.tree_map(lambda x: x + 0.05, trainable)
    out = model.apply({"params": peft.merge(moved, full)}, jnp.asarray(PIXELS))["last_hidden_state"]
    if method == "prompt":
        assert out.shape[1] == plain.shape[1] + 2
        out = out[:, 2:]
    assert np.abs(np.asarray(out) - np.asarray(plain)).max() > 1e-3
