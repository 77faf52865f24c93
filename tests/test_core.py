"""The attention core against NumPy: which keys a query sees, outputs and
log-sum-exps of both forms (with a separately scored rope part, with branches),
the merge of partial results over disjoint keys, and the Pallas decode kernels'
log-sum-exps (interpret mode) against the XLA path's."""
import jax.numpy as jnp
import numpy as np
import pytest

from mla_jax.attention import core


def _np_attention(q, k, v, visible, scale):
  """q [..., S, D], k [..., T, D], v [..., T, E] (same leading axes), visible [S, T]."""
  s = np.einsum("...sd,...td->...st", q, k) * scale
  s = np.where(visible, s, -np.inf)
  lse = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
  return np.einsum("...st,...te->...se", np.exp(s - lse[..., None]), v), lse


def _rand(rng, *shape):
  return rng.normal(size=shape).astype(np.float32)


def test_mask_rule():
  np.testing.assert_array_equal(np.asarray(core.mask(None, 3, 5))[0],
                                [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
  # two queries per sequence over a cache of 6 slots holding 4 and 2 tokens
  got = np.asarray(core.mask(jnp.array([4, 2]), 2, 6))
  np.testing.assert_array_equal(got[0], [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(got[1], [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]])


@pytest.mark.parametrize("chunks", [1, 3])
def test_expanded_grouped_heads_with_a_rope_part(chunks):
  """GQA-shaped: 2 KV heads of 3 query heads each; a rope query per head against
  one rope key per token (GTA's layout)."""
  rng = np.random.default_rng(0)
  q, q_rope = _rand(rng, 2, 2, 3, 7, 8), _rand(rng, 2, 2, 3, 7, 4)
  k, v, rope_key = _rand(rng, 2, 2, 7, 8), _rand(rng, 2, 2, 7, 5), _rand(rng, 2, 7, 4)
  out, lse = core.expanded(*map(jnp.asarray, (q, k, v)), scale=0.3, q_rope=jnp.asarray(q_rope),
                           rope_key=jnp.asarray(rope_key), backend=core.Backend(causal_chunks=chunks))
  visible = np.tril(np.ones((7, 7), bool))
  full_q = np.concatenate([q, q_rope], -1)
  full_k = np.concatenate([k, np.broadcast_to(rope_key[:, None], (2, 2, 7, 4))], -1)
  want, want_lse = _np_attention(full_q, full_k[:, :, None], v[:, :, None], visible, 0.3)
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(lse), want_lse, rtol=1e-5, atol=1e-5)


def test_absorbed_is_attention_over_the_latent_with_a_shared_rope_key():
  """MLRA-shaped: 2 branches x 1 group of latents, 4 heads per block; the rope
  query has no branch axis (shared) and the rope key no head axes."""
  rng = np.random.default_rng(1)
  q_lat, latent = _rand(rng, 2, 2, 1, 4, 1, 6), _rand(rng, 2, 2, 1, 9, 6)
  q_rope, rope_key = _rand(rng, 2, 1, 4, 1, 4), _rand(rng, 2, 9, 4)
  kv_len = np.array([9, 3])
  # the latent as the cache stores it: token-major [B, T, blocks, C]
  out, lse = core.absorbed(jnp.asarray(q_lat), jnp.asarray(latent.transpose(0, 3, 1, 2, 4).reshape(2, 9, 2, 6)),
                           scale=0.5, kv_len=jnp.asarray(kv_len),
                           q_rope=jnp.asarray(q_rope), rope_key=jnp.asarray(rope_key))
  for b in range(2):
    visible = np.arange(9)[None] < kv_len[b]
    q = np.concatenate([q_lat[b], np.broadcast_to(q_rope[b][None], (2, 1, 4, 1, 4))], -1)
    k = np.concatenate([latent[b], np.broadcast_to(rope_key[b], (2, 1, 9, 4))], -1)[:, :, None]
    want, want_lse = _np_attention(q, k, latent[b][:, :, None], visible, 0.5)
    np.testing.assert_allclose(np.asarray(out[b]), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lse[b]), want_lse, rtol=1e-5, atol=1e-5)


def test_branches_are_separate_softmaxes_summed():
  rng = np.random.default_rng(2)
  q, k, v = _rand(rng, 2, 3, 5, 8), _rand(rng, 2, 3, 4, 5, 8), _rand(rng, 2, 3, 4, 5, 6)   # 4 branches
  out, lse = core.expanded(*map(jnp.asarray, (q, k, v)), scale=0.2, branched=True)
  visible = np.tril(np.ones((5, 5), bool))
  parts = [_np_attention(q, k[:, :, r], v[:, :, r], visible, 0.2) for r in range(4)]
  np.testing.assert_allclose(np.asarray(out), sum(p[0] for p in parts), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(lse), np.stack([p[1] for p in parts], -2), rtol=1e-5, atol=1e-5)


def test_merge_of_disjoint_keys_is_attention_over_all():
  rng = np.random.default_rng(3)
  q, k, v = _rand(rng, 2, 3, 1, 8), _rand(rng, 2, 3, 10, 8), _rand(rng, 2, 3, 10, 6)
  whole = core.expanded(*map(jnp.asarray, (q, k, v)), scale=0.4, kv_len=jnp.array([10, 10]))
  parts = [core.expanded(*map(jnp.asarray, (q, k[:, :, lo:hi], v[:, :, lo:hi])), scale=0.4,
                         kv_len=jnp.array([hi - lo] * 2)) for lo, hi in ((0, 4), (4, 7), (7, 10))]
  out, lse = core.merge(parts)
  np.testing.assert_allclose(np.asarray(out), np.asarray(whole[0]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(whole[1]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", ["gqa", "mqa", "latent"])
def test_kernels_return_the_xla_paths_outputs_and_log_sum_exps(form):
  """Through the core's dispatch: the same call with the Pallas kernels demanded
  (interpret mode here) and with XLA."""
  rng = np.random.default_rng(4)
  kv_len = jnp.array([32, 17, 1])
  pallas = core.Backend(decode_kernel="pallas", interpret=True)
  if form == "latent":       # 2 blocks x 2 heads, widths the Triton kernel takes
    args = (jnp.asarray(_rand(rng, 3, 2, 2, 1, 32)), jnp.asarray(_rand(rng, 3, 32, 2, 32)))
    kw = dict(q_rope=jnp.asarray(_rand(rng, 3, 1, 2, 1, 16)), rope_key=jnp.asarray(_rand(rng, 3, 32, 16)))
    fn = core.absorbed
  else:
    k_shape = (3, 2, 32, 16) if form == "gqa" else (3, 32, 16)
    args = (jnp.asarray(_rand(rng, 3, 2, 2, 1, 16) if form == "gqa" else _rand(rng, 3, 4, 1, 16)),
            jnp.asarray(_rand(rng, *k_shape)), jnp.asarray(_rand(rng, *k_shape)))
    kw = {}
    fn = core.expanded
  want = fn(*args, scale=0.25, kv_len=kv_len, **kw)
  got = fn(*args, scale=0.25, kv_len=kv_len, backend=pallas, **kw)
  for g, w in zip(got, want):
    assert g.shape == w.shape
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-5)
