"""Input-pipeline benchmark: tokens/s of the pipeline alone, and packing efficiency, per packing mode.

  python -m jaxllm.data.bench /work/shared/data/c4_en.jsonl /work/shared/data/wiki_en.txt \
      --seq-len 1024 --batch-size 32 --seconds 20 --cores 2

Each path is one source (.jsonl/.json: field --field; .txt: one document per line;
.parquet); several are mixed with equal weights. A byte-level BPE is trained on the
corpus first (or --tokenizer DIR is loaded). The pipeline is the one training uses
(shuffle, batched tokenization + EOS, packing, batching, prefetch thread), run for
--seconds per mode after a warm-up; documents are re-tokenized every epoch, nothing
is cached. Reported: row slots/s (seq_len x rows; what the accelerator consumes),
real tokens/s (weight 1), the fill (real / slots), and CPU seconds used per second
(how many cores the pipeline kept busy).
"""

from __future__ import annotations

import argparse
import os
import resource
import time


def _kind(path: str) -> dict:
  ext = os.path.splitext(path)[1].lower()
  if ext in (".jsonl", ".json"):
    return {"source": "jsonl"}
  if ext == ".parquet":
    return {"source": "parquet"}
  return {"source": "text", "text_unit": "line"}


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def measure(batches, seconds: float, warmup: int = 3) -> dict:
  it = iter(batches)
  for _ in range(warmup):
    next(it)
  slots = real = steps = 0
  start, cpu_start = time.perf_counter(), _cpu_seconds()
  while time.perf_counter() - start < seconds:
    batch = next(it)
    slots += batch["weights"].size
    real += float(batch["weights"].sum())
    steps += 1
  elapsed, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
  if hasattr(it, "close"):
    it.close()
  return {"batches": steps, "slots_per_s": slots / elapsed, "real_per_s": real / elapsed,
          "fill": real / max(slots, 1), "cpu_per_s": cpu / elapsed}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("paths", nargs="+", help="corpus files (jsonl/json, txt, parquet); several are mixed")
  parser.add_argument("--field", default="text")
  parser.add_argument("--seq-len", type=int, default=1024)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--seconds", type=float, default=20.0)
  parser.add_argument("--modes", default="concat,document")
  parser.add_argument("--pack-bins", type=int, default=128)
  parser.add_argument("--tokenize-batch", type=int, default=128)
  parser.add_argument("--prefetch", type=int, default=2)
  parser.add_argument("--tokenize-threads", type=int, default=-1,
                      help="batches tokenized at once (data.tokenize_threads; -1 = one per core up to 16, 0 = inline)")
  parser.add_argument("--tokenizer", default="", help="a tokenizer dir; default: train a BPE on the corpus")
  parser.add_argument("--vocab-size", type=int, default=32768)
  parser.add_argument("--cores", type=int, default=0, help="pin the process to this many cores (0 = all)")
  args = parser.parse_args(argv)
  if args.cores:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cores])

  from jaxllm.config import default_config  # pylint: disable=import-outside-toplevel
  from jaxllm.data.pipeline import PackSpec, lm_batches, memory_documents  # pylint: disable=import-outside-toplevel
  from jaxllm.data.documents import load_documents  # pylint: disable=import-outside-toplevel
  from jaxllm.data.sources import DataStats  # pylint: disable=import-outside-toplevel
  from jaxllm.tokenizer import load_tokenizer, train_bpe  # pylint: disable=import-outside-toplevel

  corpora = {}
  for i, path in enumerate(args.paths):
    cfg = default_config().data
    cfg.update(path=path, field=args.field, **_kind(path))
    corpora[f"{i}:{os.path.basename(path)}"] = list(load_documents(cfg, DataStats()))
  docs = [d for c in corpora.values() for d in c]
  chars = sum(map(len, docs))
  if args.tokenizer:
    tokenizer = load_tokenizer(args.tokenizer)
  else:
    start = time.perf_counter()
    tokenizer = train_bpe(docs, args.vocab_size)
    print(f"trained a {len(tokenizer)}-token BPE in {time.perf_counter() - start:.1f}s")
  encode = tokenizer.backend_tokenizer.encode_batch_fast
  # The tokenizer alone on its own thread pool (the library's default); the pipeline then
  # tokenizes in its own threads, one batch per core, with the library's pool off.
  os.environ["TOKENIZERS_PARALLELISM"] = "true"
  start, cpu_start = time.perf_counter(), _cpu_seconds()
  lengths = sorted(len(e.ids) + 1 for i in range(0, len(docs), args.tokenize_batch)
                   for e in encode(docs[i:i + args.tokenize_batch], add_special_tokens=False))
  elapsed, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
  print(f"corpus: {len(docs)} documents, {chars / 1e6:.2f}M chars, {sum(lengths) / 1e6:.2f}M tokens; "
        f"tokens/doc median {lengths[len(lengths) // 2]}, max {lengths[-1]}; "
        f"{len(os.sched_getaffinity(0))} cores; seq_len {args.seq_len}, batch {args.batch_size}")
  print(f"tokenizer alone: {sum(lengths) / elapsed / 1e6:6.3f}M tokens/s  {cpu / elapsed:.2f} CPU s/s  "
        f"{sum(lengths) / max(cpu, 1e-9) / 1e6:.3f}M tokens per CPU-second", flush=True)
  os.environ["TOKENIZERS_PARALLELISM"] = "false"
  for mode in args.modes.split(","):
    spec = PackSpec(tokenizer, tokenizer.eos_token_id, args.seq_len, mode, args.pack_bins, args.tokenize_batch,
                    tokenize_threads=args.tokenize_threads)
    sources = {name: memory_documents(c, seed=i) for i, (name, c) in enumerate(corpora.items())}
    result = measure(lm_batches(sources, spec, args.batch_size, prefetch=args.prefetch), args.seconds)
    print(f"{mode:9s} {result['slots_per_s'] / 1e6:6.3f}M slot tokens/s  {result['real_per_s'] / 1e6:6.3f}M real "
          f"tokens/s  fill {100 * result['fill']:6.2f}%  {result['cpu_per_s']:.2f} CPU s/s  "
          f"{result['slots_per_s'] / max(result['cpu_per_s'], 1e-9) / 1e6:.3f}M per CPU-second  "
          f"({result['batches']} batches)", flush=True)


if __name__ == "__main__":
  main()
