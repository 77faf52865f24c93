"""`--mode=serve` end to end on a run directory (tests/data/v1/run, written by an
earlier commit): JSON lines in and out, bad lines refused one by one while the
rest are served, greedy tokens equal to the frozen dense generate, speculative
decoding on, and a pool too small refused before anything is loaded."""
import json
import os
import shutil
import sys

import numpy as np
import pytest

from experiments.serve import Defaults, parse_request
from mla_jax.engine import RequestError, Sampling
from reference_generate import generate as dense_generate
from runner_helpers import run_cmd

DATA = os.path.join(os.path.dirname(__file__), "data", "v1")
TOKENIZER = os.path.join(DATA, "tokenizer.model")


@pytest.fixture
def run_dir(tmp_path):
  shutil.copytree(os.path.join(DATA, "run"), tmp_path / "run")
  return tmp_path / "run"


def serve_cmd(run_dir, *extra):
  return [sys.executable, "-m", "experiments.run", "--mode=serve", f"--output_dir={run_dir}",
          f"--tokenizer={TOKENIZER}", "--temperature=0", "--noprogress", *extra]


PROMPTS = ["Tom had a ball.", "Lily", "One day the cat was lost. Mia looked for the cat and", "Sam had a kite. Sam"]


def test_serve_answers_every_good_line_and_refuses_the_bad_ones(run_dir, tmp_path):
  lines = [json.dumps({"prompt": PROMPTS[0], "max_new_tokens": 12, "id": "a"}),
           "{not json",
           json.dumps({"prompt": PROMPTS[1], "max_new_tokens": 20, "colour": "red"}),
           json.dumps({"prompt": PROMPTS[1], "max_new_tokens": 20}),
           json.dumps({"prompt": ""}),
           json.dumps({"prompt": "Tom had a ball. " * 20}),
           json.dumps({"prompt": PROMPTS[2], "max_new_tokens": 0}),
           json.dumps({"prompt": PROMPTS[3], "max_new_tokens": -2}),
           json.dumps({"prompt": PROMPTS[2], "max_new_tokens": 9}),
           json.dumps({"prompt": PROMPTS[3], "max_new_tokens": 16, "temperature": 0.9, "seed": 4})]
  (tmp_path / "requests.jsonl").write_text("\n".join(lines) + "\n")
  out = tmp_path / "out.jsonl"
  result = run_cmd(serve_cmd(run_dir, f"--requests={tmp_path / 'requests.jsonl'}", f"--serve_output={out}",
                             "--page_size=16", "--max_seqs=2", "--prefill_chunk=8", "--serve_max_len=48",
                             "--speculative=ngram:3"))
  assert result.returncode == 2, result.stderr          # some lines were refused; the rest were served
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  errors = {r["line"]: r["error"] for r in rows if "error" in r}
  assert errors.keys() == {2, 3, 5, 6, 7, 8}
  assert errors[2].startswith("not valid JSON")
  assert errors[3] == "unknown field 'colour'; the fields are prompt, max_new_tokens, temperature, top_k, " \
                      "top_p, stop, seed, id"
  assert errors[5].startswith("empty prompt")
  assert "leaves no room to generate within the context of 48 tokens" in errors[6]
  assert errors[7] == errors[8].replace("-2", "0") == "max_new_tokens must be a positive integer, got 0"
  for n in (2, 3, 5, 6, 7, 8):
    assert f"error: request on line {n}: {errors[n]}" in result.stderr
  served = {r["line"]: r for r in rows if "error" not in r}
  assert served.keys() == {1, 4, 9, 10} and served[1]["id"] == "a"
  assert all(r["ttft_s"] >= 0 and r["finish_reason"] in ("stop", "length") for r in served.values())
  summary = json.loads(result.stderr.strip().splitlines()[-1].split("): ", 1)[1])   # "served ... (mlra4): {...}"
  assert summary["requests"] == 4 and summary["refused"] == 6 and summary["pages_high_water"] > 0
  assert {"ttft_p50_s", "ttft_p95_s", "output_tokens_per_s", "acceptance"} <= summary.keys()

  # greedy requests equal the frozen dense generate
  from experiments import trainer
  from mla_jax.data import tokenizer as tok
  _, model, _, _, _ = trainer.load_run(str(run_dir), need_tokenizer=False)
  tokenizer = tok.load(TOKENIZER)
  for line, prompt, n in ((1, PROMPTS[0], 12), (4, PROMPTS[1], 20), (9, PROMPTS[2], 9)):
    ids = tokenizer.encode(prompt)
    want = dense_generate(model, np.asarray([ids]), [len(ids)], max_new_tokens=n, stop_token=tokenizer.eos_id)
    assert served[line]["tokens"] == want.tokens[0, :want.lengths[0]].tolist(), line
    assert served[line]["text"] == tokenizer.decode([t for t in served[line]["tokens"] if t != tokenizer.eos_id])


def test_a_pool_too_small_is_refused_before_loading(run_dir, tmp_path):
  result = run_cmd(serve_cmd(run_dir, "--num_pages=3", "--page_size=16", "--serve_max_len=64",
                             f"--serve_output={tmp_path / 'out.jsonl'}"), input="")
  assert result.returncode == 2
  assert result.stderr.strip() == ("error: --num_pages=3 cannot hold one sequence of 64 tokens in pages of 16; "
                                   "use --num_pages >= 5 (or lower --serve_max_len)")
  assert not (tmp_path / "out.jsonl").exists()
  bad = run_cmd(serve_cmd(run_dir, "--speculative=medusa"), input="")
  assert bad.returncode == 2 and "use ngram:K" in bad.stderr


class _Tok:
  eos_id = 0
  stop_ids, bos_id = (0,), None

  def encode(self, text):
    return [ord(c) % 50 + 1 for c in text]

  def decode(self, ids):
    return "".join(chr(ord("a") + i % 26) for i in ids)


def test_a_duplicate_id_in_flight_is_refused_and_the_rest_served():
  import io
  from experiments.serve import serve
  from helpers import random_model, small_config
  lines = ['{"prompt": "abc", "id": "x", "max_new_tokens": 20}', '{"prompt": "de", "id": "x"}',
           '{"prompt": "fgh", "max_new_tokens": 2}']
  out = io.StringIO()
  summary = serve(random_model(small_config("gqa")), _Tok(), requests_in=iter(line + "\n" for line in lines),
                  out=out, defaults=Defaults(4, Sampling(), 0), max_seqs=4, page_size=16, num_pages=None,
                  max_len=None, prefill_chunk=8, speculative="", progress=False, log=io.StringIO())
  rows = [json.loads(r) for r in out.getvalue().splitlines()]
  assert {r.get("id") for r in rows if "error" not in r} == {"x", 3}
  assert [r["error"] for r in rows if "error" in r] == [
      "id 'x' belongs to a request still being served; give each request its own id"]
  assert summary["requests"] == 2 and summary["refused"] == 1


@pytest.mark.parametrize("line, msg", [
    ('["a"]', "a request is a JSON object"),
    ('{"prompt": 3}', '"prompt" must be a string'),
    ('{"prompt": "a", "top_p": 0}', r"top_p must be in \(0, 1\]"),
    ('{"prompt": "a", "top_k": 1.5}', '"top_k" must be an integer, got 1.5'),
    ('{"prompt": "a", "stop": ["ab"]}', "stop string 'ab' is 2 tokens"),
    ('{"prompt": "a", "seed": true}', '"seed" must be an integer, got True'),
])
def test_bad_request_fields(line, msg):
  with pytest.raises(RequestError, match=msg):
    parse_request(line, 1, _Tok(), Defaults(8, Sampling(), 0))


def test_request_defaults_and_stops():
  r = parse_request('{"prompt": "ab", "stop": ["c", 7]}', 3, _Tok(), Defaults(8, Sampling(0.5, 3, 0.9), 10))
  assert r.prompt == (48, 49) and r.max_new_tokens == 8 and r.sampling == Sampling(0.5, 3, 0.9)
  assert r.stop == (0, 7, 50) and r.seed == 13 and r.id == 3
