"""Checkpoint folders read one file at a time, never all at once.

A checkpoint is one file (`model.safetensors`, `pytorch_model.bin`, ...) or
shards listed by an index (`model.safetensors.index.json`,
`pytorch_model.bin.index.json`: {"weight_map": {tensor name: shard file}}),
as `save_pretrained` writes them. Names, shapes and dtypes come from the
safetensors headers (or a memory-mapped weights-only `torch.load`) before any
tensor is read; `tensors(file)` then yields one shard's tensors in their
stored dtype (bfloat16 as `ml_dtypes.bfloat16`), each read as it is asked for.

Loading never runs arbitrary code: safetensors are parsed here (an 8-byte
header length, a JSON header, raw little-endian data), and torch pickles are
read with `torch.load(weights_only=True)` (torch is the optional `[torch]`
extra); a pickle holding anything but tensors is refused.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterator

import ml_dtypes
import numpy as np

SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                      "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                      "BOOL": np.bool_}
NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}   # our dtype names
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class CheckpointFileError(ValueError):
  pass


def _safetensors_header(path: str) -> tuple[dict, int]:
  """(name -> {dtype, shape, data_offsets}, where the data starts)."""
  try:
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) != 8:
        raise ValueError("shorter than a header")
      (n,) = struct.unpack("<Q", head)
      if n > 100_000_000:
        raise ValueError(f"header length {n} is not plausible")
      header = json.loads(f.read(n))
  except (OSError, ValueError, UnicodeDecodeError) as e:
    raise CheckpointFileError(f"{path} is not a readable safetensors file ({e}); re-download or re-save it") from None
  header.pop("__metadata__", None)
  size = os.path.getsize(path)
  for name, entry in header.items():
    begin, end = entry["data_offsets"]
    if entry["dtype"] not in SAFETENSORS_DTYPES:
      raise CheckpointFileError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, which is not read here "
                                f"(read: {', '.join(SAFETENSORS_DTYPES)})")
    if 8 + n + end > size:
      raise CheckpointFileError(f"{path} is truncated (tensor {name!r} ends past the file); re-download it")
  return header, 8 + n


def _torch_load(path: str):
  with open(path, "rb") as f:
    head = f.read(2)
  if head != b"PK" and head[:1] != b"\x80":     # torch.save writes a zip archive (a pickle before torch 1.6)
    raise CheckpointFileError(f"{path} is not a PyTorch checkpoint (neither the zip archive nor the pickle "
                              "torch.save writes); pass a .bin/.pt saved by torch.save or a .safetensors file")
  try:
    import torch
  except ImportError:
    raise CheckpointFileError(f"{path} is a PyTorch pickle: install the optional extra "
                              "(.venv/bin/pip install -e '.[torch]') or convert it to safetensors") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=head == b"PK")
  except Exception as e:  # noqa: BLE001 - torch raises many kinds for a hostile or damaged pickle
    raise CheckpointFileError(f"refused to load {path}: it holds more than tensors, or is damaged, and only "
                              f"weights-only checkpoints are read ({type(e).__name__})") from None
  if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
    state = state["model"]
  if not isinstance(state, dict):
    raise CheckpointFileError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
  return {k: v for k, v in state.items() if hasattr(v, "detach")}


def _torch_numpy(t) -> np.ndarray:
  import torch
  t = t.detach().contiguous()
  if t.dtype == torch.bfloat16:                 # numpy has no bfloat16: reinterpret the bits
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


class TensorFiles:
  """The tensors of one checkpoint file or of an index's shards."""

  def __init__(self, path: str):
    self.path = path
    if os.path.isdir(path):
      index = next((os.path.join(path, n) for n in INDEX_FILES if os.path.exists(os.path.join(path, n))), None)
      if index:
        self.files = self._from_index(index)
      else:
        single = next((os.path.join(path, n) for n in SINGLE_FILES if os.path.exists(os.path.join(path, n))), None)
        if single is None:
          raise CheckpointFileError(f"{path} holds no model.safetensors, pytorch_model.bin or an index of "
                                    f"shards ({', '.join(INDEX_FILES)})")
        self.files = {single: None}
    elif os.path.exists(path):
      self.files = {path: None}
    else:
      raise CheckpointFileError(f"checkpoint {path!r} does not exist")
    self.entries: dict[str, tuple[str, tuple[int, ...], np.dtype]] = {}     # name -> (file, shape, dtype)
    for file in self.files:
      for name, (shape, dtype) in self._shapes(file).items():
        if name in self.entries:
          raise CheckpointFileError(f"tensor {name!r} is in both {os.path.basename(self.entries[name][0])} and "
                                    f"{os.path.basename(file)}; the shards overlap")
        self.entries[name] = (file, shape, dtype)
    for file, names in self.files.items():
      stray = sorted(set(names or ()) - {n for n, e in self.entries.items() if e[0] == file})
      if stray:
        raise CheckpointFileError(f"the index puts {stray[0]!r} in {os.path.basename(file)}, which does not hold "
                                  "it; the index and its shards disagree: re-download them together")

  @staticmethod
  def _from_index(index: str) -> dict[str, list[str]]:
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      assert isinstance(weight_map, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
      raise CheckpointFileError(f"{index} is not a shard index (a JSON object with a weight_map; {e!r})") from None
    files: dict[str, list[str]] = {}
    for name, file in weight_map.items():
      files.setdefault(os.path.join(os.path.dirname(index), file), []).append(name)
    missing = sorted(f for f in files if not os.path.exists(f))
    if missing:
      raise CheckpointFileError(f"shard {os.path.basename(missing[0])} listed in {os.path.basename(index)} is "
                                f"missing ({len(missing)} of {len(files)} missing); download every shard")
    return files

  def _shapes(self, file: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    if file.endswith(".safetensors"):
      header, _ = _safetensors_header(file)
      return {k: (tuple(v["shape"]), np.dtype(SAFETENSORS_DTYPES[v["dtype"]])) for k, v in header.items()}
    return {k: (tuple(v.shape), _torch_numpy(v.flatten()[:0]).dtype) for k, v in _torch_load(file).items()}

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {name: shape for name, (_, shape, _) in self.entries.items()}

  def nbytes(self, file: str) -> int:
    return sum(int(np.prod(s)) * d.itemsize for f, s, d in self.entries.values() if f == file)

  def tensors(self, file: str) -> Iterator[tuple[str, np.ndarray]]:
    """One file's tensors, each read from disk as it is yielded: a plain read, not
    a memory map, so the pages of tensors already consumed are not resident."""
    if file.endswith(".safetensors"):
      header, start = _safetensors_header(file)
      with open(file, "rb") as f:
        for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
          begin, end = entry["data_offsets"]
          dtype = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]]).newbyteorder("<")
          f.seek(start + begin)
          data = np.fromfile(f, dtype=dtype, count=(end - begin) // dtype.itemsize)
          yield name, data.reshape(entry["shape"])
    else:
      for name, t in _torch_load(file).items():
        yield name, _torch_numpy(t)

  def read_all(self) -> dict[str, np.ndarray]:
    """Every tensor, copied into memory (small checkpoints)."""
    return {name: np.array(a) for file in self.files for name, a in self.tensors(file)}
