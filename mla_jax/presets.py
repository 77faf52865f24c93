"""Named model configs: every registered variant at the runner's default size,
the MLRA paper's models and the small-model study's.

    python -m mla_jax.presets            # parameter counts and cache sizes of every preset

MLRA paper (seed 002): Llama-3 style, 24 layers, d = 3072, 24 heads, d_h = 128,
d_r = 64, vocab 50304, context 2048. The variants are parameter-matched through
the SwiGLU width (the `mlp_dim` below, from the paper's table).

Small-model study (seed 000, "Latent Multi-Head Attention for Small Language
Models"): the paper does not give layers, width, tokenizer or heads. Our
reading: GPT-2 style, d = 512, 8 heads of 64, 8 layers, context 512, a vocab
of 8192 (our own tokenizer), which comes to about 30M parameters. MLA uses no
query compression, latent rank r = d_c, and no MLRA-style variance scales;
"MLA+RoPE" adds a decoupled rope key of width 32 on top of the absolute
position embeddings, "MLA" has none (d_r = 0).
"""
from __future__ import annotations

from typing import Callable

from mla_jax import registry
from mla_jax.config import ModelConfig
from mla_jax.model import count_params
from mla_jax.registry import attention_config

# ------------------------------------------------------------------ every variant, small


def small(variant: str, **overrides) -> ModelConfig:
  """`variant` with its config's defaults on the runner's default model
  (Llama flavour, d 128, 2 layers): one preset per registered variant."""
  return ModelConfig(attention=attention_config(variant), **overrides)


# ------------------------------------------------------------------ MLRA paper

PAPER = dict(flavour="llama", vocab_size=50304, d_model=3072, num_layers=24, max_seq_len=2048)
_LATENT = dict(qk_nope_head_dim=128, qk_rope_head_dim=64, kv_lora_rank=512)

# variant -> (attention kwargs, SwiGLU width, gated SwiGLU width or None)
PAPER_VARIANTS: dict[str, tuple[dict, int, int | None]] = {
    "mha": (dict(head_dim=128), 8192, None),
    "mqa": (dict(head_dim=128), 10152, None),
    "gqa": (dict(head_dim=128, num_kv_heads=6), 9728, 8704),
    "mla": (dict(q_lora_rank=1536, **_LATENT), 9448, 8424),
    "gla2": (dict(q_lora_rank=1024, **_LATENT), 10048, 9024),
    "gla4": (dict(q_lora_rank=1024, **_LATENT), 10136, None),
    "mlra2": (dict(q_lora_rank=1024, **_LATENT), 10048, 9024),
    "mlra4": (dict(q_lora_rank=1024, **_LATENT), 9880, 8856),
    "gta": (dict(head_dim=128, num_kv_heads=6), 9960, None),
    "tpa": (dict(head_dim=128, q_rank=6, k_rank=2, v_rank=2), 10760, None),
    "mfa": (dict(head_dim=256, q_lora_rank=2048), 8024, None),
}


def mlra_paper(variant: str, gated: bool = False, **overrides) -> ModelConfig:
  """The MLRA paper's ~2.87B-parameter model with attention `variant`."""
  if variant not in PAPER_VARIANTS:
    raise ValueError(f"the MLRA paper has no variant {variant!r}; choose one of "
                     f"{', '.join(PAPER_VARIANTS)}")
  attn_kwargs, mlp, gated_mlp = PAPER_VARIANTS[variant]
  if gated:
    if gated_mlp is None:
      raise ValueError(f"the MLRA paper has no gated {variant}; gated variants: "
                       f"{', '.join(v for v, e in PAPER_VARIANTS.items() if e[2])}")
    attn_kwargs, mlp = dict(attn_kwargs, gated=True), gated_mlp
  attention = attention_config(variant, num_heads=24, **attn_kwargs)
  return ModelConfig(**{**PAPER, "mlp_dim": mlp, "attention": attention, **overrides})


# ------------------------------------------------------------------ small-model study

STUDY = dict(flavour="gpt2", vocab_size=8192, d_model=512, num_layers=8, mlp_dim=2048, max_seq_len=512)
STUDY_RANKS = {"d": 1, "d/2": 2, "d/4": 4, "d/8": 8}


def small_study(variant: str, rank: str = "d/2", **overrides) -> ModelConfig:
  """variant: 'mha', 'mla' (no RoPE) or 'mla_rope'; rank: latent rank r = d_c as a
  fraction of d ('d', 'd/2', 'd/4', 'd/8'; ignored for mha)."""
  base = {**STUDY, **overrides}
  heads = 8
  head_dim = base["d_model"] // heads
  if variant == "mha":
    attention = attention_config("mha", num_heads=heads, head_dim=head_dim, rope=False)
  elif variant in ("mla", "mla_rope"):
    if rank not in STUDY_RANKS:
      raise ValueError(f"unknown rank {rank!r}; choose one of {', '.join(STUDY_RANKS)}")
    attention = attention_config(
        "mla", num_heads=heads, q_lora_rank=0, kv_lora_rank=base["d_model"] // STUDY_RANKS[rank],
        qk_nope_head_dim=head_dim, qk_rope_head_dim=head_dim // 2 if variant == "mla_rope" else 0,
        scales=False)
  else:
    raise ValueError(f"the small-model study has variants mha, mla, mla_rope; not {variant!r}")
  return ModelConfig(attention=attention, **base)


# ------------------------------------------------------------------ registry


def presets() -> dict[str, Callable[[], ModelConfig]]:
  out: dict[str, Callable[[], ModelConfig]] = {}
  for v in registry.variants():
    out[f"small_{v}"] = lambda v=v: small(v)
  for v, (_, _, gated_mlp) in PAPER_VARIANTS.items():
    out[f"paper_{v}"] = lambda v=v: mlra_paper(v)
    if gated_mlp:
      out[f"paper_{v}_gated"] = lambda v=v: mlra_paper(v, gated=True)
  out["study_mha"] = lambda: small_study("mha")
  for variant in ("mla", "mla_rope"):
    for rank, div in STUDY_RANKS.items():
      out[f"study_{variant}_r{'d' if div == 1 else f'd{div}'}"] = (
          lambda variant=variant, rank=rank: small_study(variant, rank))
  return out


def get(name: str) -> ModelConfig:
  table = presets()
  if name not in table:
    raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(table)}")
  return table[name]()


GROUPS = {"small_": "every registered variant at the runner's defaults (Llama, 2 layers, d 128)",
          "paper_": "MLRA paper (24 layers, d 3072)", "study_": "small-model study (GPT-2, d 512)"}


def listing(groups=tuple(GROUPS)) -> str:
  """Parameters and cache per token of every preset in `groups` (name prefixes):
  the `params` mode's table."""
  rows = []
  for name, make in presets().items():
    if not name.startswith(tuple(groups)):
      continue
    cfg = make()
    counts = count_params(cfg)
    rows.append((name, cfg.attention.variant, counts["total"], counts["non_embedding"],
                 cfg.cache_elements_per_token()))
  lines = []
  for prefix in groups:
    title = GROUPS[prefix]
    sel = [r for r in rows if r[0].startswith(prefix)]
    ref = next((r for r in sel if r[1] == "mha"), sel[0])[2]
    lines += ["", title,
              f"{'preset':<22} {'params':>15} {'non-embedding':>15} {'vs mha':>8} {'cache/token/layer':>18}"]
    for name, _, total, non_emb, cache in sel:
      lines.append(f"{name:<22} {total:>15,} {non_emb:>15,} {100 * (total / ref - 1):>+7.2f}% {cache:>18,}")
  return "\n".join(lines)


if __name__ == "__main__":
  print(listing())
