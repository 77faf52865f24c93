"""Read collectives out of a compiled program's HLO text.

Used to check, and later to report, what a sharded step pays in communication:
every all-reduce / all-gather / reduce-scatter / all-to-all / collective-permute
with its result shape and bytes (per device).
"""
from __future__ import annotations

import dataclasses
import math
import re

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_LINE = re.compile(r"=\s*(\([^=]*?\)|\w+\[[\d,]*\](?:\{[^}]*\})?)\s+(" + "|".join(_OPS) +
                   r")(?:-start)?\(")


@dataclasses.dataclass(frozen=True)
class Collective:
  op: str
  shapes: tuple[tuple[str, tuple[int, ...]], ...]   # (dtype, shape) of each result

  @property
  def bytes(self) -> int:
    return sum(_BYTES.get(dt, 4) * math.prod(shape) for dt, shape in self.shapes)


def collectives(hlo_text: str) -> list[Collective]:
  """Every collective in `hlo_text` (async pairs counted once, at their start)."""
  out = []
  for line in hlo_text.splitlines():
    m = _LINE.search(line)
    if not m:
      continue
    shapes = tuple((dt, tuple(int(d) for d in dims.split(",") if d))
                   for dt, dims in _ARRAY.findall(m.group(1)))
    out.append(Collective(m.group(2), shapes))
  return out


def dtype_bytes(c: Collective) -> int:
  """Bytes per element of a collective's (first) result."""
  return _BYTES.get(c.shapes[0][0], 4) if c.shapes else 4


def summarize(colls: list[Collective]) -> dict[str, int]:
  """op -> total result bytes."""
  total: dict[str, int] = {}
  for c in colls:
    total[c.op] = total.get(c.op, 0) + c.bytes
  return total


def kinds(colls: list[Collective]) -> str:
  """e.g. "all-gather x1, all-reduce x2" ("" for none)."""
  counts: dict[str, int] = {}
  for c in colls:
    counts[c.op] = counts.get(c.op, 0) + 1
  return ", ".join(f"{op} x{n}" for op, n in sorted(counts.items()))
