"""The attention core: the few pure functions every attention path calls.

    expanded(q, key, value)        softmax(q . key * scale) value        (per-head keys and values)
    absorbed(q_latent, latent)     softmax(q_latent . latent * scale) latent
                                   (the latent family's decode form: the latent is the key and the value)
    softmax(scores, visible)       the masked softmax both use, with its log-sum-exp
    merge(parts)                   attention over disjoint key sets combined exactly
    over_keys(attend_keys, cache)  decode over a cache: split by token over the mesh's `context`
                                   devices (each attends over its own, one collective merges
                                   them as above); an 8-bit cache (`quant.Quantized` arrays)
                                   read in chunks of keys, each dequantized where it is read

Both forms take an optional decoupled rope part, scored separately and added
to the scores (`q_rope . rope_key`: the latent family's shared rope key, GTA's;
its head axes are the trailing ones of q's, so it may be shared across the
leading ones, as MLRA's branches share it). `expanded` also takes branched keys
(MLRA's naive form: a softmax per branch, summed in the values contraction).
Both return the output and the log-sum-exp of every score row, so partial
results over disjoint keys merge exactly (split-K, context parallelism).
Training (causal, in query blocks), prefill and decode all call them; the
variants only say how their queries, keys and values map onto them.

Layouts are heads-major: q [B, *H, S, D], key [B, *K, T, D], value [B, *K, T, Dv]
(`heads_major` moves a token-major cache or projection there), where the key's
head axes K are a prefix of the query's H: the trailing query axes share one key
(GQA's groups, MQA, the latent family's query heads per latent block). A shared
rope key has no head axes at all: rope_key [B, T, E]. Outputs are [B, *H, S, Dv],
log-sum-exps [B, *H, S].

Which keys each query sees is one rule: query s of S sits at position
kv_len - S + s and sees keys t <= that position (kv_len None: all T keys, i.e.
causal attention over the sequence's own entries). Decode passes kv_len =
tokens cached per sequence; training and prefill pass None. Where the key axis
is not in token order (a page pool split over `context`, read by XLA) decode
passes `Slots`: the lengths, and the token each key slot holds.

The backend (our einsums, jax.nn.dot_product_attention, the Pallas decode
kernels) is resolved once per module from the run options and the device
(`backend`), and chosen per call here, from the shapes: nothing else in the
library names a backend.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp

from mla_jax import compat, quant, rules
from mla_jax.config import AttentionConfig, RunOptions
from mla_jax.kernels import jax_decode
from mla_jax.kernels import latent_decode as latent_kernel


# ----------------------------------------------------------------------------- backend


@dataclasses.dataclass(frozen=True)
class Backend:
  """Run options resolved for one attention module on this device."""
  training: str = "einsum"            # causal attention: einsum | dpa
  causal_chunks: int = 0              # einsum training: query blocks (0 = automatic)
  decode_form: str = "absorbed"       # naive | absorbed: the form variants with two of them decode in
  decode_kernel: str = "none"         # none | pallas (or an error) | pallas_if_supported (or XLA)
  interpret: bool = True              # Pallas in interpret mode (no GPU)

  def xla_only(self, why: str) -> None:
    """For a decode form no kernel implements: an error only if a kernel was demanded."""
    if self.decode_kernel == "pallas":
      raise ValueError(f"decode_impl='pallas' cannot run here: {why}; use 'auto' (falls back to XLA) "
                       "or 'absorbed'")


def backend(options: RunOptions, config: AttentionConfig) -> Backend:
  """The one place the run options and the device pick the attention backend."""
  if options.attention_impl == "dpa":
    why = config.dpa_unsupported()
    if why is not None:
      raise ValueError(f"attention_impl='dpa' cannot run {config.variant}: {why}; use attention_impl='einsum'")
  on_gpu = compat.on_gpu()
  kernel = {"pallas": "pallas", "auto": "pallas_if_supported" if on_gpu else "none"}.get(options.decode_impl, "none")
  return Backend(training=options.attention_impl, causal_chunks=options.causal_chunks,
                 decode_form="naive" if options.decode_impl == "naive" else "absorbed",
                 decode_kernel=kernel, interpret=not on_gpu)


DEFAULT = Backend()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Paged:
  """A paged cache array as a kernel reads it: pool [num_pages, page_size, ...]
  and page table [B, width]; token t of row b is pool[table[b, t // page_size],
  t % page_size] (mla_jax.paging)."""
  pool: jax.Array
  table: jax.Array

  def dense(self, ways: int = 1) -> jax.Array:
    """[B, width x page_size, ...]: the table's pages gathered (what XLA paths read).

    Split over `ways` context devices, each page's slots are split into `ways`
    runs, one per device (`mla_jax.rules`: the pool's slot axis is
    `cache_length`), and the view is device-major: device c's runs of every
    page, then device c + 1's, so that each device's share is one contiguous
    block of the view (the layout XLA keeps split without moving bytes). The
    token each view slot holds is `slot_tokens(ways)`."""
    view = self.pool[self.table]                                     # [B, width, page_size, ...]
    batch, width, page_size = view.shape[:3]
    if ways > 1:
      view = view.reshape((batch, width, ways, page_size // ways) + view.shape[3:])
      view = jnp.moveaxis(view, 2, 1)
    return view.reshape((batch, width * page_size) + view.shape[3 + (ways > 1):])

  def slot_tokens(self, ways: int) -> jax.Array:
    """[width x page_size]: the token position each slot of `dense(ways)` holds."""
    width, page_size = self.table.shape[1], self.pool.shape[1]
    device, page, slot = jnp.meshgrid(jnp.arange(ways), jnp.arange(width), jnp.arange(page_size // ways),
                                      indexing="ij")
    return (page * page_size + device * (page_size // ways) + slot).reshape(-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Slots:
  """Decode's kv_len where key slots are not in token order (`Paged.dense`
  split over `context`): lengths [B], tokens each sequence has cached, and
  tokens [T], the position each key slot holds."""
  lengths: jax.Array
  tokens: jax.Array


def lengths_of(kv_len):
  """The tokens each sequence has cached, from a kv_len (an array or `Slots`)."""
  return kv_len.lengths if isinstance(kv_len, Slots) else kv_len


# ----------------------------------------------------------------------------- layouts


def heads_major(x):
  """[B, T, *heads, D] (how caches and projections come) -> [B, *heads, T, D]
  (a `quant.Quantized` cache array: its values and scales alike)."""
  return quant.map_rows(lambda a: jnp.moveaxis(a, 1, -2), x)


def token_major(y):
  """[B, *heads, S, D] -> [B, S, *heads, D]."""
  return quant.map_rows(lambda a: jnp.moveaxis(a, -2, 1), y)


def _gathered(a, ways: int = 1):
  """A cache array as XLA reads it: paged pools gathered through their table
  (values and scales alike), device-major when split over `ways` (`Paged.dense`)."""
  if isinstance(a, quant.Quantized):
    return a.map(lambda x: _gathered(x, ways))
  return a.dense(ways) if isinstance(a, Paged) else a


def _specs(q_ndim: int, k_ndim: int, branched: bool = False, keep_branches: bool = False) -> tuple[str, str]:
  """einsum specs of q . k and probs . v: the key's head axes are a prefix of the
  query's; a branched key has one more axis r before its tokens, scored and
  normalised separately and summed over in probs . v (with t), or kept there
  (`keep_branches`: outputs over disjoint keys then merge branch by branch)."""
  heads = "ghijklmn"[:q_ndim - 3]
  r = "r" if branched else ""
  kv_heads = heads[:k_ndim - 3 - len(r)]
  kept = r if keep_branches else ""
  return (f"b{heads}sd,b{kv_heads}{r}td->b{heads}{r}st", f"b{heads}{r}st,b{kv_heads}{r}te->b{heads}{kept}se")


# ----------------------------------------------------------------------------- the formulas


def mask(kv_len: "jax.Array | Slots | None", q_len: int, k_len: int) -> jax.Array:
  """[B or 1, q_len, k_len]: query s sees keys t <= kv_len - q_len + s (kv_len None: k_len),
  t the token a key slot holds (its index, or `Slots.tokens`)."""
  s, t = jnp.arange(q_len)[:, None], jnp.arange(k_len)[None, :]
  if kv_len is None:
    return (t <= s + (k_len - q_len))[None]
  if isinstance(kv_len, Slots):
    t = kv_len.tokens[None, :]
  return t[None] <= (lengths_of(kv_len)[:, None, None] - q_len + s[None])


def softmax(scores: jax.Array, visible: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Softmax over the last axis in fp32 with invisible keys at probability 0,
  and its log-sum-exp. `visible` is [B or 1, S, T]; scores carry head axes
  between batch and S.

  The mask enters as an additive bias built on the (small, broadcast) mask
  itself: its gradient is the identity, where a select on the scores would
  cost one more pass over them in the backward."""
  heads = scores.ndim - 3
  visible = visible.reshape(visible.shape[:1] + (1,) * heads + visible.shape[1:])
  biased = scores.astype(jnp.float32) + jnp.where(visible, 0.0, -1e30).astype(jnp.float32)
  # The log-sum-exp is unused in training, where XLA drops it; decode and merges read it.
  return jax.nn.softmax(biased, axis=-1), jax.nn.logsumexp(biased, axis=-1)


def _leading(a: jax.Array, ndim: int) -> jax.Array:
  """`a` with singleton head axes after the batch axis, up to `ndim` axes."""
  return a.reshape(a.shape[:1] + (1,) * (ndim - a.ndim) + a.shape[1:])


def _attend(q, key, value, visible, scale, q_rope, rope_key, branched, keep_branches=False):
  """The one formula: scores (plus a separately scored rope part), masked softmax,
  weighted values."""
  score_spec, value_spec = _specs(q.ndim, key.ndim, branched, keep_branches)
  scores = jnp.einsum(score_spec, q, key.astype(q.dtype), preferred_element_type=jnp.float32)
  if q_rope is not None:
    rope_spec, _ = _specs(q_rope.ndim, rope_key.ndim)
    scores = scores + _leading(jnp.einsum(rope_spec, q_rope, rope_key.astype(q_rope.dtype),
                                          preferred_element_type=jnp.float32), scores.ndim)
  probs, lse = softmax(scores * scale, visible)
  value = value.astype(q.dtype)
  return jnp.einsum(value_spec, probs.astype(value.dtype), value), lse


def query_blocks(seq: int, chunks: int) -> list[tuple[int, int]]:
  """[lo, hi) bounds of `chunks` near-equal query blocks covering [0, seq).
  chunks 0: one block per 64 queries, at most 4 (smaller blocks save little of
  the masked work and cost more, smaller ops; and compile time)."""
  if chunks == 0:
    chunks = min(4, seq // 64)
  chunks = max(1, min(chunks, seq))
  bounds = [round(i * seq / chunks) for i in range(chunks + 1)]
  return list(zip(bounds[:-1], bounds[1:]))


def _causal(q, key, value, scale, q_rope, rope_key, chunks, branched):
  """Causal attention of a sequence over its own entries in query blocks: block
  [lo, hi) is scored against keys [0, hi) only, so the score blocks above the
  diagonal are never computed, in the forward or the backward. Arrays are cut
  with split / concatenate along the token axis (-2): the gradient of a slice
  would be a zero-padded full-length array per block, that of a split is a
  concatenation."""
  bounds = query_blocks(q.shape[-2], chunks)
  if len(bounds) == 1:
    return _attend(q, key, value, mask(None, q.shape[-2], key.shape[-2]), scale, q_rope, rope_key, branched)
  cuts = [hi for _, hi in bounds[:-1]]

  def queries(a):
    return jnp.split(a, cuts, axis=-2)

  def prefixes(a):                  # block i sees keys [0, hi_i); the last block all of `a`
    parts = jnp.split(a, cuts, axis=-2)
    return [parts[0] if i == 0 else jnp.concatenate(parts[:i + 1], axis=-2)
            for i in range(len(parts) - 1)] + [a]

  none = [None] * len(bounds)
  keys = prefixes(key)
  values = keys if value is key else prefixes(value)     # the absorbed form: one latent, cut once
  outs, lses = [], []
  for q_b, k_b, v_b, qr_b, rk_b, (lo, hi) in zip(
      queries(q), keys, values, none if q_rope is None else queries(q_rope),
      none if rope_key is None else prefixes(rope_key), bounds):
    out, lse = _attend(q_b, k_b, v_b, mask(None, hi - lo, hi), scale, qr_b, rk_b, branched)
    outs.append(out)
    lses.append(lse)
  return jnp.concatenate(outs, axis=-2), jnp.concatenate(lses, axis=-1)


# Keys per step of the loop that reads a quantized cache in XLA (see `over_keys`).
KEY_CHUNK = 512


def over_keys(attend_keys, cache: dict, kv_len, q_len: int, axis: int = -2):
  """attend_keys(cache, visible) -> (out, lse) run over the keys of `cache` (a
  dict of arrays, some `quant.Quantized`, their tokens on `axis`) in decode.

  Context parallelism: under a mesh whose `context` axis has W devices, the key
  axis (split into W contiguous blocks, one per device: `mla_jax.rules`) is cut
  into those blocks; each device attends over its own block, and the W partial
  (out, lse) are gathered in one collective and merged exactly (`merge`). A
  block holding none of a sequence's tokens gets weight 0 there.

  On each device: in one call when nothing is quantized, else KEY_CHUNK keys at
  a time, each chunk dequantized where it is read and the parts merged by
  log-sum-exp. In one piece XLA would materialise the dequantized operand of
  each dot, a float copy of the whole cache (tests/test_quantized_cache.py
  checks the compiled temporaries)."""
  present = {name: a for name, a in cache.items() if a is not None}
  k_len = next(iter(present.values())).shape[axis]
  visible = mask(kv_len, q_len, k_len)
  ways = rules.mesh_axis_size("context")
  if ways == 1:
    return _in_chunks(attend_keys, present, visible, axis)
  if k_len % ways:
    raise ValueError(f"a cache of {k_len} slots does not split over context:{ways}; use a cache "
                     f"length (or page size) that is a multiple of {ways}")

  def blocks(a, at):                # tokens [.., T, ..] -> [.., W, T / W, ..], one block per device
    at = at % a.ndim
    a = a.reshape(a.shape[:at] + (ways, a.shape[at] // ways) + a.shape[at + 1:])
    return rules.pin(a, at, "context")

  block_axis = axis if axis >= 0 else axis - 1
  parts = jax.vmap(lambda c, v: _in_chunks(attend_keys, c, v, axis), in_axes=(block_axis, 2))(
      {name: quant.map_rows(lambda x: blocks(x, axis), a) for name, a in present.items()}, blocks(visible, 2))
  # One all-gather of every block's (out, lse), packed into one array; each device merges them.
  out, lse = parts
  packed = jnp.concatenate([out.astype(jnp.float32), lse[..., None]], axis=-1)
  packed = rules.pin(rules.pin(packed, 0, "context"), 0, None)
  merged, lse = merge_stacked(packed[..., :-1], packed[..., -1])
  return merged.astype(out.dtype), lse


def _in_chunks(attend_keys, present: dict, visible: jax.Array, axis: int):
  """`over_keys` on one device: KEY_CHUNK keys at a time where anything is quantized."""
  if not any(isinstance(a, quant.Quantized) for a in present.values()):
    return attend_keys(present, visible)
  k_len = next(iter(present.values())).shape[axis]

  def part(lo, size):
    def cut(x):
      return jax.lax.dynamic_slice_in_dim(x, lo, size, axis % x.ndim)
    chunk = {name: quant.map_rows(cut, a) for name, a in present.items()}
    return attend_keys(chunk, jax.lax.dynamic_slice_in_dim(visible, lo, size, 2))     # visible [B, S, T]

  whole, rest = divmod(k_len, KEY_CHUNK)
  if whole == 0:
    return part(0, rest)
  out = jax.lax.fori_loop(1, whole, lambda i, acc: merge([acc, part(i * KEY_CHUNK, KEY_CHUNK)]), part(0, KEY_CHUNK))
  return merge([out, part(whole * KEY_CHUNK, rest)]) if rest else out


def _over_cache(q, key, value, kv_len, scale, q_rope, rope_key, branched):
  """Decode's `_attend` through `over_keys`: keys, values (the same array in the
  absorbed form: dequantized once) and rope keys, dequantized where read if 8-bit.
  Branches stay apart until the parts over disjoint keys are merged (each has
  its own softmax), then are summed."""
  def attend_keys(c, visible):
    k = quant.dequantized(c["key"], q.dtype)
    v = k if value is key else quant.dequantized(c["value"], q.dtype)
    rk = None if rope_key is None else quant.dequantized(c["rope_key"], q.dtype)
    return _attend(q, k, v, visible, scale, q_rope, rk, branched, keep_branches=branched)
  out, lse = over_keys(attend_keys, {"key": key, "value": None if value is key else value, "rope_key": rope_key},
                       kv_len, q.shape[-2])
  return (out.sum(axis=-3) if branched else out), lse


def _xla(q, key, value, kv_len, scale, q_rope, rope_key, backend, branched=False):
  if kv_len is not None:
    return _over_cache(q, key, value, kv_len, scale, q_rope, rope_key, branched)
  if backend.training == "dpa":
    return _dpa(q, key, value, scale, q_rope, rope_key, branched)
  return _causal(q, key, value, scale, q_rope, rope_key, backend.causal_chunks, branched)


def expanded(q: jax.Array, key: jax.Array, value: jax.Array, *, scale: float, kv_len: jax.Array | None = None,
             q_rope: jax.Array | None = None, rope_key: jax.Array | None = None, branched: bool = False,
             backend: Backend = DEFAULT) -> tuple[jax.Array, jax.Array]:
  """softmax((q . key + q_rope . rope_key) * scale) value, over per-head keys and
  values: -> (out [B, *H, S, Dv], lse [B, *H, S]).

  `branched`: key and value carry a branch axis before their tokens ([B, *K, R,
  T, D]); each branch has its own softmax and out is their sum (MLRA's branch
  sum, summed inside probs . v); lse is then per branch, [B, *H, R, S]."""
  if q_rope is not None and branched:
    raise ValueError("a separately scored rope part with branched keys is not supported")
  if _decoding_with_kernel(kv_len, backend):
    out = (_unsupported(backend, "no decode kernel sums branches") if branched else
           _kernel_expanded(q, key, value, kv_len, scale, q_rope, rope_key, backend))
    if out is not None:
      return out
  return _xla(q, key, value, kv_len, scale, q_rope, rope_key, backend, branched)


def absorbed(q_latent: jax.Array, latent: "jax.Array | Paged", *, scale: float, kv_len: jax.Array | None = None,
             q_rope: jax.Array | None = None, rope_key: "jax.Array | Paged | None" = None,
             backend: Backend = DEFAULT) -> tuple[jax.Array, jax.Array]:
  """softmax((q_latent . latent + q_rope . rope_key) * scale) latent: attention
  over the latent itself (MQA over a d_latent + d_rope head per latent block),
  W_UK folded into the query, W_UV left to the caller: -> (context [B, *H, S, C],
  lse [B, *H, S]). q_rope may lack q_latent's leading head axes (MLRA's branches
  share it).

  The latent comes as the cache stores it, token-major [B, T, *K, C] with its
  block axes K = H[:-1] (or flattened into one), or as `Paged` pools; the rope
  key [B, T, E] or `Paged`. The kernel reads either as stored."""
  if _decoding_with_kernel(kv_len, backend):
    out = _kernel_latent(q_latent, latent, kv_len, scale, q_rope, rope_key, backend)
    if out is not None:
      return out
  ways = rules.mesh_axis_size("context")
  pages = latent.values if isinstance(latent, quant.Quantized) else latent
  if ways > 1 and isinstance(pages, Paged):
    kv_len = Slots(lengths_of(kv_len), pages.slot_tokens(ways))
  latent, rope_key = _gathered(latent, ways), _gathered(rope_key, ways)
  latent = heads_major(quant.map_rows(lambda a: a.reshape(a.shape[:2] + q_latent.shape[1:-3] + a.shape[-1:]), latent))
  return _xla(q_latent, latent, latent, kv_len, scale, q_rope, rope_key, backend)


def merge(parts: Sequence[tuple[jax.Array, jax.Array]]) -> tuple[jax.Array, jax.Array]:
  """Attention over the union of disjoint key sets from each set's (out, lse):
  out = sum_i exp(lse_i - lse) out_i with lse = logsumexp_i lse_i."""
  out, lse = merge_stacked(jnp.stack([o.astype(jnp.float32) for o, _ in parts]),
                           jnp.stack([lse for _, lse in parts]))
  return out.astype(parts[0][0].dtype), lse


def merge_stacked(outs: jax.Array, lses: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`merge` of parts stacked on axis 0 (outs [P, ..., D] in fp32, lses [P, ...])."""
  lse = jax.nn.logsumexp(lses, axis=0)
  return jnp.sum(jnp.exp(lses - lse[None])[..., None] * outs, axis=0), lse


# ----------------------------------------------------------------------------- jax.nn.dot_product_attention


def _dpa(q, key, value, scale, q_rope, rope_key, branched):
  """Causal training attention through jax.nn.dot_product_attention (cuDNN on
  GPUs), which takes token-major [B, T, heads, D] with the query heads of a KV
  head contiguous, and one width for queries, keys and values; branches one
  call each, summed."""
  if branched:
    outs, lses = zip(*(_dpa(q, key[..., r, :, :], value[..., r, :, :], scale, None, None, False)
                       for r in range(key.shape[-3])))
    return functools.reduce(jnp.add, outs), jnp.stack(lses, axis=-2)
  if q_rope is not None:            # K = [key | rope key copied to every KV head]
    q = jnp.concatenate([q, jnp.broadcast_to(_leading(q_rope, q.ndim), q.shape[:-1] + q_rope.shape[-1:])], -1)
    shared = rope_key.reshape(rope_key.shape[:1] + (1,) * (key.ndim - 3) + rope_key.shape[1:])
    key = jnp.concatenate([key, jnp.broadcast_to(shared, key.shape[:-1] + rope_key.shape[-1:])], -1)
  heads = q.shape[1:-2]

  def flat(a):                      # [B, *heads, T, D] -> [B, T, prod(heads), D]
    a = token_major(a)
    return a.reshape(a.shape[:2] + (-1, a.shape[-1]))

  out, lse = jax.nn.dot_product_attention(flat(q), flat(key).astype(q.dtype), flat(value).astype(q.dtype),
                                          scale=scale, is_causal=True, return_residual=True)
  out = out.reshape(out.shape[:2] + heads + out.shape[-1:])
  lse = lse.reshape(lse.shape[:2] + heads)                           # the residual is [B, S, N]
  return heads_major(out), jnp.moveaxis(lse, 1, -1)


# ----------------------------------------------------------------------------- Pallas decode kernels


def _decoding_with_kernel(kv_len, backend) -> bool:
  return backend.decode_kernel != "none" and kv_len is not None


def _unsupported(backend: Backend, why: str):
  if backend.decode_kernel == "pallas":
    raise ValueError(f"decode_impl='pallas' cannot run here: {why}; use 'auto' (falls back to XLA) or "
                     "'absorbed'")
  return None                       # pallas_if_supported: XLA takes it


def per_device(fn, args: Sequence, arg_axes: Sequence, out_axes, *, over_context: bool = False):
  """Run `fn(*args)` once per device under the active mesh (shard_map), each
  argument split by its logical axes (None: not an array, passed through);
  without a mesh, just call it. For kernels that XLA cannot partition.

  `over_context`: fn is attention over this device's share of a cache split
  over `context`, called as fn(device's index on `context`, *args) -> (out,
  lse); the shares' results are merged (one all-gather) into the whole's."""
  current = rules.active()
  if over_context:
    ways = rules.mesh_axis_size("context")
    attend_share = fn

    def fn(*a):
      if ways == 1:
        return attend_share(0, *a)
      out, lse = attend_share(jax.lax.axis_index("context"), *a)
      gathered = jax.lax.all_gather(jnp.concatenate([out.astype(jnp.float32), lse[..., None]], -1), "context")
      merged, lse = merge_stacked(gathered[..., :-1], gathered[..., -1])
      return merged.astype(out.dtype), lse

    if current is None or ways == 1:
      return fn(*args)
    shapes = jax.eval_shape(lambda *a: attend_share(0, *a), *args)
  if current is None:
    return fn(*args)
  mesh, table = current
  sizes = rules.axis_sizes(mesh)

  def spec(x, axes):
    return rules.logical_to_spec(axes, x.shape, mesh_axis_sizes=sizes, rules=table, strict=False)

  present = [i for i, a in enumerate(args) if a is not None]
  in_specs = tuple(spec(args[i], arg_axes[i]) for i in present)

  def local(*xs):
    full = list(args)
    for i, x in zip(present, xs):
      full[i] = x
    return fn(*full)

  out_shapes = shapes if over_context else jax.eval_shape(fn, *args)
  out_specs = jax.tree.map(lambda s, axes: spec(s, axes), out_shapes, out_axes,
                           is_leaf=lambda a: isinstance(a, jax.ShapeDtypeStruct))
  return compat.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs)(
      *[args[i] for i in present])


def _kernel_expanded(q, key, value, kv_len, scale, q_rope, rope_key, backend):
  """JAX's Pallas GQA / MQA decode ops, reading the cache as stored (token-major)."""
  if q.shape[-2] != 1:
    return None                     # several query tokens (a prefill chunk, a draft): XLA, as prefill always was
  if any(isinstance(a, quant.Quantized) for a in (key, value)):
    return _unsupported(backend, "JAX's GQA/MQA decode ops read no 8-bit cache (the XLA path dequantizes "
                                 "it chunk by chunk)")
  if q_rope is not None:
    return _unsupported(backend, "JAX's GQA/MQA decode ops take no separately scored rope key (GTA); "
                                 "no Pallas decode kernel for it yet")
  ways = rules.mesh_axis_size("context")
  why = jax_decode.plan(key.shape[-2] // ways, q.shape[-1])[1]       # each device's share of the cache
  if why:
    return _unsupported(backend, why)
  batch, heads = q.shape[0], q.shape[1:-2]
  flat_q = q.reshape(batch, -1, q.shape[-1])                         # head = kv head * group + g
  lens = ("batch",)
  q_axes = ("batch", "q_heads", None)
  if key.ndim > 3:                  # GQA: [B, *K, T, D] -> the cache's own [B, T, K, D]
    k, v = (token_major(a).reshape(batch, a.shape[-2], -1, a.shape[-1]) for a in (key, value))
    cache_axes = ("cache_batch", "cache_length", "kv_heads", "head_dim")
    op = jax_decode.gqa
  else:                             # MQA: one key head, [B, T, D]
    k, v = key, value
    cache_axes = ("cache_batch", "cache_length", "head_dim")
    op = jax_decode.mqa
  tokens = kv_len.tokens if isinstance(kv_len, Slots) else jnp.arange(key.shape[-2])   # each key slot's token

  def run(device, q, k, v, n, tokens):
    if ways == 1:
      return op(q, k, v, n, scale=scale, interpret=backend.interpret)
    # this device's share: its slots holding the sequence's tokens are a prefix of them (one new token: S = 1)
    held = jnp.sum(tokens[None, :] < n[:, None], axis=-1)
    out, lse = op(q, k, v, held, scale=scale, interpret=backend.interpret)
    some = (held > 0)[:, None]
    return jnp.where(some[..., None], out, 0), jnp.where(some, lse, -jnp.inf)

  out, lse = per_device(run, (flat_q, k, v, lengths_of(kv_len), tokens),
                        (q_axes, cache_axes, cache_axes, lens, ("cache_length",)),
                        (q_axes, ("batch", "q_heads")), over_context=True)
  return out.reshape((batch,) + heads + (1, out.shape[-1])), lse.reshape((batch,) + heads + (1,))


def _kernel_latent(q_latent, latent, kv_len, scale, q_rope, rope_key, backend):
  """The latent kernel (mla_jax/kernels/latent_decode.py): per sequence, every
  latent block with all the query rows (new tokens x heads) that read it, the
  cache (dense or paged, 8-bit with its scales or not) read as stored."""
  latent, lat_scales = (latent.values, latent.scales) if isinstance(latent, quant.Quantized) else (latent, None)
  rope_key, rope_scales = ((rope_key.values, rope_key.scales) if isinstance(rope_key, quant.Quantized)
                           else (rope_key, None))
  paged = isinstance(latent, Paged)
  pool = latent.pool if paged else latent
  ways = rules.mesh_axis_size("context")    # each device holds 1 / ways of every page
  why = (latent_kernel.unsupported(pool.shape[-1], 0 if rope_key is None else _width(rope_key),
                                   pool.shape[1] // ways if paged else None)
         or latent_kernel.storage_unsupported(pool.dtype))
  if why:
    return _unsupported(backend, why)
  batch, heads, (queries, width) = q_latent.shape[0], q_latent.shape[1:-2], q_latent.shape[-2:]
  blocks, per_block = math.prod(heads[:-1]), heads[-1]

  def rows(q, nb):                  # [B, *H, S, D] -> [B, nb, S x J, D], query-major rows
    q = q.reshape((batch, nb, per_block, queries, q.shape[-1]))
    return jnp.swapaxes(q, 2, 3).reshape((batch, nb, queries * per_block, q.shape[-1]))

  q_lat = rows(q_latent, blocks)
  q_r, rope_axis = None, None
  if q_rope is not None:
    rope_blocks = math.prod(q_rope.shape[1:-3])
    if rope_blocks not in (1, blocks):      # MLRA-2: one rope query per group; each device needs its blocks'
      q_rope = jnp.broadcast_to(_leading(q_rope, q_latent.ndim), q_latent.shape[:-1] + q_rope.shape[-1:])
      rope_blocks = blocks
    q_r = rows(q_rope, rope_blocks)
    rope_axis = "latent_blocks" if rope_blocks == blocks > 1 else None

  def stored(a):                    # a pool, or a dense cache array
    return a.pool if isinstance(a, Paged) else a

  lat = pool.reshape(pool.shape[:2] + (blocks, width))
  lat_scales = None if lat_scales is None else stored(lat_scales).reshape(pool.shape[:2] + (blocks, -1))
  rope, rope_scales = (None if a is None else stored(a) for a in (rope_key, rope_scales))
  table = latent.table if paged else None
  lead = (None, "cache_length") if paged else ("cache_batch", "cache_length")
  q_axes = ("batch", "latent_blocks", None, None)

  def run(device, q_lat, q_r, lat, rope, kv_len, table, lat_scales, rope_scales):
    # this device's share of a cache split over `context`: from token (dense) or page slot (pools) `first` on
    first = device * lat.shape[1]
    return latent_kernel.latent_attention(q_lat, q_r, lat, rope, kv_len, table, lat_scales, rope_scales,
                                          scale=scale, queries=queries, interpret=backend.interpret,
                                          ways=ways, first=first)

  context, lse = per_device(
      run, (q_lat, q_r, lat, rope, kv_len, table, lat_scales, rope_scales),
      (q_axes, ("batch", rope_axis, None, None), lead + ("latent_blocks", "latent_dim"), lead + ("rope_dim",),
       ("batch",), ("batch", None) if paged else None, lead + ("latent_blocks", None), lead + (None,)),
      (q_axes, q_axes[:3]), over_context=True)
  context = jnp.swapaxes(context.reshape((batch, blocks, queries, per_block, width)), 2, 3)
  lse = jnp.swapaxes(lse.reshape((batch, blocks, queries, per_block)), 2, 3)
  return context.reshape((batch,) + heads + (queries, width)), lse.reshape((batch,) + heads + (queries,))


def _width(rope_key) -> int:
  return (rope_key.pool if isinstance(rope_key, Paged) else rope_key).shape[-1]
