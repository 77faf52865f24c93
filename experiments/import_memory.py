"""Peak host memory of importing a Hugging Face checkpoint (mla_jax.hf.load).

Writes a synthetic Llama-shaped checkpoint (random bfloat16 tensors in the
names and shapes `mla_jax.hf` reads, sharded), then imports it in a fresh
process and reports that process's peak resident memory above what it held
before the import (JAX and mla_jax loaded, the CPU backend up), beside the
model's bytes and the largest shard's. `--naive` reads every shard into memory
first and builds the model after, the way a loader without streaming does, for
contrast.

    .venv/bin/python -m experiments.import_memory --gb=1
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import ml_dtypes
import numpy as np


def llama_config(gb: float, d: int = 2048):
  """A Llama-shaped config of about `gb` GB in bfloat16 (width d, 128-wide heads, 4 KV heads)."""
  from mla_jax import registry
  from mla_jax.config import ModelConfig
  vocab, mlp = 32000, 11 * d // 4
  per_layer = 2 * d * d + 2 * d * 512 + 3 * d * mlp
  layers = max(1, round((gb * 1e9 / 2 - 2 * vocab * d) / per_layer))
  attention = registry.attention_config("gqa", num_heads=d // 128, num_kv_heads=4, head_dim=128)
  return ModelConfig(vocab_size=vocab, d_model=d, num_layers=layers, mlp_dim=mlp, tie_embeddings=False,
                     param_dtype="bfloat16", attention=attention)


def write_checkpoint(path: str, gb: float, shard_mb: int, d: int = 2048) -> dict:
  from safetensors.numpy import save_file

  from mla_jax import hf
  config = llama_config(gb, d)
  hf_config = hf.hf_config(config, dtype="bfloat16")
  rng = np.random.default_rng(0)
  shards, current, size = [], {}, 0
  for name, shape in hf.layout(config, hf_config).tensors.items():
    t = (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    if current and size + t.nbytes > shard_mb << 20:
      shards.append(current)
      current, size = {}, 0
    current[name], size = t, size + t.nbytes
  shards.append(current)
  weight_map = {}
  for k, shard in enumerate(shards, 1):
    file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(path, file))
    weight_map |= {n: file for n in shard}
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"weight_map": weight_map}, f)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_config, f)
  sizes = [sum(t.nbytes for t in s.values()) for s in shards]
  return {"model_bytes": sum(sizes), "largest_shard_bytes": max(sizes), "shards": len(sizes)}


def measure(path: str, naive: bool) -> int:
  """Peak RSS growth of one import, in bytes, in a fresh process: its high-water
  mark (VmHWM, which starts afresh at exec, unlike getrusage's ru_maxrss) less
  its resident memory before the import."""
  code = f"""
import jax, numpy as np
from mla_jax import hf
def status(key):
  return int(next(l for l in open('/proc/self/status') if l.startswith(key + ':')).split()[1]) * 1024
jax.numpy.zeros(1).block_until_ready()
base = status('VmRSS')
if {naive}:
  from mla_jax.tensor_files import TensorFiles
  everything = TensorFiles({path!r}).read_all()        # every shard in memory at once
  model, _ = hf.load({path!r})
else:
  model, _ = hf.load({path!r})
jax.block_until_ready(jax.tree.leaves(jax.tree.map(lambda x: x, __import__('flax').nnx.state(model))))
print(status('VmHWM') - base)
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  return int(out.stdout.strip().splitlines()[-1])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gb", type=float, default=1.0, help="checkpoint size, GB (bfloat16)")
  parser.add_argument("--shard_mb", type=int, default=256, help="largest shard, MB")
  parser.add_argument("--d_model", type=int, default=2048, help="model width (a multiple of 128)")
  parser.add_argument("--naive", action="store_true", help="also measure the read-everything-first loader")
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as path:
    sizes = write_checkpoint(path, args.gb, args.shard_mb, args.d_model)
    peak = measure(path, naive=False)
    rows = [("streaming (mla_jax.hf.load)", peak)]
    if args.naive:
      rows.append(("read every shard, then build", measure(path, naive=True)))
  mb = lambda b: f"{b / 1e6:,.0f} MB"                    # noqa: E731
  print(f"checkpoint: {mb(sizes['model_bytes'])} in {sizes['shards']} shards (largest {mb(sizes['largest_shard_bytes'])}),"
        f" bfloat16, d_model {args.d_model}; model in memory: {mb(sizes['model_bytes'])}")
  bound = sizes["model_bytes"] + sizes["largest_shard_bytes"]
  for name, value in rows:
    print(f"{name:32s} peak RSS growth {mb(value):>10s}  ({value / bound:.2f} x model + largest shard)")
  return sizes, rows


if __name__ == "__main__":
  main()
