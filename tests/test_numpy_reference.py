"""Each attention module against the independent NumPy reference, random weights."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import numpy_reference as ref
from helpers import GATED, SMALL_ATTENTION, randomize
from mla_jax import RunOptions, registry

D = 32


def _np(p):
  return np.asarray(p[...], np.float64)


def flat_weights(attn):
  """The module's parameters in the reference's flat layout (heads concatenated)."""
  cfg = attn.config
  W = {}
  if cfg.variant in ("mha", "mqa", "gqa"):
    W["wq"] = _np(attn.wq).reshape(D, -1)
    W["wk"] = _np(attn.wk).reshape(D, -1)
    W["wv"] = _np(attn.wv).reshape(D, -1)
  elif cfg.variant == "gta":
    W["wq"], W["w_kv"], W["w_kr"] = _np(attn.wq).reshape(D, -1), _np(attn.w_kv).reshape(D, -1), _np(attn.w_kr)
  elif cfg.variant == "tpa":
    for name in ("wa_q", "wb_q", "wa_k", "wb_k", "wa_v", "wb_v"):
      W[name] = _np(getattr(attn, name)).reshape(D, -1)
  elif cfg.variant == "mfa":
    W["wq_a"], W["q_norm"] = _np(attn.wq_a), _np(attn.q_norm.weight)
    W["wq_b"] = _np(attn.wq_b).reshape(cfg.q_lora_rank, -1)
    W["wk"], W["wv"] = _np(attn.wk), _np(attn.wv)
  else:
    if cfg.q_lora_rank:
      W["wq_a"], W["q_norm"] = _np(attn.wq_a), _np(attn.q_norm.weight)
      W["wq_b"] = _np(attn.wq_b).reshape(cfg.q_lora_rank, -1)
    else:
      W["wq"] = _np(attn.wq).reshape(D, -1)
    W["w_dkv"] = _np(attn.w_dkv).reshape(D, -1)
    if cfg.qk_rope_head_dim:
      W["w_kr"] = _np(attn.w_kr)
    norms, w_uk, w_uv = _np(attn.kv_norm.weight), _np(attn.w_uk), _np(attn.w_uv)
    if cfg.variant == "mla":
      W["kv_norm"] = norms[0]
      W["w_uk"], W["w_uv"] = w_uk[0].reshape(cfg.kv_lora_rank, -1), w_uv[0].reshape(cfg.kv_lora_rank, -1)
    else:
      W["kv_norm"] = list(norms)
      W["w_uk"] = [blk.reshape(blk.shape[0], -1) for blk in w_uk]
      W["w_uv"] = [blk.reshape(blk.shape[0], -1) for blk in w_uv]
  W["wo"] = _np(attn.wo).reshape(-1, D)
  if getattr(cfg, "gated", False):
    W["wg"] = _np(attn.wg).reshape(D, -1)
  return W


def reference(x, positions, attn):
  cfg, W = attn.config, flat_weights(attn)
  if cfg.variant == "gta":
    return ref.gta(x, positions, W, h=cfg.num_heads, h_kv=cfg.num_kv_heads, d_h=cfg.head_dim,
                   d_r=cfg.rope_dim)
  if cfg.variant == "tpa":
    return ref.tpa(x, positions, W, h=cfg.num_heads, d_h=cfg.head_dim, r_q=cfg.q_rank,
                   r_k=cfg.k_rank, r_v=cfg.v_rank)
  if cfg.variant == "mfa":
    return ref.mfa(x, positions, W, h=cfg.num_heads, c=cfg.head_dim)
  if cfg.variant in ("mha", "mqa", "gqa"):
    return ref.gqa(x, positions, W, h=cfg.num_heads, h_kv=cfg.num_kv_heads, d_h=cfg.head_dim,
                   use_rope=cfg.rope, gated=cfg.gated)
  kw = dict(h=cfg.num_heads, d_c=cfg.kv_lora_rank, d_n=cfg.qk_nope_head_dim, d_r=cfg.qk_rope_head_dim,
            d_v=cfg.value_dim, q_lora=cfg.q_lora_rank, scales=cfg.scales, gated=cfg.gated)
  if cfg.variant == "mla":
    return ref.mla(x, positions, W, **kw)
  if cfg.variant in ("gla2", "gla4"):
    return ref.gla(x, positions, W, n_latent=cfg.groups, **kw)
  return ref.mlra(x, positions, W, branches=cfg.branches, n_blocks=cfg.num_blocks, **kw)


CASES = ([(v, {}) for v in SMALL_ATTENTION] + [(v, {"gated": True}) for v in GATED] +
         [("mla", {"qk_rope_head_dim": 0, "scales": False}), ("mlra2", {"q_lora_rank": 0}),
          ("gla2", {"v_head_dim": 12}), ("gqa", {"rope": False}), ("mlra4", {"scales": False}),
          ("mlra2", {"scales": False}),
          ("gta", {"rope_head_dim": 2}),
          # blocks of 4 < (d_n + d_r + d_v) / 2: trains through the absorbed form
          ("mlra4", {"kv_lora_rank": 16}), ("mlra2", {"kv_lora_rank": 16})])


# causal_chunks 4 over 9 tokens: query blocks of 2, 2, 2 and 3, each scored only
# against the keys it can see
@pytest.mark.parametrize("chunks", [1, 4])
@pytest.mark.parametrize("variant,overrides", CASES)
def test_module_matches_numpy_reference(variant, overrides, chunks):
  cfg = registry.attention_config(variant, **dict(SMALL_ATTENTION[variant], **overrides))
  attn = registry.get(variant).module(cfg, d_model=D, rngs=nnx.Rngs(0), options=RunOptions(causal_chunks=chunks))
  randomize(attn, seed=11)
  if overrides.get("kv_lora_rank") == 16:
    assert cfg.training_form() == "absorbed"
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 9, D))
  positions = np.stack([np.arange(9), np.arange(9) + 17])   # RoPE away from zero too
  got = np.asarray(nnx.jit(lambda m, x, p: m(x, p))(attn, jnp.asarray(x, jnp.float32), jnp.asarray(positions)))
  for b in range(2):
    want = reference(x[b], positions[b].astype(np.float64), attn)
    assert np.abs(want).max() > 1e-2, "reference output vanishes: the test would prove nothing"
    np.testing.assert_allclose(got[b], want, rtol=2e-4, atol=2e-5, err_msg=f"sequence {b}")
