"""The decode engine: continuous batching over paged caches.

    submit(request) ─▶ waiting ─admit─▶ running ─step…─▶ Finished (pages freed)

Each `step()` admits waiting requests while the pool can hold what every running
sequence may still need (so a running sequence never runs out of pages: a
request that does not fit waits), then runs at most two jitted steps of
`Transformer.step` over the page pools:

* a prefill step for the sequences still reading their prompt: up to
  `prefill_chunk` prompt tokens each (a long prompt takes several steps, while
  the other sequences go on decoding);
* a decode step for the others: their last token, plus with a drafter a
  speculative draft of K tokens verified in the same step (the longest prefix
  that agrees with the model's own samples is kept, the rest rolled back by
  length).

Shapes are bucketed so the compiles are bounded by the buckets, not by the
requests: rows to a power of two (up to `max_seqs`), the page table's width to
a power of two of pages covering the longest live sequence of the step (the
XLA path reads the table's pages, so a step's work follows the tokens cached,
not the pool's capacity). Sampling runs per row (temperature, top-k, top-p and
the request's seed), the key of the i-th generated token being
fold_in(key(seed), i): a request's tokens do not depend on its batch-mates, and
speculation changes how fast they come, not which.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections import deque
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mla_jax import compat, quant, rules
from mla_jax.attention.base import cache_layout
from mla_jax.config import option
from mla_jax.paging import PagePool


# ----------------------------------------------------------------------------- sampling


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""
  temperature: float = option(0.0, "Sampling temperature (0 = greedy).")
  top_k: int = option(0, "Top-k filter (0 = off).")
  top_p: float = option(1.0, "Top-p filter (1 = off).")

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")


def sample_rows(logits, keys, temperature, top_k, top_p):
  """logits [N, V], one key and one set of sampling parameters per row -> ids [N].
  Greedy where temperature is 0; else top-k, then the smallest set of the
  remaining most likely tokens whose mass reaches top_p (the top one always stays)."""
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
  neg = jnp.finfo(jnp.float32).min
  ranked = -jnp.sort(-scaled, axis=-1)                                   # descending
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  in_top_k = jnp.arange(vocab) < k[:, None]
  probs = jax.nn.softmax(jnp.where(in_top_k, ranked, neg), axis=-1)
  keep = in_top_k & (((jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]) | (top_p[:, None] >= 1.0))
  threshold = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)
  filtered = jnp.where(scaled < threshold, neg, scaled)
  drawn = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
  return jnp.where(temperature > 0, drawn, greedy)


def sample_logits(logits: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
  """logits [B, V] -> token ids [B], every row under the same `sampling`."""
  rows = logits.shape[0]
  full = lambda v, dt: jnp.full((rows,), v, dt)   # noqa: E731
  return sample_rows(logits, jax.random.split(rng, rows), full(sampling.temperature, jnp.float32),
                     full(sampling.top_k, jnp.int32), full(sampling.top_p, jnp.float32))


# ----------------------------------------------------------------------------- requests


class RequestError(ValueError):
  """A request the engine refuses (the others go on)."""


@dataclasses.dataclass(frozen=True)
class Request:
  prompt: tuple[int, ...]
  max_new_tokens: int
  sampling: Sampling = Sampling()
  stop: tuple[int, ...] = ()          # any of these ends the request (and is returned)
  seed: int = 0
  id: Any = None


@dataclasses.dataclass
class Finished:
  id: Any
  prompt_tokens: int
  tokens: list[int]
  finish_reason: str                  # "stop" (a stop token) or "length" (max_new_tokens or the context)
  ttft_s: float                       # submit to first token
  decode_s: float                     # first token to last
  logits: np.ndarray | None = None    # [len(tokens), V] with keep_logits

  @property
  def decode_tokens_per_s(self) -> float:
    return (len(self.tokens) - 1) / self.decode_s if self.decode_s > 0 else float("nan")


@dataclasses.dataclass
class _Seq:
  request: Request
  tokens: list[int]                   # prompt, then the generated tokens
  limit: int                          # tokens the sequence may reach (prompt + max_new, or the context)
  submitted: float
  cached: int = 0                     # tokens whose entries are in the pages
  first_token_at: float | None = None
  logits: list = dataclasses.field(default_factory=list)

  @property
  def generated(self) -> int:
    return len(self.tokens) - len(self.request.prompt)


def ngram_drafter(k: int, max_ngram: int = 3) -> Callable[[Sequence[int]], list[int]]:
  """Prompt lookup: find the latest earlier occurrence of the sequence's last n
  tokens (n = max_ngram down to 1) and propose the (up to) k tokens that followed it."""
  if k < 1:
    raise ValueError(f"the n-gram drafter needs k >= 1 draft tokens, got {k}")

  def draft(tokens: Sequence[int]) -> list[int]:
    tokens = list(tokens)
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
      tail = tokens[-n:]
      for start in range(len(tokens) - n - 1, -1, -1):
        if tokens[start:start + n] == tail:
          return tokens[start + n:start + n + k]
    return []

  draft.k = k
  return draft


def parse_speculative(spec: str):
  """'' -> None; 'ngram:K' -> an n-gram drafter of K tokens."""
  if not spec:
    return None
  kind, _, k = spec.partition(":")
  if kind != "ngram" or not k.isdigit() or int(k) < 1:
    raise ValueError(f"--speculative={spec!r} is not understood; use ngram:K (K >= 1 draft tokens), e.g. ngram:4")
  return ngram_drafter(int(k))


# ----------------------------------------------------------------------------- the jitted step


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("last_only", "with_logits"),
                   donate_argnums=(2,))
def _run_step(graphdef, state, pools, tokens, lengths, pages, last, seeds, counters, temperature, top_k, top_p,
              *, last_only, with_logits):
  """Feed tokens [R, S] at lengths [R] through page table pages [R, W]; sample the
  token after each fed position (only after position last[r] with last_only)."""
  model = nnx.merge(graphdef, state)
  logits, pools = model.step(tokens, pools, lengths, pages)
  if last_only:
    logits = jnp.take_along_axis(logits, last[:, None, None], axis=1)
  rows, width = logits.shape[:2]
  index = counters[:, None] + jnp.arange(width)                 # which generated token each position gives
  keys = jax.vmap(lambda s, i: jax.vmap(lambda j: jax.random.fold_in(jax.random.key(s), j))(i))(seeds, index)
  rep = lambda v: jnp.repeat(v, width)                          # noqa: E731
  out = sample_rows(logits.reshape(rows * width, -1), keys.reshape(-1), rep(temperature), rep(top_k), rep(top_p))
  return out.reshape(rows, width), (logits if with_logits else None), pools


def _bucket(n: int, cap: int, buckets: Sequence[int] | None) -> int:
  if buckets:
    return next((b for b in buckets if b >= n), max(n, buckets[-1]))
  return min(cap, 1 << max(0, n - 1).bit_length()) if n <= cap else n


# ----------------------------------------------------------------------------- the engine


def default_page_size() -> int:
  """Tokens per page when none is asked for: 64 on a GPU, whose latent kernel
  reads a page in tiles of at most 64 tokens and runs ~1.5x slower at 32
  (results/gpu/); 16 elsewhere (less padding per sequence)."""
  return 64 if compat.on_gpu() else 16


def device_memory_bytes() -> int:
  """What one device can hold: the accelerator's allocator limit, or the host's
  physical memory on a CPU."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_pool_fits(config, options, num_pages: int, page_size: int, *, max_seqs: int, max_len: int) -> None:
  """Refuse (one line) page pools larger than the device, before anything is
  allocated or compiled: `Transformer.init_pages`' arrays, every layer's, of
  which each device of a `context` axis holds 1 / CP."""
  need = (num_pages * page_size * config.num_layers
          * quant.layout_bytes_per_token(cache_layout(config.attention, options.cache_format))
          / rules.mesh_axis_size("context"))
  have = device_memory_bytes()
  if need > have:
    raise ValueError(f"the KV cache for {max_seqs:,} sequence(s) of up to {max_len:,} tokens needs "
                     f"{need / 1e9:,.1f} GB, more than this device's {have / 1e9:,.1f} GB; generate fewer tokens "
                     "(--max_new_tokens, --serve_max_len) or serve fewer sequences at once (--max_seqs, --num_pages)")


def default_pool(max_seqs: int, max_len: int, page_size: int) -> int:
  """Pages when none are asked for: every sequence at full length, and the reserved page."""
  return max_seqs * math.ceil(max_len / page_size) + 1


def smallest_pool(max_len: int, page_size: int) -> int:
  """Pages (the reserved one included) that hold one sequence of max_len tokens."""
  return math.ceil(max_len / page_size) + 1


class Engine:
  """Continuous batching of `Request`s over the model's paged caches.

  max_seqs: sequences in flight; page_size: tokens per page; num_pages: the
  pool (page 0 reserved), default enough for max_seqs sequences of max_len;
  max_len: the longest sequence (prompt + generated), default the model's
  context; prefill_chunk: prompt tokens per sequence and step; drafter: e.g.
  `ngram_drafter(4)` for speculative decoding; keep_logits: return each
  generated token's logits; page_order: the order pages are handed out (tests);
  prefix_sharing: a new request starts on the full pages of a running
  sequence's identical prefix instead of recomputing them.
  """

  def __init__(self, model, *, max_seqs: int = 8, page_size: int | None = None, num_pages: int | None = None,
               max_len: int | None = None, prefill_chunk: int = 64, drafter=None, keep_logits: bool = False,
               page_order: Sequence[int] | None = None, prefix_sharing: bool = True,
               row_buckets: Sequence[int] | None = None, width_buckets: Sequence[int] | None = None):
    config = model.config
    self.max_len = config.max_seq_len if max_len is None else max_len
    page_size = default_page_size() if page_size is None else page_size
    if max_seqs < 1 or page_size < 1 or prefill_chunk < 1 or self.max_len < 2:
      raise ValueError(f"max_seqs, page_size and prefill_chunk must be >= 1 and max_len >= 2; got {max_seqs}, "
                       f"{page_size}, {prefill_chunk}, {self.max_len}")
    if config.flavour == "gpt2" and self.max_len > config.max_seq_len:
      raise ValueError(f"max_len {self.max_len} exceeds max_seq_len={config.max_seq_len} (the GPT-2 flavour's "
                       "position table); lower it")
    ways = rules.mesh_axis_size("context")                      # under context parallelism
    if page_size % ways:
      raise ValueError(f"pages of {page_size} tokens do not split over context:{ways} (each device holds "
                       f"1 / {ways} of every page); use a page size that is a multiple of {ways}, e.g. "
                       f"--page_size={ways * -(-page_size // ways)}")
    self.max_pages = -(-self.max_len // page_size)              # pages of one sequence at most
    if num_pages is None:
      num_pages = default_pool(max_seqs, self.max_len, page_size)
    if num_pages < smallest_pool(self.max_len, page_size):
      raise ValueError(f"a pool of {num_pages} pages of {page_size} tokens cannot hold one sequence of "
                       f"{self.max_len} tokens (max_len); use num_pages >= {smallest_pool(self.max_len, page_size)} "
                       "(page 0 is reserved)")
    check_pool_fits(config, model.options, num_pages, page_size, max_seqs=max_seqs, max_len=self.max_len)
    self.model, self.config = model, config
    self.max_seqs, self.page_size, self.prefill_chunk = max_seqs, page_size, prefill_chunk
    self.drafter, self.keep_logits, self.prefix_sharing = drafter, keep_logits, prefix_sharing
    self.draft_len = getattr(drafter, "k", 0) if drafter else 0
    self.row_buckets = sorted(row_buckets) if row_buckets else None
    self.width_buckets = sorted(width_buckets) if width_buckets else None
    self.pool = PagePool(num_pages, page_size, page_order)
    self.graphdef, self.state = nnx.split(model)
    self.pools = jax.jit(lambda: model.init_pages(num_pages, page_size))()
    self.waiting: deque[_Seq] = deque()
    self.running: dict[int, _Seq] = {}
    self._next_id = self._next_key = 0
    self.stats = dict(steps=0, prefill_steps=0, decode_steps=0, drafted=0, accepted=0, shared_tokens=0,
                      compiles=set())

  # ------------------------------------------------------------------ requests
  def check(self, request: Request) -> None:
    """Raise RequestError (one line: the problem and the fix) for a request the engine cannot serve."""
    prompt, vocab = request.prompt, self.config.vocab_size
    if len(prompt) == 0:
      raise RequestError("empty prompt: give at least one token")
    if any(not isinstance(t, (int, np.integer)) or not 0 <= t < vocab for t in prompt):
      raise RequestError(f"prompt token ids must be integers in [0, {vocab})")
    if len(prompt) >= self.max_len:
      raise RequestError(f"prompt of {len(prompt)} tokens leaves no room to generate within the context of "
                         f"{self.max_len} tokens; shorten it to at most {self.max_len - 1}")
    if not isinstance(request.max_new_tokens, (int, np.integer)) or request.max_new_tokens < 1:
      raise RequestError(f"max_new_tokens must be a positive integer, got {request.max_new_tokens!r}")

  def submit(self, request: Request) -> Any:
    """Queue a request (RequestError if it cannot be served); returns its id."""
    self.check(request)
    if request.id is None:
      request = dataclasses.replace(request, id=self._next_id)
    self._next_id += 1
    limit = min(len(request.prompt) + request.max_new_tokens, self.max_len)
    self.waiting.append(_Seq(request, list(request.prompt), limit, time.perf_counter()))
    return request.id

  @property
  def idle(self) -> bool:
    return not self.waiting and not self.running

  # ------------------------------------------------------------------ scheduling
  def _outstanding(self) -> int:
    """Pages the running sequences may still take."""
    return sum(max(0, self.pool.pages_for(s.limit) - self._held(key)) for key, s in self.running.items())

  def _held(self, key: int) -> int:
    return len(self.pool.pages(key)) if key in self.pool else 0

  def _admit(self) -> None:
    while self.waiting and len(self.running) < self.max_seqs:
      seq = self.waiting[0]
      src, shared = self._prefix_source(seq)
      need = self.pool.pages_for(seq.limit) - shared // self.page_size
      if need + self._outstanding() > self.pool.free_pages:
        return                                                   # it waits for pages to be freed
      self.waiting.popleft()
      key, self._next_key = self._next_key, self._next_key + 1
      if shared:
        seq.cached = self.pool.share_prefix(src, key, shared)
        self.stats["shared_tokens"] += seq.cached
      self.running[key] = seq

  def _prefix_source(self, seq: _Seq) -> tuple[int | None, int]:
    """The running sequence whose cached tokens share the most full pages with this prompt."""
    if not self.prefix_sharing:
      return None, 0
    best, best_tokens = None, 0
    prompt = seq.request.prompt
    for key, other in self.running.items():
      n, top = 0, min(other.cached, len(prompt) - 1)             # the last prompt token is always computed
      while n < top and other.tokens[n] == prompt[n]:
        n += 1
      n -= n % self.page_size
      if n > best_tokens:
        best, best_tokens = key, n
    return best, best_tokens

  # ------------------------------------------------------------------ one iteration
  def step(self) -> list[Finished]:
    """Admit, run one prefill and/or one decode step, retire; returns the requests that finished."""
    self._admit()
    prefill = [k for k, s in self.running.items() if len(s.tokens) - s.cached > 1]
    decode = [k for k, s in self.running.items() if len(s.tokens) - s.cached == 1]
    finished = []
    if prefill:
      finished += self._prefill(prefill)
    if decode:
      finished += self._decode(decode)
    self.stats["steps"] += 1
    return finished

  def run(self, requests: Sequence[Request] = (), on_finish: Callable[[Finished], None] | None = None) -> list[Finished]:
    """Serve `requests` (and whatever was submitted before) to the end; results in finishing order."""
    for r in requests:
      self.submit(r)
    done = []
    while not self.idle:
      for f in self.step():
        done.append(f)
        if on_finish:
          on_finish(f)
    return done

  def _prefill(self, keys: list[int]) -> list[Finished]:
    feeds = {}
    for k in keys:
      s = self.running[k]
      feeds[k] = s.tokens[s.cached:s.cached + self.prefill_chunk]
    return self._run(keys, feeds, width=self.prefill_chunk, last_only=True)

  def _decode(self, keys: list[int]) -> list[Finished]:
    feeds = {}
    for k in keys:
      s = self.running[k]
      room = min(self.draft_len, s.limit - len(s.tokens))          # drafts never pass the limit
      draft = self.drafter(s.tokens)[:room] if room > 0 else []
      feeds[k] = [s.tokens[-1]] + draft
      self.stats["drafted"] += len(draft)
    return self._run(keys, feeds, width=1 + self.draft_len, last_only=False)

  def _run(self, keys, feeds, *, width, last_only) -> list[Finished]:
    rows = _bucket(len(keys), self.max_seqs, self.row_buckets)
    for k in keys:
      self.pool.reserve(k, self.running[k].cached + len(feeds[k]))   # within the admitted budget
    longest = max(len(self.pool.pages(k)) for k in keys)
    table_width = _bucket(longest, self.max_pages, self.width_buckets)
    tokens = np.zeros((rows, width), np.int32)
    lengths, last, seeds, counters = (np.zeros(rows, np.int32) for _ in range(4))
    temperature, top_p = np.zeros(rows, np.float32), np.ones(rows, np.float32)
    top_k = np.zeros(rows, np.int32)
    for r, k in enumerate(keys):
      s, feed = self.running[k], feeds[k]
      tokens[r, :len(feed)] = feed
      lengths[r], last[r] = s.cached, len(feed) - 1
      seeds[r], counters[r] = s.request.seed, s.generated
      temperature[r], top_k[r], top_p[r] = s.request.sampling.temperature, s.request.sampling.top_k, \
          s.request.sampling.top_p
    table = self.pool.table(list(keys) + [None] * (rows - len(keys)), table_width)
    self.stats["compiles"].add((rows, width, table_width, last_only))
    self.stats["prefill_steps" if last_only else "decode_steps"] += 1
    sampled, logits, self.pools = _run_step(
        self.graphdef, self.state, self.pools, tokens, lengths, table, last, seeds, counters, temperature,
        top_k, top_p, last_only=last_only, with_logits=self.keep_logits)
    sampled = np.asarray(sampled)
    logits = None if logits is None else np.asarray(logits)
    now = time.perf_counter()
    finished = []
    for r, k in enumerate(keys):
      s, feed = self.running[k], feeds[k]
      if last_only and s.cached + len(feed) < len(s.tokens):
        s.cached += len(feed)                                     # more prompt to read
        continue
      # feed[0] is the sequence's next token; feed[1:] a draft, kept while the model's samples agree
      accepted = 0
      while not last_only and accepted < len(feed) - 1 and sampled[r, accepted] == feed[1 + accepted]:
        accepted += 1
      self.stats["accepted"] += accepted
      s.cached += len(feed) if last_only else 1 + accepted
      new = [int(t) for t in sampled[r, :accepted + 1]]
      new_logits = None if logits is None else logits[r, :accepted + 1]
      if s.cached + 1 < self.pool.capacity(k):
        self.pool.truncate(k, s.cached + 1)                       # pages of the rejected draft go back
      done = self._extend(s, new, new_logits, now)
      if done:
        self.pool.release(k)
        del self.running[k]
        finished.append(done)
    return finished

  def _extend(self, s: _Seq, new: list[int], new_logits, now: float) -> Finished | None:
    if s.first_token_at is None:
      s.first_token_at = now
    reason = None
    for i, t in enumerate(new):
      s.tokens.append(t)
      if new_logits is not None:
        s.logits.append(new_logits[i])
      if t in s.request.stop:
        reason = "stop"
      elif len(s.tokens) >= s.limit:
        reason = "length"
      if reason:
        break
    if reason is None:
      return None
    req = s.request
    return Finished(id=req.id, prompt_tokens=len(req.prompt), tokens=s.tokens[len(req.prompt):],
                    finish_reason=reason, ttft_s=s.first_token_at - s.submitted, decode_s=now - s.first_token_at,
                    logits=np.stack(s.logits) if s.logits else None)

  # ------------------------------------------------------------------ reporting
  def summary(self) -> dict:
    drafted = self.stats["drafted"]
    return {"steps": self.stats["steps"], "prefill_steps": self.stats["prefill_steps"],
            "decode_steps": self.stats["decode_steps"], "compiled_shapes": len(self.stats["compiles"]),
            "pages_high_water": self.pool.high_water, "pages": self.pool.num_pages - 1,
            "page_size": self.page_size, "shared_prefix_tokens": self.stats["shared_tokens"],
            "drafted": drafted, "accepted": self.stats["accepted"],
            "acceptance": self.stats["accepted"] / drafted if drafted else None}

  def cache_bytes_per_page(self) -> int:
    """Bytes one page holds across every layer and cache array."""
    return sum(x.nbytes for x in jax.tree.leaves(self.pools)) // self.pool.num_pages
