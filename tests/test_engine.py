"""The decode engine against the dense `generate` of the commit before it
(tests/reference_generate.py, frozen) and the model's own training forward.

Every parameter is random; requests arrive at different steps with prompts of
1 to several pages, pages are handed out in shuffled order, and the pool is
smaller than the requests' total. CI runs one variant per family at one page
size and one mesh; `-m full` runs every variant x page size 1/16/64 x mesh.
"""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import random_model, small_config
from mla_jax import sharding
from mla_jax.engine import Engine, Request, RequestError, Sampling, ngram_drafter
from reference_generate import generate as dense_generate


@nnx.jit
def _forward_padded(model, tokens):
  return model(tokens)


def _forward(model, seq):
  """Training-forward logits of one sequence, zero-padded to the context (one compile;
  causal, so the padding after it changes nothing)."""
  padded = np.zeros((1, model.config.max_seq_len), np.int32)
  padded[0, :len(seq)] = seq
  return np.asarray(_forward_padded(model, jnp.asarray(padded)))[0, :len(seq)]


def _requests(rng, n, vocab, page_size, max_prompt=40, max_new=(1, 20)):
  out = []
  for i in range(n):
    prompt_len = int(rng.integers(1, max_prompt + 1))
    out.append(Request(tuple(int(t) for t in rng.integers(0, vocab, prompt_len)),
                       int(rng.integers(max_new[0], max_new[1] + 1)), id=i))
  return out


def _dense(model, requests):
  """Each request's greedy tokens from the frozen dense generate (one ragged batch)."""
  width = max(len(r.prompt) for r in requests)
  prompts = np.zeros((len(requests), width), np.int32)
  for b, r in enumerate(requests):
    prompts[b, :len(r.prompt)] = r.prompt
  out = dense_generate(model, prompts, [len(r.prompt) for r in requests],
                       max_new_tokens=max(r.max_new_tokens for r in requests))
  return {r.id: out.tokens[b, :r.max_new_tokens].tolist() for b, r in enumerate(requests)}


def _serve_in_waves(engine, requests, waves=(3, 2, 2)):
  """Submit a few requests, run some steps, submit more: arrivals at different steps."""
  done, pending = {}, list(requests)
  for wave in waves:
    for r in pending[:wave]:
      engine.submit(r)
    pending = pending[wave:]
    for _ in range(3):
      done.update({f.id: f for f in engine.step()})
  done.update({f.id: f for f in engine.run(pending)})
  return done


def check_engine_matches_dense(variant, page_size, mesh_spec=None, decode_impl="auto", seed=0):
  config = small_config(variant, vocab=64)                  # the vocabulary splits over tensor:4
  model = random_model(config, seed, decode_impl=decode_impl)
  rng = np.random.default_rng(seed)
  requests = _requests(rng, 7, config.vocab_size, page_size)
  want = _dense(model, requests)
  max_pages = -(-config.max_seq_len // page_size)
  num_pages = 2 * max_pages + 1                             # two full sequences: the others wait
  order = rng.permutation(np.arange(1, num_pages)).tolist()
  kw = dict(max_seqs=4, page_size=page_size, num_pages=num_pages, page_order=order, keep_logits=True,
            prefill_chunk=16, row_buckets=(4,), width_buckets=sorted({max(1, max_pages // 2), max_pages}))
  if mesh_spec:
    mesh = sharding.make_mesh(mesh_spec, config)
    model = sharding.shard_module(model, mesh)
    with sharding.use_mesh(mesh):
      done = _serve_in_waves(Engine(model, **kw), requests)
  else:
    done = _serve_in_waves(Engine(model, **kw), requests)
  for r in requests:
    got = done[r.id]
    assert got.tokens == want[r.id], f"{variant} ps={page_size} {mesh_spec}: request {r.id}"
    assert got.finish_reason == "length"
    # the logits of every generated token, against the training forward over the whole sequence
    seq = list(r.prompt) + got.tokens
    full = _forward(model, seq[:-1])[len(r.prompt) - 1:]
    np.testing.assert_allclose(got.logits, full, rtol=2e-4, atol=2e-4, err_msg=f"{variant} request {r.id}")


# one variant per attention-core family (expanded keys, latent, TPA's factors), one page size, one mesh
CI_CASES = [("gqa", 16, None), ("mla", 16, None), ("mlra4", 16, "data:2,tensor:4"), ("tpa", 16, None),
            ("mla", 16, "context:2,tensor:2")]


@pytest.mark.parametrize("variant,page_size,mesh_spec", CI_CASES)
def test_engine_matches_dense_generate(variant, page_size, mesh_spec):
  check_engine_matches_dense(variant, page_size, mesh_spec)


VARIANTS = ("mha", "mqa", "gqa", "mla", "gla2", "gla4", "mlra2", "mlra4", "gta", "tpa", "mfa")
FULL = [(v, p, None) for v in VARIANTS for p in (1, 16, 64)] + \
       [(v, 16, m) for v in VARIANTS for m in ("data:2", "tensor:4", "context:4", "data:2,context:2,tensor:2")]


@pytest.mark.full
@pytest.mark.parametrize("variant,page_size,mesh_spec", [c for c in FULL if c not in CI_CASES])
def test_engine_matches_dense_generate_full(variant, page_size, mesh_spec):
  check_engine_matches_dense(variant, page_size, mesh_spec)


@pytest.mark.full
@pytest.mark.parametrize("variant", ["mla", "mlra4", "gla2"])
def test_engine_naive_latent_decode_matches_dense(variant):
  check_engine_matches_dense(variant, 16, decode_impl="naive")


def _until_gap(finished, other, gap=1e-4):
  """Tokens of two runs of one request up to where the model's top-2 logit gap is
  within `gap` (past that, rounding may legitimately pick the other token)."""
  n = 0
  for row in finished.logits:
    top2 = np.sort(row)[-2:]
    if top2[1] - top2[0] <= gap:
      break
    n += 1
  return finished.tokens[:n + 1], other.tokens[:n + 1]


def test_a_request_does_not_depend_on_its_batch():
  model = random_model(small_config("mla"), seed=1)
  rng = np.random.default_rng(1)
  target = Request(tuple(int(t) for t in rng.integers(0, 61, 21)), 24, id="t")
  sampled = Request(target.prompt, 24, Sampling(temperature=1.0, top_k=20), seed=5, id="s")
  few = dict(page_size=4, keep_logits=True, width_buckets=(8, 16))             # few shapes: few compiles
  alone = {f.id: f for f in Engine(model, max_seqs=2, row_buckets=(2,), **few).run([target, sampled])}
  crowd = _requests(rng, 6, 61, 4)
  engine = Engine(model, max_seqs=8, row_buckets=(8,), prefill_chunk=8, **few)
  for r in crowd[:3]:
    engine.submit(r)
  engine.step()
  engine.step()
  shared = {f.id: f for f in engine.run(crowd[3:] + [target, sampled])}
  a, b = _until_gap(alone["t"], shared["t"])
  assert len(a) > 5 and a == b
  assert alone["s"].tokens == shared["s"].tokens        # sampling keys follow the request, not the batch
  assert alone["s"].tokens != alone["t"].tokens


def test_speculative_decoding_changes_speed_not_tokens():
  model = random_model(small_config("mlra4"), seed=2)
  rng = np.random.default_rng(2)
  motif = [int(t) for t in rng.integers(0, 61, 5)]
  requests = [Request(tuple(motif * 4 + [int(t) for t in rng.integers(0, 61, i)]), 30, id=i) for i in range(4)]
  requests.append(Request(tuple(motif * 3), 30, Sampling(temperature=0.7), seed=3, id="sampled"))
  few = dict(max_seqs=4, page_size=4, keep_logits=True, row_buckets=(4,), width_buckets=(8, 16))
  plain = {f.id: f for f in Engine(model, **few).run(requests)}
  engine = Engine(model, drafter=ngram_drafter(3), **few)
  spec = {f.id: f for f in engine.run(requests)}
  stats = engine.summary()
  assert 0 < stats["accepted"] < stats["drafted"]       # drafts were both kept and rolled back
  for r in requests:
    assert spec[r.id].tokens == plain[r.id].tokens, r.id
    # a rejected draft leaves no trace: every later logit is as if it had never been proposed
    np.testing.assert_allclose(spec[r.id].logits, plain[r.id].logits, rtol=2e-4, atol=2e-4)
  assert stats["decode_steps"] < sum(len(f.tokens) for f in plain.values())


def test_a_hundred_requests_through_a_small_pool():
  config = small_config("gqa")
  model = random_model(config, seed=4)
  rng = np.random.default_rng(4)
  requests = _requests(rng, 100, config.vocab_size, 8, max_prompt=24, max_new=(1, 12))
  engine = Engine(model, max_seqs=8, page_size=8, num_pages=13, row_buckets=(8,), width_buckets=(2, 8))
  done = {f.id: f for f in engine.run(requests)}
  assert sorted(done) == list(range(100))
  want = _dense(model, requests)
  assert all(done[i].tokens == want[i] for i in range(100))
  stats = engine.summary()
  needed = sum(engine.pool.pages_for(len(r.prompt) + r.max_new_tokens) for r in requests)
  assert needed > 5 * (engine.pool.num_pages - 1)               # pages were reused many times over
  assert 0 < stats["pages_high_water"] <= 12 and engine.pool.used_pages == 0
  assert stats["compiled_shapes"] <= 4                          # (prefill, decode) x 2 widths
  assert {w for (_, _, w, _) in engine.stats["compiles"]} == {2, 8}   # short steps read short tables


def test_prefix_pages_are_shared_and_change_nothing():
  model = random_model(small_config("mla"), seed=5)
  rng = np.random.default_rng(5)
  prefix = [int(t) for t in rng.integers(0, 61, 19)]
  tails = [[int(t) for t in rng.integers(0, 61, n)] for n in (1, 4, 9)]
  requests = [Request(tuple(prefix + t), 10, id=i) for i, t in enumerate(tails)]

  def serve(sharing):
    engine = Engine(model, max_seqs=4, page_size=4, prefix_sharing=sharing, keep_logits=True, row_buckets=(4,),
                    width_buckets=(16,))
    engine.submit(requests[0])
    engine.step()                                               # the first prompt is cached
    for r in requests[1:]:
      engine.submit(r)
    engine._admit()
    held = [engine.pool.pages(k) for k in engine.running if k in engine.pool]
    return {f.id: f for f in engine.run()}, engine, held

  shared, engine, held = serve(True)
  plain, plain_engine, _ = serve(False)
  assert engine.summary()["shared_prefix_tokens"] == 2 * 16     # 4 full pages of the 19-token prefix, twice
  assert held[0][:4] == held[1][:4] == held[2][:4]              # the pool holds the prefix once
  assert engine.pool.high_water == plain_engine.pool.high_water - 8
  for r in requests:
    assert shared[r.id].tokens == plain[r.id].tokens
    np.testing.assert_allclose(shared[r.id].logits, plain[r.id].logits, rtol=2e-4, atol=2e-4)


def test_stop_tokens_and_per_request_limits():
  model = random_model(small_config("gqa"), seed=6)
  prompt = (3, 1, 4, 1, 5)
  few = dict(row_buckets=(2,), width_buckets=(4,))
  free = Engine(model, **few).run([Request(prompt, 12)])[0].tokens
  stop = (free[4], free[7])
  got = Engine(model, **few).run([Request(prompt, 12, stop=stop, id="a"), Request(prompt, 3, id="b")])
  by = {f.id: f for f in got}
  first = min(free.index(s) for s in stop)
  assert by["a"].tokens == free[:first + 1] and by["a"].finish_reason == "stop"
  assert by["b"].tokens == free[:3] and by["b"].finish_reason == "length"
  # the context bounds what a request may ask for: it ends with "length" at max_len
  long = Engine(model, max_len=10, row_buckets=(2,)).run([Request(prompt, 50)])[0]
  assert len(long.tokens) == 5 and long.finish_reason == "length"


@pytest.mark.parametrize("request_, msg", [
    (Request((), 4), "empty prompt"),
    (Request((1, 2), 0), "max_new_tokens must be a positive integer, got 0"),
    (Request((1, 2), -3), "max_new_tokens must be a positive integer, got -3"),
    (Request((1,) * 64, 4), "prompt of 64 tokens leaves no room .* at most 63"),
    (Request((1, 99), 4), r"prompt token ids must be integers in \[0, 61\)"),
])
def test_bad_requests_are_refused_one_by_one(request_, msg):
  engine = Engine(random_model(small_config("gqa")))
  with pytest.raises(RequestError, match=msg):
    engine.submit(request_)
  assert engine.idle


def test_a_pool_too_small_names_the_smallest_that_works():
  with pytest.raises(ValueError, match="cannot hold one sequence of 64 tokens .* use num_pages >= 5"):
    Engine(random_model(small_config("gqa")), page_size=16, num_pages=4)


def test_pages_that_do_not_split_over_context_are_refused_before_allocating():
  config = small_config("mla", vocab=64)
  mesh = sharding.make_mesh("context:4", config)
  with sharding.use_mesh(mesh), pytest.raises(ValueError, match="pages of 6 tokens do not split over context:4.*"
                                                                  "--page_size=8"):
    Engine(random_model(config), page_size=6)
