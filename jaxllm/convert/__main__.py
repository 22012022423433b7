"""The conversion CLI.

  python -m jaxllm.convert from-hf HF_DIR OUT_DIR [--param-dtype float32] [--overwrite]
  python -m jaxllm.convert to-hf CKPT_DIR HF_DIR [--step N] [--max-shard-size 2GB] [--dtype float32] [--overwrite]
                                [--merge-lora]
  python -m jaxllm.convert to-peft RUN_DIR ADAPTER_DIR     (prompt tuning, LoRA; see jaxllm/convert_peft.py)
  python -m jaxllm.convert from-peft ADAPTER_DIR RUN_DIR --base MODEL_DIR
"""

from __future__ import annotations

import argparse
import os
import sys

from jaxllm.cli import ArgumentParser, run_command


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = ArgumentParser(prog="python -m jaxllm.convert",
                                   description="Convert models between Hugging Face and jaxllm.")
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("from-hf", help="a local Hugging Face model directory -> a jaxllm model directory")
  p.add_argument("hf_dir")
  p.add_argument("out_dir")
  p.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                 help="storage dtype of the jaxllm weights (default float32, the training master copy)")
  p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it is not empty")
  p = sub.add_parser("to-hf", help="a jaxllm workdir or model directory -> a Hugging Face model directory")
  p.add_argument("ckpt_dir")
  p.add_argument("hf_dir")
  p.add_argument("--step", type=int, default=None, help="checkpoint step to export (default: latest)")
  p.add_argument("--max-shard-size", default="2GB", help="largest safetensors file (default 2GB)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                 help="dtype of the written weights (default float32)")
  p.add_argument("--overwrite", action="store_true", help="replace HF_DIR if it is not empty")
  p.add_argument("--merge-lora", action="store_true",
                 help="a LoRA run: write the base with the adapters merged in (W + lora_alpha/rank A B)")
  # main hands these to jaxllm.convert_peft before parsing; listed here for --help and typos.
  sub.add_parser("to-peft", help="a jaxllm prompt-tuning or LoRA run -> a PEFT adapter directory", add_help=False)
  sub.add_parser("from-peft", help="a PEFT prompt-tuning or LoRA adapter -> a jaxllm run directory", add_help=False)
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] in (["to-peft"], ["from-peft"]):  # PEFT adapters (prompt tuning) have their own module
    from jaxllm.convert_peft import main as peft_main  # pylint: disable=import-outside-toplevel
    return peft_main(argv, prog="python -m jaxllm.convert")
  args = parse_args(argv)
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  return run_command(lambda: _convert(args))


def _convert(args: argparse.Namespace) -> None:
  from jaxllm.convert import from_hf, to_hf  # pylint: disable=import-outside-toplevel
  if args.command == "from-hf":
    cfg = from_hf(args.hf_dir, args.out_dir, param_dtype=args.param_dtype, overwrite=args.overwrite)
    print(f"wrote {args.out_dir}: {cfg.num_params() / 1e6:.2f}M parameters "
          f"({cfg.num_layers} layers, d_model {cfg.d_model}, {cfg.position} positions)")
    from jaxllm.convert.importer import head_note  # pylint: disable=import-outside-toplevel
    note = head_note(args.hf_dir)
    if note:
      print(note)
  else:
    arch = to_hf(args.ckpt_dir, args.hf_dir, step=args.step, max_shard_size=args.max_shard_size,
                 dtype=args.dtype, overwrite=args.overwrite, merge_lora=args.merge_lora)
    print(f"wrote {args.hf_dir} as {arch.name} (load with transformers.{arch.auto_class})")


if __name__ == "__main__":
  sys.exit(main())
