"""TensorFlow-Datasets builders that write `array_record` (no TensorFlow needed),
read back with random access and fed to grain.

* `synthetic_stories`: the embedded default, generated here (`stories.py`);
  keyed by (train count, validation count, seed, generator version).
* `tinystories`: the real TinyStories files when a user has them: TinyStoriesV2
  text (stories separated by `<|endoftext|>` lines) or the JSON shards (lists
  of objects with a "story" field); a file, a directory of them, or a glob.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from typing import Iterator

# TFDS imports TensorFlow lazily and warns when it is absent; we never need it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow_datasets as tfds  # noqa: E402
from absl import logging as absl_logging  # noqa: E402


def _quiet(make):
  """Build a TFDS builder without its 'Using custom data configuration' warning."""
  level = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    return make()
  finally:
    absl_logging.set_verbosity(level)

_FEATURES = lambda: tfds.features.FeaturesDict({"text": tfds.features.Text()})  # noqa: E731


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Our builders live outside a TFDS package folder: point TFDS at this file
  directly (its package lookup needs `importlib_resources` under editable installs)."""
  code_path = tfds.core.utils.classproperty(classmethod(lambda cls: __import__("etils").epath.Path(__file__)))


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  num_train: int = 100_000
  num_validation: int = 2_000
  seed: int = 0


class SyntheticStories(_Builder):
  """Deterministic synthetic children's stories (see mla_jax/data/stories.py)."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=_FEATURES(),
                                 description="Synthetic children's stories in the spirit of TinyStories.")

  def _split_generators(self, dl_manager):
    c = self.builder_config
    return {"train": self._generate_examples(0, c.num_train),
            "validation": self._generate_examples(c.num_train, c.num_validation)}

  def _generate_examples(self, start: int, count: int):
    from mla_jax.data import stories
    seed = self.builder_config.seed
    for i in range(start, start + count):
      yield i, {"text": stories.story(seed, i)}


def synthetic_builder(data_dir: str, num_train: int, num_validation: int, seed: int) -> SyntheticStories:
  from mla_jax.data import stories
  if num_train < 1 or num_validation < 1:
    raise ValueError(f"synthetic_stories needs at least one story per split, got "
                     f"train={num_train}, validation={num_validation}")
  name = f"n{num_train}_v{num_validation}_s{seed}_g{stories.VERSION}"
  config = SyntheticConfig(name=name, num_train=num_train, num_validation=num_validation, seed=seed)
  return _quiet(lambda: SyntheticStories(data_dir=data_dir, config=config))


# ----------------------------------------------------------------------------- TinyStories


def _expand(path: str) -> list[str]:
  if os.path.isdir(path):
    files = sorted(f for ext in ("*.txt", "*.json") for f in glob.glob(os.path.join(path, ext)))
  elif any(ch in path for ch in "*?["):
    files = sorted(glob.glob(path))
  else:
    files = [path] if os.path.exists(path) else []
  if not files:
    raise ValueError(f"TinyStories path {path!r} matches no .txt or .json file: download "
                     "TinyStoriesV2-GPT4-train.txt (or the JSON shards) and pass its path with "
                     "--tinystories_train=PATH")
  return files


def _check_text(path: str) -> None:
  """A .txt file must be text: binary bytes (NULs, or a run of invalid UTF-8) in its
  first 64 KiB mean it is something else, which would train on noise."""
  with open(path, "rb") as f:
    head = f.read(1 << 16)
  text = head.decode("utf-8", errors="replace")
  invalid = text.count("\ufffd") - head.decode("utf-8", errors="ignore").count("\ufffd")
  if b"\0" in head or invalid > max(4, len(head) // 1000):
    offset = head.index(b"\0") if b"\0" in head else 0
    raise ValueError(f"{path} is not text (binary bytes{f' at offset {offset}' if offset else ''}): pass "
                     "TinyStoriesV2 text (stories separated by <|endoftext|> lines) or the JSON shards")


def read_stories(path: str) -> Iterator[str]:
  """Stories from one TinyStories file: V2 text or a JSON shard."""
  if path.endswith(".json"):
    try:
      with open(path) as f:
        records = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON (line {e.lineno}): re-download the shard") from None
    if not isinstance(records, list):
      raise ValueError(f"{path}: expected a JSON list of stories, got {type(records).__name__}")
    for i, r in enumerate(records):
      text = r.get("story") if isinstance(r, dict) else r if isinstance(r, str) else None
      if not isinstance(text, str):
        raise ValueError(f"{path}: record {i} has no 'story' text")
      if text.strip():
        yield text.strip()
    return
  buf: list[str] = []
  with open(path, encoding="utf-8", errors="replace") as f:
    for line in f:
      if line.strip() == "<|endoftext|>":
        if "".join(buf).strip():
          yield "".join(buf).strip()
        buf = []
      else:
        buf.append(line)
  if "".join(buf).strip():
    yield "".join(buf).strip()


def _fingerprint(files: list[str]) -> str:
  h = hashlib.sha1()
  for f in files:
    st = os.stat(f)
    h.update(f"{os.path.abspath(f)}:{st.st_size}:{st.st_mtime_ns};".encode())
  return h.hexdigest()[:16]


@dataclasses.dataclass(eq=False)
class TinyStoriesConfig(tfds.core.BuilderConfig):
  train_files: tuple = ()
  valid_files: tuple = ()
  holdout_every: int = 100      # no validation files: every 100th story is held out


class TinyStories(_Builder):
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=_FEATURES(),
                                 description="TinyStories (Eldan & Li 2023) from local files.")

  def _split_generators(self, dl_manager):
    c = self.builder_config
    if c.valid_files:
      return {"train": self._generate_examples(c.train_files, None),
              "validation": self._generate_examples(c.valid_files, None)}
    return {"train": self._generate_examples(c.train_files, False),
            "validation": self._generate_examples(c.train_files, True)}

  def _generate_examples(self, files, holdout):
    index = kept = 0
    for path in files:
      for text in read_stories(path):
        keep = holdout is None or ((index % self.builder_config.holdout_every == 0) == holdout)
        if keep:
          kept += 1
          yield index, {"text": text}
        index += 1
    if index == 0:
      raise ValueError(f"no stories found in {', '.join(files)}: the file is empty or not "
                       "TinyStories text (stories separated by <|endoftext|> lines) or JSON")
    if kept == 0:           # one story, held out for validation: nothing left to train on
      raise ValueError(f"{', '.join(files)} holds {index} stor{'y' if index == 1 else 'ies'}, too few to hold "
                       f"every {self.builder_config.holdout_every}th out for validation and train on the rest; "
                       "give more stories, or a validation file with --tinystories_valid")


def tinystories_builder(data_dir: str, train: str, valid: str | None = None) -> TinyStories:
  train_files = _expand(train)
  valid_files = _expand(valid) if valid else []
  for f in train_files + valid_files:
    if not f.endswith(".json"):
      _check_text(f)
  name = f"local_{_fingerprint(train_files + valid_files)}"
  config = TinyStoriesConfig(name=name, train_files=tuple(train_files), valid_files=tuple(valid_files))
  builder = _quiet(lambda: TinyStories(data_dir=data_dir, config=config))
  if not valid_files and not is_prepared(builder):
    # checked before TFDS starts writing: reads only until a second story turns up
    stories = (s for f in train_files for s in read_stories(f))
    count = sum(1 for _ in zip(range(2), stories))
    if count == 0:
      raise ValueError(f"no stories found in {', '.join(train_files)}: the file is empty or not "
                       "TinyStories text (stories separated by <|endoftext|> lines) or JSON")
    if count < 2:
      raise ValueError(f"{train} holds 1 story: too few to hold every "
                       f"{config.holdout_every}th out for validation and train on the rest; give more stories, or "
                       "a validation file with --tinystories_valid")
  return builder


# ----------------------------------------------------------------------------- loading


def is_prepared(builder) -> bool:
  return os.path.exists(os.path.join(builder.data_dir, "dataset_info.json"))


def prepare(builder) -> dict:
  """Build the array_record files once (cached under data_dir) and open them."""
  builder.download_and_prepare(file_format="array_record")
  try:
    sources = builder.as_data_source()
    for split in ("train", "validation"):
      src = sources[split]
      if len(src) == 0:
        raise ValueError(f"split {split!r} is empty")
      src[0], src[len(src) - 1]          # touch both ends: a truncated file fails here
  except ValueError:
    raise
  except Exception as e:  # array_record raises assorted errors on damaged files
    raise ValueError(f"the cached dataset in {builder.data_dir} cannot be read ({type(e).__name__}: "
                     f"{e}); delete that folder and rerun to rebuild it") from None
  return {"train": sources["train"], "validation": sources["validation"]}


def text_of(record) -> str:
  text = record["text"]
  return text.decode("utf-8") if isinstance(text, bytes) else str(text)
