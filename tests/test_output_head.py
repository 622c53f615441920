"""The output head: float32 logits of 16-bit operands, 16-bit products in its backward, whole or in chunks."""
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmoe_jax.nn import model as model_lib
from test_model import _init, _tokens


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_bfloat16_compute_gives_float32_logits_of_the_bfloat16_operands(make_config, tie_embeddings):
  """The output head multiplies bfloat16 operands but keeps the float32 product: logits are not rounded to
  bfloat16 (8 significant bits: ~0.03 at a logit of 15) before the float32 cross-entropy. Reference: the
  final norm's bfloat16 output times the bfloat16 head (the table, when tied), in float64."""
  cfg = make_config(dtype="bfloat16", tie_embeddings=tie_embeddings)
  model, variables = _init(cfg)
  params = nn.unbox(variables)["params"]
  head = ("embed", "table") if tie_embeddings else ("lm_head",)
  params = flax.core.copy(params, {})  # a plain dict
  node = params
  for key in head[:-1]:
    node = node[key]
  node[head[-1]] = node[head[-1]] * 4.0  # logits of ~10, where bfloat16's spacing is 0.06
  (logits, _), inter = jax.jit(lambda p, t: model.apply({"params": p}, t, mod_mode="off",
                                                       capture_intermediates=True))(params, _tokens(3))
  hidden = inter["intermediates"]["final_norm"]["__call__"][0]
  assert hidden.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
  w = np.asarray(node[head[-1]].astype(jnp.bfloat16), np.float64)
  want = np.asarray(hidden, np.float64) @ (w.T if tie_embeddings else w)
  assert np.abs(want).max() > 8
  np.testing.assert_allclose(np.asarray(logits, np.float64), want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("tie_embeddings, chunk, count", [(False, 0, 3), (True, 0, 3), (False, 4, 4), (True, 4, 4)])
def test_bfloat16_output_head_backward_multiplies_bfloat16_operands(make_config, tie_embeddings, chunk, count):
  """The float32 logits cost no float32 matmul in the backward: every product with a vocabulary axis (96
  here, a size nothing else has) in the lowered gradient of the loss multiplies bfloat16 operands: the
  forward and the two products of its backward, and with the logits in chunks the chunk's recompute too."""
  cfg = make_config(dtype="bfloat16", vocab_size=96, tie_embeddings=tie_embeddings, logits_chunk_len=chunk)
  model = model_lib.build_model(cfg.model)
  tokens = _tokens(4)
  params = nn.unbox(jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0),
                                                       "noise": jax.random.PRNGKey(1)}, tokens)))["params"]
  loss = lambda p: jnp.sum(model.apply({"params": p}, tokens, mod_mode="off", targets=tokens)[0])
  text = jax.jit(jax.grad(loss)).lower(params).as_text()
  products = [re.search(r": \((tensor<[^>]*>), (tensor<[^>]*>)\)", line).groups()
              for line in text.splitlines() if "dot_general" in line and re.search(r"[<x]96x", line)]
  assert len(products) == count, products
  for operands in products:
    assert all(t.endswith("xbf16>") for t in operands), operands
