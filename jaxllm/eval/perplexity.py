"""`python -m jaxllm.eval perplexity`: sliding-window perplexity and bits per byte of text.

  python -m jaxllm.eval perplexity --checkpoint DIR --data FILE_OR_DIR [...] [--seq-len N
      --stride N --batch-size N --field text --mesh 1,1,-1 --output-path DIR]

Each --data is text (one document per file), JSON lines (`--field` of each record) or a
`datasets` save_to_disk directory; a folder or a glob reads every file below it. Prints one
summary line; writes DIR/perplexity.json with the total and each source's figures. The
method and its figures are in jaxllm/eval/sliding_window.py and docs/eval.md.
"""

from __future__ import annotations

import json
import os
from typing import Any

from jaxllm import progress


def add_arguments(p: Any) -> None:
  p.add_argument("--checkpoint", required=True,
                 help="model directory: a training workdir or one written by `convert from-hf`")
  p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                 help="text files, .jsonl files, datasets directories, folders or globs")
  p.add_argument("--field", default="text", help="JSON field / datasets column holding the text")
  p.add_argument("--seq-len", type=int, default=0,
                 help="tokens per window (default: all the model's positions)")
  p.add_argument("--stride", type=int, default=0,
                 help="tokens between window starts (default: seq-len / 2; = seq-len: disjoint windows)")
  p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
  p.add_argument("--mesh", default="1,1,-1", help="DATA,FSDP,TENSOR device mesh (-1 = the rest)")
  p.add_argument("--output-path", default="", help="directory for perplexity.json")


def run(args: Any) -> dict[str, Any]:
  # pylint: disable=import-outside-toplevel
  from jaxllm.eval import sliding_window as sw
  from jaxllm.eval.scoring import Scorer
  from jaxllm.model_dir import load_with_tokenizer
  from jaxllm.sharding import mesh_from_flag

  mesh = mesh_from_flag(args.mesh)
  # Every source is read before the model loads: a bad path fails in seconds.
  documents = [sw.load_eval_documents(path, args.field) for path in args.data]
  cfg, params, tokenizer = load_with_tokenizer(args.checkpoint, mesh)
  scorer = Scorer(cfg, mesh, args.batch_size)
  seq_len = args.seq_len or scorer.max_input_len
  stride = args.stride or max(seq_len // 2, 1)
  sw.check_window(seq_len, stride, scorer)
  windows = [sw.prepare(tokenizer, docs, seq_len, stride) for docs in documents]
  results = {}
  with progress.bar(sum(len(w.rows) for w in windows), desc="perplexity", unit="window") as bar:
    for name, w in zip(sw.source_names(args.data), windows):
      results[name] = sw.evaluate(scorer, params, w, on_batch=bar.update)
  total = sum(results.values(), start=sw.PerplexityResult(0.0, 0, 0, 0, 0))
  report = {"checkpoint": args.checkpoint, "seq_len": seq_len, "stride": stride, **total.to_dict(),
            "sources": {name: {"path": path, **r.to_dict()}
                        for (name, r), path in zip(results.items(), args.data)}}
  print(f"perplexity {total.perplexity:.4f}  nll {total.nll:.4f} nats/token  bits/byte "
        f"{total.bits_per_byte:.4f}  ({total.num_tokens} tokens, {total.num_bytes} bytes, "
        f"{total.num_documents} documents; seq_len {seq_len}, stride {stride})", flush=True)
  if args.output_path:
    os.makedirs(args.output_path, exist_ok=True)
    with open(os.path.join(args.output_path, "perplexity.json"), "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
  return report
