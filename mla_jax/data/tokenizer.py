"""Tokenizers: a SentencePiece model trained here on the training split (cached),
or a user's file: a SentencePiece `.model` or a Hugging Face `tokenizer.json`
(GPT-2's, for example, which converted MLRA checkpoints need).

Everything downstream sees one small interface: `encode`, `decode`,
`vocab_size`, `eos_id` (the separator packed between documents), and for
generation `stop_ids` (every end token: Llama-3 has several) and `bos_id` (put
before a prompt, or None), which an imported checkpoint's run records
(`use_special_tokens`).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Iterable, Protocol, Sequence


class Tokenizer(Protocol):
  vocab_size: int
  eos_id: int
  name: str
  stop_ids: tuple[int, ...]
  bos_id: int | None

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


class SentencePieceTokenizer:
  """pad 0, unk 1, bos 2, eos 3 for models trained here."""

  def __init__(self, path: str):
    import sentencepiece as spm
    self.path = path
    self._sp = spm.SentencePieceProcessor(model_file=path)
    self.vocab_size = int(self._sp.get_piece_size())
    eos = int(self._sp.eos_id())
    self.eos_id = eos if eos >= 0 else int(self._sp.piece_to_id("</s>"))
    self.name = f"sentencepiece:{os.path.basename(path)}"
    self.stop_ids, self.bos_id = (self.eos_id,), None

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text))

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])


class HuggingFaceTokenizer:
  """A `tokenizer.json` read with the `tokenizers` library (no hub access)."""

  EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")

  def __init__(self, path: str):
    from tokenizers import Tokenizer as HFTokenizer
    self.path = path
    self._tok = HFTokenizer.from_file(path)
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    # the end token tokenizer_config.json beside it names (DeepSeek's <｜end▁of▁sentence｜>), else a usual one
    candidates = tuple(t for t in (_configured_eos(path),) if t) + self.EOS_CANDIDATES
    eos = next((self._tok.token_to_id(t) for t in candidates if self._tok.token_to_id(t) is not None), None)
    if eos is None:
      raise ValueError(f"{path}: no end-of-text token ({', '.join(candidates)}) in the "
                       "vocabulary; documents need one as a separator")
    self.eos_id = int(eos)
    self.name = f"huggingface:{os.path.basename(path)}"
    self.stop_ids, self.bos_id = (self.eos_id,), None

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids])


def _configured_eos(path: str) -> str | None:
  config = os.path.join(os.path.dirname(path), "tokenizer_config.json")
  try:
    with open(config) as f:
      eos = json.load(f).get("eos_token")
  except (OSError, ValueError, AttributeError):
    return None
  return eos.get("content") if isinstance(eos, dict) else eos if isinstance(eos, str) else None


def use_special_tokens(tokenizer: Tokenizer, meta: dict) -> Tokenizer:
  """The stop and begin tokens a run recorded (an imported Hugging Face checkpoint's
  generation_config.json and tokenizer_config.json), where it recorded them."""
  if meta.get("eos_ids"):
    tokenizer.stop_ids = tuple(int(i) for i in meta["eos_ids"])
  if meta.get("add_bos") and meta.get("bos_id") is not None:
    tokenizer.bos_id = int(meta["bos_id"])
  return tokenizer


def prompt_ids(tokenizer: Tokenizer, text: str) -> list[int]:
  """A prompt's ids, after the begin token where the model was trained with one."""
  ids = tokenizer.encode(text)
  return ([tokenizer.bos_id] if tokenizer.bos_id is not None and ids else []) + ids


def load(path: str) -> Tokenizer:
  """A SentencePiece model (`*.model`) or a Hugging Face `tokenizer.json`."""
  if not os.path.exists(path):
    raise ValueError(f"tokenizer file {path!r} does not exist; pass a SentencePiece .model or a "
                     "Hugging Face tokenizer.json, or leave --tokenizer empty to train one")
  path = resolve(path)
  if path.endswith(".json"):
    try:
      with open(path) as f:
        json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"tokenizer file {path!r} is not valid JSON ({e}); pass a Hugging Face "
                       "tokenizer.json or a SentencePiece .model") from None
    try:
      return HuggingFaceTokenizer(path)
    except ValueError:
      raise
    except Exception as e:  # noqa: BLE001 - the tokenizers package raises a bare Exception for a bad file
      raise ValueError(f"tokenizer file {path!r} is JSON but not a Hugging Face tokenizer "
                       f"({str(e).splitlines()[0][:120]}); pass a tokenizer.json or a SentencePiece .model") from None
  try:
    return SentencePieceTokenizer(path)
  except (RuntimeError, OSError) as e:
    raise ValueError(f"tokenizer file {path!r} is not a SentencePiece model ({e}); pass a "
                     "SentencePiece .model or a Hugging Face tokenizer.json") from None


def resolve(path: str) -> str:
  """The tokenizer file `path` names: itself, or in a model's folder its
  tokenizer.json or its one .model."""
  if not os.path.isdir(path):
    return path
  models = sorted(f for f in os.listdir(path) if f.endswith(".model"))
  if os.path.isfile(os.path.join(path, "tokenizer.json")):
    return os.path.join(path, "tokenizer.json")
  if len(models) == 1:
    return os.path.join(path, models[0])
  raise ValueError(f"tokenizer folder {path!r} holds no tokenizer.json and "
                   f"{'no' if not models else len(models)} .model files ({', '.join(models) or 'none'}); "
                   "pass the tokenizer file itself")


def fingerprint(path: str) -> str:
  """sha256 of the tokenizer file: two tokenizers give the same token ids when these agree."""
  h = hashlib.sha256()
  with open(resolve(path), "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def train_sentencepiece(texts: Iterable[str], path: str, vocab_size: int, *,
                        model_type: str = "bpe") -> SentencePieceTokenizer:
  """Train a SentencePiece model on `texts` and write it to `path` (atomically)."""
  import sentencepiece as spm
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(path))) as tmp:
    prefix = os.path.join(tmp, "spm")
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=vocab_size,
          model_type=model_type, character_coverage=1.0, byte_fallback=True,
          pad_id=0, unk_id=1, bos_id=2, eos_id=3, num_threads=2,
          # keep newlines and spacing: stories have paragraphs
          normalization_rule_name="identity", remove_extra_whitespaces=False,
          split_digits=True, max_sentence_length=1 << 16, minloglevel=2)
    except RuntimeError as e:
      msg = str(e).split("] ")[-1]
      raise ValueError(f"cannot train a {vocab_size}-token SentencePiece model on this text: {msg} "
                       "Lower --vocab_size (and the model's) or give more training text") from None
    os.replace(prefix + ".model", path)
  return SentencePieceTokenizer(path)


def sentencepiece_path(cache_dir: str, dataset_key: str, vocab_size: int) -> str:
  digest = hashlib.sha1(dataset_key.encode()).hexdigest()[:12]
  return os.path.join(cache_dir, "tokenizers", f"spm_{digest}_{vocab_size}.model")


def cached_sentencepiece(texts_fn, cache_dir: str, dataset_key: str, vocab_size: int) -> SentencePieceTokenizer:
  """Train once per (dataset, vocab size) and reuse: `texts_fn()` yields the training text."""
  path = sentencepiece_path(cache_dir, dataset_key, vocab_size)
  if os.path.exists(path):
    return SentencePieceTokenizer(path)
  return train_sentencepiece(texts_fn(), path, vocab_size)
