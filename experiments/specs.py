"""What a run reads (DataSpec) and how its loop runs (LoopSpec): plain dataclasses
whose fields are runner flags (experiments/options.py), kept apart from the
training loop so that defining the flags imports no data or checkpoint library."""
from __future__ import annotations

import dataclasses
import os

from mla_jax.config import check, option
from mla_jax.rules import RULE_PRESETS


@dataclasses.dataclass(frozen=True)
class DataSpec:
  kind: str = option("synthetic_stories", "Dataset.", flag="data", choices=("synthetic_stories", "tinystories"))
  data_dir: str = option("~/.cache/mla_jax", "Where datasets and tokenizers are built and cached.")
  num_train: int = option(100_000, "synthetic_stories: training stories.", flag="num_train_stories")
  num_validation: int = option(2_000, "synthetic_stories: validation stories.", flag="num_valid_stories")
  seed: int = option(0, "synthetic_stories: generator seed.", flag="data_seed")
  tinystories_train: str = option("", "tinystories: TinyStoriesV2 .txt, JSON shards, a folder or a glob.")
  tinystories_valid: str = option("", "tinystories: validation file(s); empty holds out 1% of train.")
  tokenizer: str = option("", "A SentencePiece .model or a Hugging Face tokenizer.json; empty trains a "
                              "SentencePiece model of --tokenizer_vocab_size on the training split.")
  vocab_size: int = option(4096, "Tokens of the SentencePiece model trained when --tokenizer is empty.",
                           flag="tokenizer_vocab_size", legacy="vocab_size")
  tokenizer_docs: int = option(20_000, "Training documents used to fit the tokenizer.")
  allow_change: bool = option(False, "On resume, continue the weights on data or a tokenizer other than the "
                                     "checkpoint records (a fresh data order); refused without it.",
                              flag="allow_data_change")

  @property
  def root(self) -> str:
    return os.path.abspath(os.path.expanduser(self.data_dir))


@dataclasses.dataclass(frozen=True)
class LoopSpec:
  output_dir: str = option("runs/default", "The run directory (checkpoints, metrics, plots), or where "
                                           "reports go.")
  mesh: str = option("", "Device mesh, e.g. data:2,fsdp:1,tensor:4 (empty: every device on the data axis in "
                         "a multi-process run, one device otherwise).")
  rules: str = option("default", "Logical-axis rules preset (mla_jax.rules.RULE_PRESETS).",
                      choices=tuple(RULE_PRESETS))
  log_every: int = option(10, "Steps between tokens/s measurements on the progress bar.")
  eval_every: int = option(200, "Steps between validation passes.")
  eval_batches: int = option(8, "Validation batches per pass (the same ones every time).")
  eval_batch_size: int = option(16, "Validation batch size.")
  ckpt_every: int = option(200, "Steps between checkpoints (one is always written at the end).")
  keep_checkpoints: int = option(3, "Checkpoints kept.")
  async_checkpoints: bool = option(True, "Save checkpoints in the background.")
  prompt: str = option("Once upon a time", "Prompt for generate and for the samples.")
  sample_tokens: int = option(120, "Tokens to generate.", flag="max_new_tokens")
  progress: bool = option(True, "Show a progress bar.")
  distill_from: str = option("", "train: a run directory whose model teaches this one (its tokenizer and "
                                 "vocabulary): the loss mixes in KL(teacher || model), --distill_weight.")

  def __post_init__(self):
    # checked as the flags are read, before any data is built or anything compiles
    for name, flag in (("log_every", "log_every"), ("eval_every", "eval_every"), ("ckpt_every", "ckpt_every"),
                       ("eval_batches", "eval_batches"), ("eval_batch_size", "eval_batch_size"),
                       ("sample_tokens", "max_new_tokens")):
      value = getattr(self, name)
      check(value >= 1, f"--{flag} must be >= 1, got {value}")
    check(self.keep_checkpoints >= 1, f"--keep_checkpoints must be >= 1 (the newest checkpoint is always kept; "
                                      f"it deletes only older ones), got {self.keep_checkpoints}")
    check(not os.path.isfile(os.path.expanduser(self.output_dir)),
          f"--output_dir={self.output_dir} is a file, not a directory: name a directory for the run")
