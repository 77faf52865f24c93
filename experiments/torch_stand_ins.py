"""Run the MLRA authors' PyTorch model files on a CPU, from a checkout of their
repository, without copying any of their code.

Their files import flash-attn (a GPU kernel) and `transformers` (for save / load
plumbing). `install()` registers stand-ins: `flash_attn_func` becomes torch's
causal `scaled_dot_product_attention` (the same math), and the transformers
base classes become minimal ones.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types


# our variant name -> the authors' model file (model/<file>.py); MQA is their GQA file
# with one KV head (group_size = n_head)
AUTHORS_FILE = {"mha": "mha", "mqa": "gqa", "gqa": "gqa", "mla": "mla", "gla2": "gla_2", "gla4": "gla_4",
                "mlra2": "mlra_2", "mlra4": "mlra_4", "gta": "gta", "tpa": "tpa", "mfa": "mfa"}


def install():
  """flash_attn_interface and transformers, as far as the authors' models use them."""
  import torch
  import torch.nn.functional as F

  def flash_attn_func(q, k, v, causal=False, softmax_scale=None, **unused):
    # flash-attn takes [batch, seq, heads, dim]; SDPA takes [batch, heads, seq, dim]
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=causal, scale=softmax_scale)
    return y.transpose(1, 2)

  fa = types.ModuleType("flash_attn_interface")
  fa.flash_attn_func = flash_attn_func
  sys.modules["flash_attn_interface"] = fa

  class PretrainedConfig:
    def __init__(self, **kwargs):
      for k, v in kwargs.items():
        setattr(self, k, v)

  class PreTrainedModel(torch.nn.Module):
    def __init__(self, config=None, *args, **kwargs):
      super().__init__()

  tr = types.ModuleType("transformers")
  tr.PreTrainedModel = PreTrainedModel
  tr.PretrainedConfig = PretrainedConfig
  for sub, attr in (("configuration_utils", "PretrainedConfig"), ("modeling_utils", "PreTrainedModel")):
    mod = types.ModuleType(f"transformers.{sub}")
    setattr(mod, attr, getattr(tr, attr))
    setattr(tr, sub, mod)
    sys.modules[f"transformers.{sub}"] = mod
  sys.modules["transformers"] = tr


def load_authors_module(repo: str, file: str):
  """Import `<repo>/model/<file>.py` (e.g. mla, mlra_4, gqa_gated) with the stand-ins."""
  install()
  path = os.path.join(repo, "model", f"{file}.py")
  if not os.path.exists(path):
    raise ValueError(f"{path} not found: --authors_repo must be a checkout of "
                     "github.com/SongtaoLiu0823/MLRA (it has model/<variant>.py)")
  spec = importlib.util.spec_from_file_location(f"mlra_authors_{file}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def require_torch_and_repo(authors_repo: str | None) -> None:
  """The commands that use the authors' code: a one-line error and exit 2 without
  a checkout path or without torch."""
  if not authors_repo:
    print("error: pass --authors_repo=PATH (a checkout of github.com/SongtaoLiu0823/MLRA)", file=sys.stderr)
    sys.exit(2)
  try:
    import torch  # noqa: F401
  except ImportError:
    print("error: torch is not installed; run: .venv/bin/pip install -e '.[torch]'", file=sys.stderr)
    sys.exit(2)
