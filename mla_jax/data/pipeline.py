"""The grain input pipeline: documents -> tokens -> packed fixed-length
sequences -> batches, shuffled by seed, sharded by process, prefetched.

The iterator's state (`get_state` / `set_state`) goes into every checkpoint, so
a resumed run sees exactly the batches an uninterrupted one would have.
"""
from __future__ import annotations

import dataclasses

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset

from mla_jax.data.builders import text_of


@dataclasses.dataclass(frozen=True)
class _Tokenize:
  """Document -> token ids with the end-of-text separator appended."""
  tokenizer: object

  def __call__(self, record):
    ids = self.tokenizer.encode(text_of(record))
    ids.append(self.tokenizer.eos_id)
    return {"tokens": np.asarray(ids, np.int32)}


def packed_batches(source, tokenizer, *, seq_len: int, batch_size: int, seed: int = 0,
                   shuffle: bool = True, repeat: bool = True, process_index: int = 0,
                   process_count: int = 1, num_threads: int = 2, prefetch: int = 64) -> grain.IterDataset:
  """Batches of {"tokens": int32 [batch_size, seq_len + 1]}: inputs are [:, :-1],
  targets [:, 1:]. `batch_size` is this process's share of the global batch."""
  if len(source) < process_count:
    raise ValueError(f"{len(source)} documents cannot be shared by {process_count} processes")
  ds = grain.MapDataset.source(source)[process_index::process_count]   # this process's documents
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat()                     # a fresh shuffle every epoch
  ds = ds.map(_Tokenize(tokenizer))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
  # Concatenate documents and cut them into windows of seq_len + 1 tokens.
  it = ConcatThenSplitIterDataset(it, length_struct={"tokens": seq_len + 1})
  return it.batch(batch_size, drop_remainder=True)


def fixed_batches(source, tokenizer, *, seq_len: int, batch_size: int, num_batches: int,
                  process_index: int = 0, process_count: int = 1) -> list[np.ndarray]:
  """The first `num_batches` packed batches of a split, unshuffled: the same
  evaluation set every time (fewer if the split is shorter)."""
  it = iter(packed_batches(source, tokenizer, seq_len=seq_len, batch_size=batch_size, shuffle=False,
                           repeat=False, process_index=process_index, process_count=process_count))
  out = []
  for batch in it:
    out.append(batch["tokens"])
    if len(out) == num_batches:
      break
  if not out:
    raise ValueError(f"the validation split is too small for one batch of {batch_size} x "
                     f"{seq_len + 1} tokens; lower --eval_batch_size or --seq_len")
  return out
