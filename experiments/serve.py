"""`--mode=serve`: JSON-lines requests in, one JSON line per finished request out.

    {"prompt": "Once upon a time", "max_new_tokens": 64, "temperature": 0.8, "top_k": 40,
     "top_p": 0.95, "stop": ["."], "seed": 1, "id": "a"}

Every field but `prompt` is optional (defaults: the runner's flags). `stop`
lists single-token strings or token ids; the tokenizer's end-of-text token
always stops. Requests are read on a thread while the engine serves, so a
request that arrives on standard input later joins the batch between steps.
A bad line gets one JSON error line (and one line on stderr) and the others
go on; the run then exits with status 2.
"""
from __future__ import annotations

import dataclasses
import json
import queue
import sys
import threading
import time

import numpy as np

from mla_jax.data.tokenizer import prompt_ids
from mla_jax.engine import Engine, Request, RequestError, Sampling, parse_speculative

FIELDS = ("prompt", "max_new_tokens", "temperature", "top_k", "top_p", "stop", "seed", "id")


@dataclasses.dataclass(frozen=True)
class Defaults:
  max_new_tokens: int
  sampling: Sampling
  seed: int


def parse_request(line: str, number: int, tokenizer, defaults: Defaults) -> Request:
  """One JSON line -> a Request; RequestError (one line: what and how to fix) otherwise."""
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise RequestError(f"not valid JSON ({e.msg} at column {e.colno}); write one JSON object per line") from None
  if not isinstance(obj, dict):
    raise RequestError('a request is a JSON object, e.g. {"prompt": "Once upon a time"}')
  unknown = sorted(set(obj) - set(FIELDS))
  if unknown:
    raise RequestError(f"unknown field {unknown[0]!r}; the fields are {', '.join(FIELDS)}")
  prompt = obj.get("prompt")
  if not isinstance(prompt, str):
    raise RequestError('"prompt" must be a string')
  ids = prompt_ids(tokenizer, prompt)
  if not ids:
    raise RequestError("empty prompt: give some text to continue")

  def number_field(name, kind, default):
    value = obj.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
      raise RequestError(f'"{name}" must be {"a number" if kind is float else "an integer"}, got {value!r}')
    return kind(value)

  max_new = number_field("max_new_tokens", int, defaults.max_new_tokens)
  try:
    sampling = Sampling(number_field("temperature", float, defaults.sampling.temperature),
                        number_field("top_k", int, defaults.sampling.top_k),
                        number_field("top_p", float, defaults.sampling.top_p))
  except ValueError as e:
    raise RequestError(str(e)) from None
  stop = set(tokenizer.stop_ids)
  for s in obj.get("stop", []) if isinstance(obj.get("stop", []), list) else [obj["stop"]]:
    if isinstance(s, int) and not isinstance(s, bool):
      stop.add(s)
    elif isinstance(s, str):
      encoded = tokenizer.encode(s)
      if len(encoded) != 1:
        raise RequestError(f'stop string {s!r} is {len(encoded)} tokens; "stop" takes single-token strings '
                           "or token ids")
      stop.add(encoded[0])
    else:
      raise RequestError(f'"stop" takes strings or token ids, got {s!r}')
  seed = number_field("seed", int, defaults.seed + number)
  return Request(tuple(ids), max_new, sampling, tuple(sorted(stop)), seed, obj.get("id", number))


def _reader(stream, out: queue.Queue) -> None:
  for number, line in enumerate(stream, 1):
    if line.strip():
      out.put((number, line))
  out.put(None)


def _percentile(values, q):
  return float(np.percentile(values, q)) if values else float("nan")


def serve(model, tokenizer, *, requests_in, out, defaults: Defaults, max_seqs: int, page_size: int,
          num_pages: int | None, max_len: int | None, prefill_chunk: int, speculative: str,
          progress: bool = True, log=sys.stderr) -> dict:
  """Serve every request of `requests_in` (an iterable of lines); write results to `out`."""
  engine = Engine(model, max_seqs=max_seqs, page_size=page_size, num_pages=num_pages, max_len=max_len,
                  prefill_chunk=prefill_chunk, drafter=parse_speculative(speculative))
  lines: queue.Queue = queue.Queue()
  threading.Thread(target=_reader, args=(requests_in, lines), daemon=True).start()
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(desc="serve", unit="req", file=log, dynamic_ncols=True)
  numbers, ttfts, served, refused, out_tokens = {}, [], 0, 0, 0
  eof, start = False, time.perf_counter()

  def emit(obj):
    out.write(json.dumps(obj) + "\n")
    out.flush()

  while not (eof and engine.idle):
    while True:                           # take what has arrived; block only when there is nothing to do
      try:
        item = lines.get(block=engine.idle and not eof)
      except queue.Empty:
        break
      if item is None:
        eof = True
        break
      number, line = item
      try:
        request = parse_request(line, number, tokenizer, defaults)
        if request.id in numbers:     # results are keyed by id: two in flight could not be told apart
          raise RequestError(f"id {request.id!r} belongs to a request still being served; give each request "
                             "its own id")
        engine.submit(request)
        numbers[request.id] = number
      except RequestError as e:
        refused += 1
        print(f"error: request on line {number}: {e}", file=log)
        emit({"line": number, "error": str(e)})
    for done in engine.step():
      served += 1
      out_tokens += len(done.tokens)
      ttfts.append(done.ttft_s)
      text_ids = [t for t in done.tokens if t not in tokenizer.stop_ids]
      emit({"id": done.id, "line": numbers.pop(done.id), "text": tokenizer.decode(text_ids), "tokens": done.tokens,
            "finish_reason": done.finish_reason, "prompt_tokens": done.prompt_tokens,
            "ttft_s": round(done.ttft_s, 4), "decode_tokens_per_s": round(done.decode_tokens_per_s, 2)})
      if bar is not None:
        bar.update(1)
  if bar is not None:
    bar.close()
  wall = time.perf_counter() - start
  stats = engine.summary()
  page_bytes = engine.cache_bytes_per_page()
  summary = {"requests": served, "refused": refused, "seconds": round(wall, 3),
             "requests_per_s": round(served / wall, 3), "output_tokens_per_s": round(out_tokens / wall, 1),
             "ttft_p50_s": round(_percentile(ttfts, 50), 4), "ttft_p95_s": round(_percentile(ttfts, 95), 4),
             "pages_high_water": stats["pages_high_water"], "pages": stats["pages"],
             "cache_bytes_high_water": stats["pages_high_water"] * page_bytes,
             "cache_bytes_pool": stats["pages"] * page_bytes, "page_size": page_size,
             "shared_prefix_tokens": stats["shared_prefix_tokens"], "steps": stats["steps"],
             "compiled_shapes": stats["compiled_shapes"]}
  if speculative:
    summary.update(drafted=stats["drafted"], accepted=stats["accepted"],
                   acceptance=None if stats["acceptance"] is None else round(stats["acceptance"], 3))
  return summary
