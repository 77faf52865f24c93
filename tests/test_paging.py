"""PagePool against a ledger of token lists: random admissions, appends, shared
prefixes, roll-backs and releases, with the pages' contents simulated in NumPy
through the page tables the pool hands out."""
import numpy as np
import pytest

from mla_jax.paging import NULL_PAGE, PagePool, PoolExhausted


def _check_invariants(pool, ledger, high_water):
  listed = [p for seq in ledger for p in pool.pages(seq)]
  assert NULL_PAGE not in listed and all(1 <= p < pool.num_pages for p in listed)
  assert pool.used_pages == len(set(listed)) == pool.num_pages - 1 - pool.free_pages
  assert pool.high_water == high_water
  for seq, tokens in ledger.items():         # the fewest pages that hold the tokens
    assert pool.capacity(seq) >= len(tokens) and len(pool.pages(seq)) == pool.pages_for(len(tokens))


@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_random_traffic_keeps_every_sequence_readable(page_size):
  rng = np.random.default_rng(page_size)
  num_pages = 4 + 40 // page_size
  pool = PagePool(num_pages, page_size, order=rng.permutation(np.arange(1, num_pages)).tolist())
  contents = np.full((num_pages, page_size), -1)      # the device pool, one int per slot
  ledger: dict[int, list[int]] = {}                   # seq -> its tokens (the reference)
  high_water, next_id, refused, shares, rolled_into_shared = 0, 0, 0, 0, 0

  def write(seq, tokens):
    start = len(ledger[seq])
    pool.reserve(seq, start + len(tokens))
    table = pool.table([seq], pool.pages_for(start + len(tokens)))[0]
    for t, token in enumerate(tokens, start):
      page = table[t // page_size]
      owners = sum(page in pool.pages(s) for s in ledger)
      assert owners == 1, f"a write into page {page}, which {owners} sequences hold"
      contents[page, t % page_size] = token
    ledger[seq].extend(tokens)

  for _ in range(400):
    op = rng.choice(["admit", "append", "rollback", "release"], p=[0.3, 0.4, 0.15, 0.15])
    before = {s: pool.pages(s) for s in ledger}, pool.free_pages
    if op == "admit":
      seq, next_id = next_id, next_id + 1
      prompt = rng.integers(0, 1000, rng.integers(1, 12)).tolist()
      ledger[seq] = []
      donors = [s for s in ledger if s != seq and len(ledger[s]) >= page_size]
      if donors and rng.random() < 0.5:            # a request that repeats another's prefix
        src = donors[rng.integers(len(donors))]
        n = int(rng.integers(page_size, len(ledger[src]) + 1))
        shared = pool.share_prefix(src, seq, n)
        assert shared == n // page_size * page_size
        ledger[seq] = list(ledger[src][:shared])
        shares += 1
      try:
        write(seq, prompt)
      except PoolExhausted as e:
        refused += 1
        assert e.needed > e.free == before[1]
        if seq in pool:                            # it holds the shared prefix: give it back
          pool.release(seq)
        del ledger[seq]
    elif op == "append" and ledger:
      seq = list(ledger)[rng.integers(len(ledger))]
      try:
        write(seq, rng.integers(0, 1000, rng.integers(1, 6)).tolist())
      except PoolExhausted:
        refused += 1
        assert {s: pool.pages(s) for s in ledger} == before[0] and pool.free_pages == before[1]
    elif op == "rollback" and ledger:
      seq = list(ledger)[rng.integers(len(ledger))]
      keep = int(rng.integers(0, len(ledger[seq]) + 1))
      partial = pool.pages(seq)[keep // page_size] if keep % page_size else None
      if partial is not None and sum(partial in pool.pages(s) for s in ledger) > 1:
        with pytest.raises(ValueError, match="shared"):
          pool.truncate(seq, keep)
        rolled_into_shared += 1
        assert {s: pool.pages(s) for s in ledger} == before[0]
      else:
        pool.truncate(seq, keep)
        del ledger[seq][keep:]
    elif op == "release" and ledger:
      seq = list(ledger)[rng.integers(len(ledger))]
      pool.release(seq)
      del ledger[seq]
    high_water = max(high_water, pool.used_pages)
    _check_invariants(pool, ledger, high_water)
    for seq, tokens in ledger.items():             # read every sequence back through its table
      table = pool.table([seq], len(pool.pages(seq)))[0]
      got = [contents[table[t // page_size], t % page_size] for t in range(len(tokens))]
      assert got == tokens, seq
  assert refused > 0 and high_water == pool.num_pages - 1    # the pool did fill up
  assert shares > 10 and (page_size == 1 or rolled_into_shared > 0)
  for seq in list(ledger):
    pool.release(seq)
  assert pool.free_pages == num_pages - 1 and pool.used_pages == 0


def test_pages_come_in_the_given_order_and_return_for_reuse():
  pool = PagePool(6, 4, order=[5, 2, 4, 1, 3])
  pool.reserve("a", 9)
  assert pool.pages("a") == (5, 2, 4) and pool.capacity("a") == 12
  pool.reserve("b", 8)
  assert pool.pages("b") == (1, 3) and pool.free_pages == 0 and pool.high_water == 5
  with pytest.raises(PoolExhausted, match="'c' needs 1 more pages but 0 are free"):
    pool.reserve("c", 1)
  assert "c" not in pool
  pool.truncate("a", 4)                  # 2 and 4 go back, to be handed out in that order again
  assert pool.pages("a") == (5,)
  pool.reserve("c", 8)
  assert pool.pages("c") == (2, 4)
  np.testing.assert_array_equal(pool.table(["c", None, "a"], 3), [[2, 4, 0], [0, 0, 0], [5, 0, 0]])
  with pytest.raises(ValueError, match="more than the table's width 1"):
    pool.table(["c"], 1)


def test_a_shared_prefix_is_held_once_and_freed_by_the_last_holder():
  pool = PagePool(8, 4)
  pool.reserve("a", 10)                                  # pages 1, 2, 3
  assert pool.share_prefix("a", "b", 10) == 8            # only full pages are shared
  assert pool.pages("b") == (1, 2) and pool.used_pages == 3
  pool.reserve("b", 10)                                  # b's own third page
  assert pool.pages("b") == (1, 2, 4)
  pool.release("a")
  assert pool.used_pages == 3 and pool.free_pages == 4   # 1 and 2 stay, b holds them
  pool.release("b")
  assert pool.used_pages == 0


@pytest.mark.parametrize("args, message", [
    ((1, 4), "num_pages must be >= 2"), ((4, 0), "page_size must be >= 1"),
    ((4, 2, [1, 2, 2]), "permutation of the pages 1..3")])
def test_bad_pools_are_refused(args, message):
  with pytest.raises(ValueError, match=message):
    PagePool(*args)
