"""init_with_base computes only the leaves the pretrained base does not provide, and they equal
those of a full init (flax draws each leaf from its own path); the base lands unchanged, and a
base leaf with no place or another shape is refused."""
import jax
import numpy as np
import pytest
from flax import traverse_util

from adapters_jax.adapters import spec_from_config
from adapters_jax.backbones.bert import BertConfig, BertModel
from adapters_jax.heads import ClassificationHead
from adapters_jax.model import AdaptedModel, init_with_base, place_base

CFG = BertConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=24,
                 max_position_embeddings=12)
BATCH = {"input_ids": np.ones((2, 6), np.int32), "attention_mask": np.ones((2, 6), np.int32)}


def _base() -> dict:
    """A 'pretrained' base: a plain BertModel's params from another seed."""
    return BertModel(CFG).init(jax.random.PRNGKey(7), BATCH["input_ids"], BATCH["attention_mask"])["params"]


def _model() -> AdaptedModel:
    return AdaptedModel(BertModel(CFG, filler=spec_from_config("houlsby", bottleneck_dim=4)), ClassificationHead(3))


def test_only_the_missing_leaves_are_initialised_and_equal_a_full_init():
    model, base = _model(), _base()
    got = traverse_util.flatten_dict(init_with_base(model, base, jax.random.PRNGKey(0), BATCH))
    # the whole tree, jitted as init_with_base's part is (eager sampling rounds differently, ~1e-7)
    full = jax.jit(lambda r: model.init({"params": r, "dropout": r}, BATCH)["params"])(jax.random.PRNGKey(0))
    want = traverse_util.flatten_dict(place_base(full, base, prefix=("backbone",)))
    assert set(got) == set(want)
    given = {("backbone",) + k for k in traverse_util.flatten_dict(base)}
    assert any("adapter" in "/".join(k) for k in set(got) - given)  # the adapters are among the rest
    for k in want:
        assert isinstance(got[k], jax.Array), k  # nothing left abstract
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=str(k))


def test_a_base_leaf_with_no_place_or_another_shape_is_refused():
    model, base = _model(), _base()
    flat = traverse_util.flatten_dict(base)
    extra = traverse_util.unflatten_dict({**flat, ("encoder", "layer_9", "w"): np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="encoder/layer_9/w has no place in the model"):
        init_with_base(model, extra, jax.random.PRNGKey(0), BATCH)
    key = next(k for k in flat if k[-1] == "kernel")
    wrong = traverse_util.unflatten_dict({**flat, key: np.zeros((5, 5), np.float32)})
    with pytest.raises(ValueError, match=r"has shape \(5, 5\), the model expects"):
        init_with_base(model, wrong, jax.random.PRNGKey(0), BATCH)
