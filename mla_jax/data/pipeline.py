"""The grain input pipeline: documents -> tokens -> packed fixed-length windows
-> batches, shuffled by seed, sharded by process, prefetched.

Each row of the global batch is its own document stream: row r of every batch
packs documents r, r + B, r + 2B, ... of one seeded shuffle (B = global batch
size), so
* a process reads and tokenises only the documents of the rows it owns;
* the global batch is the same whatever the number of processes (a run can
  resume on another topology, and 2 processes x 2 devices train exactly like
  1 process x 4 devices);
* the iterator state (each row's grain state) goes into every checkpoint, so a
  resumed run sees exactly the batches an uninterrupted one would have.
"""
from __future__ import annotations

import dataclasses

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset

from mla_jax.data.builders import text_of


@dataclasses.dataclass(frozen=True)
class _Tokenize:
  """Document -> token ids with the end-of-text separator appended, after the
  begin token where the model was trained with one (an imported checkpoint's)."""
  tokenizer: object

  def __call__(self, record):
    bos = getattr(self.tokenizer, "bos_id", None)
    ids = ([bos] if bos is not None else []) + self.tokenizer.encode(text_of(record))
    ids.append(self.tokenizer.eos_id)
    return {"tokens": np.asarray(ids, np.int32)}


def process_rows(batch_size: int, process_index: int, process_count: int) -> range:
  """The contiguous rows of the global batch that one process feeds."""
  if batch_size % process_count:
    raise ValueError(f"a global batch of {batch_size} does not split over {process_count} "
                     "processes; use a multiple")
  per = batch_size // process_count
  return range(process_index * per, (process_index + 1) * per)


class PackedBatches:
  """Iterator of {"tokens": int32 [len(rows), seq_len + 1]} (inputs [:, :-1],
  targets [:, 1:]) for the `rows` of a global batch of `batch_size`."""

  def __init__(self, source, tokenizer, *, seq_len: int, batch_size: int, rows=None, seed: int = 0,
               shuffle: bool = True, repeat: bool = True, prefetch: int = 4):
    if len(source) == 0:
      raise ValueError("the dataset split is empty")
    self.rows = range(batch_size) if rows is None else rows
    ds = grain.MapDataset.source(source)
    if shuffle:
      ds = ds.shuffle(seed=seed)
    if repeat:
      ds = ds.repeat()                   # a fresh shuffle every epoch
    self._streams = []
    for r in self.rows:
      row = ds[r::batch_size].map(_Tokenize(tokenizer))
      it = row.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
      # Concatenate the row's documents and cut them into windows of seq_len + 1.
      self._streams.append(iter(ConcatThenSplitIterDataset(it, length_struct={"tokens": seq_len + 1})))

  def __iter__(self):
    return self

  def __next__(self):
    return {"tokens": np.stack([next(s)["tokens"] for s in self._streams])}

  def get_state(self) -> dict:
    return {"rows": [s.get_state() for s in self._streams]}

  def set_state(self, state: dict) -> None:
    if len(state["rows"]) != len(self._streams):
      raise ValueError(f"the checkpoint's data state has {len(state['rows'])} rows, this process "
                       f"reads {len(self._streams)}: resume with the same global batch size")
    for s, st in zip(self._streams, state["rows"]):
      s.set_state(st)


def fixed_batches(source, tokenizer, *, seq_len: int, batch_size: int, num_batches: int,
                  rows=None) -> list[np.ndarray]:
  """The first `num_batches` batches of a split, unshuffled: the same evaluation
  set every time and on every topology (fewer if the split runs out)."""
  it = PackedBatches(source, tokenizer, seq_len=seq_len, batch_size=batch_size, rows=rows,
                     shuffle=False, repeat=False)
  out = []
  for batch in it:
    out.append(batch["tokens"])
    if len(out) == num_batches:
      break
  if not out:
    raise ValueError(f"the validation split is too small for one batch of {batch_size} x "
                     f"{seq_len + 1} tokens; lower --eval_batch_size or --seq_len")
  return out
