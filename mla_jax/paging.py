"""Paged caches: which fixed-size pages of a pool hold which sequence's tokens.

    pool[name]: [num_pages, page_size, *per_token_shape]        (one per cache array and layer)
    token t of sequence s lives at pool[table[s, t // page_size], t % page_size]

This module is the host-side bookkeeping (plain Python, no arrays on device):
a free list, per-sequence page lists, reference counts (a full page of a shared
prompt prefix can belong to several sequences) and the high-water mark. Every
operation either succeeds or raises before changing anything, so a request that
does not fit can be queued or refused while the others go on.

Page 0 is never handed out: page tables are padded with it and inactive batch
rows write into it, so a fixed-shape step needs no branch for them.
"""
from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

import numpy as np

NULL_PAGE = 0


class PoolExhausted(RuntimeError):
  """Not enough free pages; nothing was changed."""

  def __init__(self, seq: Hashable, needed: int, free: int):
    self.seq, self.needed, self.free = seq, needed, free
    super().__init__(f"sequence {seq!r} needs {needed} more pages but {free} are free: "
                     "wait for running sequences to finish or give the pool more pages")


class PagePool:
  """Pages 1..num_pages-1 handed out to sequences, `page_size` tokens each.

  `order` is the order free pages are handed out (default ascending); tests
  pass a shuffled one so that nothing can rely on a sequence's pages being
  contiguous.
  """

  def __init__(self, num_pages: int, page_size: int, order: Iterable[int] | None = None):
    if page_size < 1:
      raise ValueError(f"page_size must be >= 1, got {page_size}")
    if num_pages < 2:
      raise ValueError(f"num_pages must be >= 2 (page {NULL_PAGE} is reserved), got {num_pages}")
    order = list(range(1, num_pages)) if order is None else list(order)
    if sorted(order) != list(range(1, num_pages)):
      raise ValueError(f"order must be a permutation of the pages 1..{num_pages - 1}")
    self.num_pages, self.page_size = num_pages, page_size
    self._free = order[::-1]                       # a stack: pop() hands out order[0] first
    self._refs = np.zeros(num_pages, np.int64)
    self._pages: dict[Hashable, list[int]] = {}
    self.high_water = 0                            # the most pages ever in use at once

  # ---------------------------------------------------------------- queries
  def pages_for(self, tokens: int) -> int:
    """Pages that hold `tokens` tokens."""
    return -(-tokens // self.page_size)

  @property
  def free_pages(self) -> int:
    return len(self._free)

  @property
  def used_pages(self) -> int:
    return self.num_pages - 1 - len(self._free)

  def pages(self, seq: Hashable) -> tuple[int, ...]:
    return tuple(self._pages[seq])

  def capacity(self, seq: Hashable) -> int:
    """Tokens `seq` has room for."""
    return len(self._pages[seq]) * self.page_size

  def __contains__(self, seq: Hashable) -> bool:
    return seq in self._pages

  def can_reserve(self, seq: Hashable, tokens: int) -> bool:
    return self._needed(seq, tokens) <= len(self._free)

  def table(self, seqs: Sequence[Hashable | None], width: int) -> np.ndarray:
    """int32 [len(seqs), width] page table; None rows and unused columns hold the null page."""
    out = np.full((len(seqs), width), NULL_PAGE, np.int32)
    for row, seq in enumerate(seqs):
      if seq is None:
        continue
      pages = self._pages[seq]
      if len(pages) > width:
        raise ValueError(f"sequence {seq!r} holds {len(pages)} pages, more than the table's width {width}")
      out[row, :len(pages)] = pages
    return out

  # ---------------------------------------------------------------- changes
  def reserve(self, seq: Hashable, tokens: int) -> None:
    """Give `seq` (new or not) room for `tokens` tokens; raises PoolExhausted
    without changing anything when the free pages do not suffice."""
    needed = self._needed(seq, tokens)
    if needed > len(self._free):
      raise PoolExhausted(seq, needed, len(self._free))
    pages = self._pages.setdefault(seq, [])
    for _ in range(needed):
      page = self._free.pop()
      self._refs[page] = 1
      pages.append(page)
    self.high_water = max(self.high_water, self.used_pages)

  def truncate(self, seq: Hashable, tokens: int) -> None:
    """Keep room for `tokens` tokens of `seq` and free the pages past them (a
    rejected speculative suffix: the kept pages' later slots are overwritten by
    the next writes and never read before, since reads stop at the length)."""
    pages = self._pages[seq]
    keep, partial = self.pages_for(tokens), tokens // self.page_size
    if keep > partial and partial < len(pages) and self._refs[pages[partial]] > 1:
      raise ValueError(f"cannot roll sequence {seq!r} back to {tokens} tokens: page {pages[partial]} "
                       "is shared with another sequence's prefix and would be overwritten")
    for page in reversed(pages[keep:]):
      self._unref(page)
    del pages[keep:]

  def release(self, seq: Hashable) -> None:
    """Free every page of `seq` (pages still shared by others stay in use)."""
    for page in reversed(self._pages.pop(seq)):
      self._unref(page)

  def share_prefix(self, src: Hashable, dst: Hashable, tokens: int) -> int:
    """Start the new sequence `dst` with the full pages of `src`'s first `tokens`
    tokens, shared (their contents are identical for an identical prefix).
    Returns the tokens shared: a whole number of pages, so `dst` writes its own
    tokens only into pages of its own."""
    if dst in self._pages:
      raise ValueError(f"sequence {dst!r} already holds pages")
    full = min(tokens // self.page_size, len(self._pages[src]))
    shared = self._pages[src][:full]
    for page in shared:
      self._refs[page] += 1
    self._pages[dst] = list(shared)
    return full * self.page_size

  # ---------------------------------------------------------------- internals
  def _needed(self, seq: Hashable, tokens: int) -> int:
    if tokens < 0:
      raise ValueError(f"tokens must be >= 0, got {tokens}")
    return max(0, self.pages_for(tokens) - len(self._pages.get(seq, ())))

  def _unref(self, page: int) -> None:
    self._refs[page] -= 1
    if self._refs[page] == 0:
      self._free.append(page)
