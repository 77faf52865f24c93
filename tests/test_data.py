"""Datasets (TinyStories files, the cache), tokenizers and the grain pipeline."""
import json
import os

import numpy as np
import pytest

from mla_jax.data import builders, pipeline
from mla_jax.data import tokenizer as tok

STORIES = [f"Story {i}. Once upon a time a {w} met a {v}.\nThey played all day."
           for i, (w, v) in enumerate(zip(["cat", "dog", "bird", "fox"] * 30, ["frog", "bee", "owl"] * 40))]


def write_v2(path, stories):
  with open(path, "w") as f:
    for s in stories:
      f.write(s + "\n<|endoftext|>\n")


def texts(source):
  return [builders.text_of(source[i]) for i in range(len(source))]


def test_tinystories_v2_text(tmp_path):
  write_v2(tmp_path / "train.txt", STORIES)
  src = builders.prepare(builders.tinystories_builder(str(tmp_path / "cache"), str(tmp_path / "train.txt")))
  train, valid = texts(src["train"]), texts(src["validation"])
  # every 100th story is held out; nothing lost, nothing duplicated
  assert sorted(train + valid) == sorted(STORIES)
  assert sorted(valid) == sorted(STORIES[::100])


def test_tinystories_json_shards_and_separate_validation(tmp_path):
  os.makedirs(tmp_path / "shards")
  for k in range(2):
    with open(tmp_path / "shards" / f"data0{k}.json", "w") as f:
      json.dump([{"story": s, "summary": "x"} for s in STORIES[k * 50:(k + 1) * 50]], f)
  write_v2(tmp_path / "valid.txt", STORIES[100:110])
  src = builders.prepare(builders.tinystories_builder(
      str(tmp_path / "cache"), str(tmp_path / "shards"), str(tmp_path / "valid.txt")))
  assert sorted(texts(src["train"])) == sorted(STORIES[:100])
  assert sorted(texts(src["validation"])) == sorted(STORIES[100:110])


@pytest.mark.parametrize("setup,msg", [
    (lambda p: None, "matches no .txt or .json file"),
    (lambda p: open(p / "train.txt", "w").close(), "no stories found"),
    (lambda p: (p / "train.json").write_text('[{"story": "a"'), r"not valid JSON \(line 1\)"),
    (lambda p: (p / "train.json").write_text('[{"text": "a"}]'), "record 0 has no 'story' text"),
])
def test_bad_tinystories_files(tmp_path, setup, msg):
  setup(tmp_path)
  name = "train.json" if (tmp_path / "train.json").exists() else "train.txt"
  with pytest.raises(ValueError, match=msg):
    builders.prepare(builders.tinystories_builder(str(tmp_path / "cache"), str(tmp_path / name)))


def test_corrupt_cached_dataset_is_reported(tmp_path):
  write_v2(tmp_path / "train.txt", STORIES)
  builder = builders.tinystories_builder(str(tmp_path / "cache"), str(tmp_path / "train.txt"))
  builders.prepare(builder)
  for name in os.listdir(builder.data_dir):
    if "train.array_record" in name:
      path = os.path.join(builder.data_dir, name)
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)
  again = builders.tinystories_builder(str(tmp_path / "cache"), str(tmp_path / "train.txt"))
  with pytest.raises(ValueError, match="cannot be read.*delete that folder and rerun"):
    builders.prepare(again)


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "t.model"
  return tok.train_sentencepiece(iter(STORIES * 3), str(path), 300)


def test_sentencepiece_round_trip_and_reload(spm):
  text = "Once upon a time a cat met an owl.\nThey played."
  ids = spm.encode(text)
  assert spm.decode(ids) == text
  again = tok.load(spm.path)
  assert again.encode(text) == ids and again.vocab_size == 300 and again.eos_id == 3


def test_huggingface_tokenizer_json(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
  hf = Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  hf.train_from_iterator(STORIES, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  hf.save(str(tmp_path / "tokenizer.json"))
  t = tok.load(str(tmp_path / "tokenizer.json"))
  assert t.eos_id == hf.token_to_id("<|endoftext|>")
  assert t.decode(t.encode("a cat met a frog")) == "a cat met a frog"


def test_tokenizer_errors(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    tok.load(str(tmp_path / "nope.model"))
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    tok.load(str(tmp_path / "bad.json"))
  (tmp_path / "bad.model").write_bytes(b"garbage")
  with pytest.raises(ValueError, match="not a SentencePiece model"):
    tok.load(str(tmp_path / "bad.model"))
  with pytest.raises(ValueError, match="Lower --vocab_size"):
    tok.train_sentencepiece(iter(["a b c"] * 10), str(tmp_path / "x.model"), 5000)


# ----------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  write_v2(root / "train.txt", STORIES)
  return builders.prepare(builders.tinystories_builder(str(root / "cache"), str(root / "train.txt")))


def _take(it, n):
  return [next(it)["tokens"] for _ in range(n)]


def test_each_row_packs_its_own_documents(corpus, spm):
  seq, B = 16, 4
  batches = _take(pipeline.PackedBatches(corpus["train"], spm, seq_len=seq, batch_size=B,
                                         shuffle=False, repeat=False), 3)
  assert all(b.shape == (B, seq + 1) and b.dtype == np.int32 for b in batches)
  docs = texts(corpus["train"])
  for r in range(B):
    stream = np.concatenate([b[r] for b in batches])
    expected = np.concatenate([spm.encode(t) + [spm.eos_id] for t in docs[r::B]])
    np.testing.assert_array_equal(stream, expected[:len(stream)])


def test_a_begin_token_leads_each_document(corpus, spm):
  """An imported model's begin token (tokenizer.bos_id, from its run's meta) starts every document."""
  import copy
  with_bos = tok.use_special_tokens(copy.copy(spm), {"add_bos": True, "bos_id": 2})
  seq, B = 16, 2
  batches = _take(pipeline.PackedBatches(corpus["train"], with_bos, seq_len=seq, batch_size=B,
                                         shuffle=False, repeat=False), 2)
  docs = texts(corpus["train"])
  for r in range(B):
    stream = np.concatenate([b[r] for b in batches])
    expected = np.concatenate([[2] + spm.encode(t) + [spm.eos_id] for t in docs[r::B]])
    np.testing.assert_array_equal(stream, expected[:len(stream)])


def test_shuffling_is_seeded(corpus, spm):
  make = lambda seed: _take(pipeline.PackedBatches(corpus["train"], spm, seq_len=16, batch_size=4,  # noqa: E731
                                                   seed=seed), 4)
  a, b, c = make(1), make(1), make(2)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_processes_feed_their_rows_of_the_same_global_batch(corpus, spm):
  whole = _take(pipeline.PackedBatches(corpus["train"], spm, seq_len=16, batch_size=4, seed=5), 5)
  parts = [_take(pipeline.PackedBatches(corpus["train"], spm, seq_len=16, batch_size=4, seed=5,
                                        rows=pipeline.process_rows(4, p, 2)), 5) for p in range(2)]
  for step in range(5):
    np.testing.assert_array_equal(np.concatenate([parts[0][step], parts[1][step]]), whole[step])
  with pytest.raises(ValueError, match="does not split over 3 processes"):
    pipeline.process_rows(4, 0, 3)


def test_iterator_state_resumes_exactly(corpus, spm):
  make = lambda: pipeline.PackedBatches(corpus["train"], spm, seq_len=16, batch_size=4, seed=3)  # noqa: E731
  it = make()
  _take(it, 7)
  state = json.loads(json.dumps(it.get_state()))      # what a checkpoint stores
  expected = _take(it, 5)
  again = make()
  again.set_state(state)
  got = _take(again, 5)
  assert all(np.array_equal(x, y) for x, y in zip(got, expected))
  with pytest.raises(ValueError, match="same global batch size"):
    pipeline.PackedBatches(corpus["train"], spm, seq_len=16, batch_size=2).set_state(state)


def test_fixed_batches_are_fixed(corpus, spm):
  a = pipeline.fixed_batches(corpus["validation"], spm, seq_len=8, batch_size=1, num_batches=3)
  b = pipeline.fixed_batches(corpus["validation"], spm, seq_len=8, batch_size=1, num_batches=3)
  assert len(a) == 3 and all(np.array_equal(x, y) for x, y in zip(a, b))
  with pytest.raises(ValueError, match="too small for one batch"):
    pipeline.fixed_batches(corpus["validation"], spm, seq_len=100000, batch_size=4, num_batches=1)


def test_a_tokenizer_folder_is_read_through_its_file(spm, tmp_path):
  """--tokenizer=<a model's folder>: its tokenizer.json, or its one .model; a
  folder with neither (or two .model files) is one ValueError, not a C++ abort."""
  import shutil
  folder = tmp_path / "one_model"
  folder.mkdir()
  shutil.copy(spm.path, folder / "sp.model")
  loaded = tok.load(str(folder))
  assert loaded.path == str(folder / "sp.model") and loaded.encode("a cat") == spm.encode("a cat")
  shutil.copy(spm.path, folder / "other.model")
  with pytest.raises(ValueError, match=r"holds no tokenizer.json and 2 .model files \(other.model, sp.model\)"):
    tok.load(str(folder))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="holds no tokenizer.json and no .model files"):
    tok.load(str(tmp_path / "empty"))
  (tmp_path / "json_not_tokenizer.json").write_text('{"hello": "world"}')
  with pytest.raises(ValueError, match="is JSON but not a Hugging Face tokenizer"):
    tok.load(str(tmp_path / "json_not_tokenizer.json"))
