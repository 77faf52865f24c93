"""The structure the decode paths stand on: no import circles in mla_jax, a variant
is one file plus one registry line, and every attention path of every variant
goes through the one attention core (break a core function and the paths that
use it fail their references)."""
import ast
import dataclasses
import os
import pkgutil

import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import nnx

import mla_jax
import numpy_reference as ref
import test_numpy_reference as refs
from helpers import randomize
from mla_jax import RunOptions, cache_report, presets, registry
from mla_jax.attention import core
from mla_jax.attention.base import Attention
from mla_jax.config import AttentionConfig, check, option
from mla_jax.layers import dense, param

PACKAGE = os.path.dirname(mla_jax.__file__)


# ----------------------------------------------------------------------------- imports


def _modules() -> dict[str, str]:
  """module name -> file, for every module of mla_jax."""
  out = {"mla_jax": os.path.join(PACKAGE, "__init__.py")}
  for info in pkgutil.walk_packages([PACKAGE], "mla_jax."):
    spec = info.module_finder.find_spec(info.name)
    out[info.name] = spec.origin
  return out


def _edges(name: str, path: str, modules: dict[str, str]) -> set[str]:
  """Every mla_jax module `name` imports, at any depth (inside functions too);
  `from mla_jax import x` is an edge to mla_jax.x when x is a module."""
  package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
  out = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    else:
      continue
    out.update(t for t in targets if t in modules and t != name)
  return out


def test_no_import_cycles():
  modules = _modules()
  graph = {name: _edges(name, path, modules) for name, path in modules.items()}
  assert "mla_jax.attention.core" in graph and "mla_jax.registry" in graph["mla_jax.model"]
  state: dict[str, int] = {}

  def visit(node, stack):
    state[node] = 1
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        cycle = stack[stack.index(nxt):] + [nxt]
        pytest.fail("import cycle: " + " -> ".join(cycle))
      if nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = 2

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])
  # the rules and the cache formats sit at the bottom: they import nothing of ours; the configs only the formats
  assert graph["mla_jax.rules"] == set() and graph["mla_jax.quant"] == set()
  assert graph["mla_jax.config"] == {"mla_jax.quant"}


def test_the_cycle_check_sees_function_level_imports(tmp_path):
  """The walker counts an import inside a function (how the old config module
  reached the attention package)."""
  code = "def f():\n  import mla_jax.model\n  from mla_jax import sharding\n"
  path = tmp_path / "m.py"
  path.write_text(code)
  modules = _modules()
  assert _edges("mla_jax.config", str(path), modules) == {"mla_jax.model", "mla_jax.sharding"}


# ----------------------------------------------------------------------------- a toy variant


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToyConfig(AttentionConfig):
  """One key/value head of width `toy_width`, read by every query head."""
  toy_width: int = option(8, "Toy head width.")

  def validate(self, d_model=None):
    super().validate(d_model)
    check(self.toy_width % 2 == 0, "toy_width must be even")

  def cache_spec(self):
    return {"key": ((self.toy_width,), ("head_dim",)), "value": ((self.toy_width,), ("head_dim",))}

  def partition_entries(self):
    return 1


class Toy(Attention):
  def __init__(self, config, **kw):
    super().__init__(config, **kw)
    d, h, w = self.d_model, config.num_heads, config.toy_width
    self.wq = param(kw["rngs"], (d, h, w), ("embed", "q_heads", "head_dim"))
    self.wk = param(kw["rngs"], (d, w), ("embed", "head_dim"))
    self.wv = param(kw["rngs"], (d, w), ("embed", "head_dim"))
    self.wo = param(kw["rngs"], (h, w, d), ("q_heads", "head_dim", "embed"))

  def cache_entries(self, x, positions):
    return {"key": dense(x, self.wk[...], "bsd,dw->bsw", self.dtype), "value": dense(x, self.wv[...], "bsd,dw->bsw", self.dtype)}

  def attend(self, x, positions, kv, kv_len):
    q = core.heads_major(dense(x, self.wq[...], "bsd,dhw->bshw", self.dtype))
    y, _ = core.expanded(q, kv["key"], kv["value"], scale=0.5, kv_len=kv_len, backend=self.backend)
    return dense(core.token_major(y), self.wo[...], "bshw,hwd->bsd", self.dtype)


@pytest.fixture
def toy():
  registry.register("toy", ToyConfig, Toy, summary="a test's own variant")
  try:
    yield
  finally:
    del registry.VARIANTS["toy"]


def test_a_registered_variant_appears_everywhere(toy):
  from experiments import options
  fv = flags.FlagValues()
  options.define(fv)
  assert "toy" in fv["variant"].parser.enum_values and "toy" in fv["variants"].default
  assert fv["toy_width"].default == 8                      # its own field is a flag
  fv(["run", "--variant=toy", "--toy_width=6", "--num_heads=2"])
  config = options.model_config(fv)
  assert config.attention == registry.attention_config("toy", num_heads=2, toy_width=6)
  # the KV report measures it on a mesh, like any variant
  rows = cache_report.rows({"toy": config}, tps=(1, 2))
  assert [r.per_device_elements_per_token for r in rows] == [12, 12]
  # the presets listing has it; the model trains and decodes
  assert "small_toy" in presets.listing(groups=("small_",))
  from test_decode import check_decode_matches_forward
  check_decode_matches_forward(presets.small("toy").replace(d_model=32, vocab_size=61, max_seq_len=64), "absorbed")


# ----------------------------------------------------------------------------- routing


D = 32
SEQ = 16                    # cache slots: JAX's GQA/MQA decode ops want multiples of 16
ROUTING = {                 # power-of-2 widths of 16 or more, as the Pallas kernels need
    "mha": dict(num_heads=4, head_dim=16), "mqa": dict(num_heads=4, head_dim=16),
    "gqa": dict(num_heads=4, num_kv_heads=2, head_dim=16),
    **{v: dict(num_heads=4, q_lora_rank=16, kv_lora_rank=64, qk_nope_head_dim=16, qk_rope_head_dim=16)
       for v in ("mla", "gla2", "gla4", "mlra2", "mlra4")},
    "mlra4_absorbed_training": dict(num_heads=4, q_lora_rank=16, kv_lora_rank=64, qk_nope_head_dim=32,
                                    qk_rope_head_dim=16),
    "gta": dict(num_heads=4, num_kv_heads=2, head_dim=16), "tpa": dict(num_heads=4, head_dim=16, q_rank=3),
    "mfa": dict(num_heads=4, head_dim=16, q_lora_rank=16),
}
PATHS = ("training", "prefill", "naive", "absorbed", "pallas")


def _paths(case, only=PATHS):
  """name -> the attention output each path (of `only`) gives, and the NumPy reference."""
  variant = case.split("_")[0]
  config = registry.attention_config(variant, **ROUTING[case])
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, SEQ, D))
  positions = np.broadcast_to(np.arange(SEQ), (2, SEQ))
  out = {}
  attn = None
  for path in only:
    impl = path if path in ("naive", "absorbed", "pallas") else "absorbed"
    attn = registry.get(variant).module(config, d_model=D, rngs=nnx.Rngs(0), options=RunOptions(decode_impl=impl))
    randomize(attn, seed=11)
    cache = {k: jnp.zeros((2, SEQ) + shape) for k, (shape, _) in config.cache_spec().items()}

    def run(attn, x, positions, cache, path=path):     # a fresh function: traced anew, never cached
      if path == "training":
        return attn(x, positions)
      if path == "prefill":
        return attn.prefill(x, positions, cache)[0]
      _, cache = attn.prefill(x[:, :-1], positions[:, :-1], cache)   # the others, then the last token
      return attn.decode(x[:, -1:], cache, jnp.full((2,), SEQ - 1, jnp.int32))[0][:, 0]

    try:
      out[path] = np.asarray(nnx.jit(run)(attn, jnp.asarray(x, jnp.float32), jnp.asarray(positions), cache))
    except ValueError as e:
      assert path == "pallas" and "cannot run here" in str(e), e      # gta, tpa: no kernel
  if attn is None:
    attn = registry.get(variant).module(config, d_model=D, rngs=nnx.Rngs(0))
    randomize(attn, seed=11)
  want = np.stack([refs.reference(x[b], positions[b].astype(np.float64), attn) for b in range(2)])
  return out, want


def _fails(got, want, path):
  expected = want if path in ("training", "prefill") else want[:, -1]
  return not np.allclose(got, expected, rtol=1e-3, atol=1e-4)


# which core function each path goes through
def _route(case, path):
  variant = case.split("_")[0]
  if variant in ("mla", "gla2", "gla4", "mlra2", "mlra4"):
    config = registry.attention_config(variant, **ROUTING[case])
    form = config.training_form() if path in ("training", "prefill") else path
    return "expanded" if form == "naive" else "absorbed"
  if variant == "tpa" and path == "absorbed":
    return "softmax"                            # TPA decodes from its factors with the core's softmax
  return "expanded"


@pytest.mark.parametrize("case", list(ROUTING))
def test_every_path_goes_through_the_core(case, monkeypatch):
  intact, want = _paths(case)
  for path, got in intact.items():
    assert not _fails(got, want, path), f"{case} {path} does not match its reference to begin with"
  assert np.abs(want).max() > 1e-2
  if case == "mlra4_absorbed_training":
    assert _route(case, "training") == "absorbed"
  broken_fns = {}
  for name in ("expanded", "absorbed", "softmax"):
    real = getattr(core, name)

    def broken(*args, real=real, **kw):
      out, lse = real(*args, **kw)
      return jnp.zeros_like(out), lse
    broken_fns[name] = broken
  for name, broken in broken_fns.items():
    paths = [p for p in intact if _route(case, p) == name]
    if not paths:
      continue
    with monkeypatch.context() as m:
      m.setattr(core, name, broken)
      got, _ = _paths(case, paths)
    for path in paths:
      assert _fails(got[path], want, path), f"{case} {path}: breaking core.{name} changed nothing"
