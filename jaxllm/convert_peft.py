"""Prompt-tuning adapters to and from the Hugging Face PEFT format.

  python -m jaxllm.convert_peft to-peft WORKDIR ADAPTER_DIR [--base-model NAME_OR_PATH]
  python -m jaxllm.convert_peft from-peft ADAPTER_DIR RUN_DIR --base MODEL_DIR

`to-peft` reads the prompt of a prompt-tuning run (its latest checkpoint) and writes
adapter_config.json + adapter_model.safetensors, which `PeftModel.from_pretrained(base, dir)`
loads onto the same base model in transformers. `from-peft` turns a PEFT PROMPT_TUNING
adapter into a jaxllm run directory that references MODEL_DIR (a jaxllm model directory,
e.g. from `convert from-hf`) as its base, ready for `generate` or further training.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys

import numpy as np

from jaxllm import checkpoint, model_dir, peft
from jaxllm.cli import ArgumentParser, run_command
from jaxllm.config_types import RunConfig
from jaxllm.errors import ConvertError
from jaxllm.models import ModelConfig, abstract_params


def export_run(run_dir: str, out_dir: str, base_model: str | None = None) -> None:
  run_config = checkpoint.read_run_config(run_dir)
  model_cfg = ModelConfig.from_config(run_config["model"])
  if not model_cfg.num_virtual_tokens:
    raise ConvertError(f"{run_dir}: model.num_virtual_tokens is 0; not a prompt-tuning run.")
  model = abstract_params(model_cfg)
  params = checkpoint.load_params(run_dir, {"prompt": model["prompt"]}, expected=model)
  saved = RunConfig.from_config(run_config, strict=False)
  peft.to_peft(np.asarray(params["prompt"]["embedding"]), out_dir, model_cfg,
               base_model_name_or_path=base_model or saved.init_from or None,
               init_text=saved.train.prompt_init_text, tokenizer_name_or_path=saved.data.tokenizer or None)


def import_adapter(adapter_dir: str, base_dir: str, out_dir: str) -> None:
  prompt, peft_config = peft.from_peft(adapter_dir)
  base_config = checkpoint.read_run_config(base_dir)
  d_model = base_config["model"]["d_model"]
  if prompt.shape[1] != d_model:
    raise ConvertError(f"{adapter_dir}: token_dim={prompt.shape[1]} does not match the base model's "
                       f"d_model={d_model} ({base_dir}); use the adapter's own base model.")
  run_config = copy.deepcopy(base_config)
  run_config["model"]["num_virtual_tokens"] = int(prompt.shape[0])
  run_config["init_from"] = os.path.abspath(base_dir)
  run_config.setdefault("train", {})["trainable"] = peft.PROMPT_PATTERN
  run_config["train"]["prompt_init_text"] = peft_config.get("prompt_tuning_init_text") or ""
  dtype = ModelConfig.from_config(run_config["model"]).weight_dtype
  model_dir.save_model_dir(out_dir, run_config, {"prompt": {"embedding": prompt.astype(dtype)}})
  base_tokenizer = os.path.join(base_dir, "tokenizer")
  if os.path.isdir(base_tokenizer) and not os.path.isdir(os.path.join(out_dir, "tokenizer")):
    shutil.copytree(base_tokenizer, os.path.join(out_dir, "tokenizer"))


def main(argv: list[str] | None = None, prog: str = "python -m jaxllm.convert_peft") -> int:
  parser = ArgumentParser(prog=prog, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  # SRC DST like to-hf / from-hf; the older --run/--out (--adapter/--out) spelling still works.
  to = sub.add_parser("to-peft", help="a jaxllm prompt-tuning run -> PEFT adapter directory")
  to.add_argument("src", nargs="?", help="the run's workdir")
  to.add_argument("dst", nargs="?", help="adapter directory to write")
  to.add_argument("--run", help="alias of SRC")
  to.add_argument("--out", help="alias of DST")
  to.add_argument("--base-model", default=None,
                  help="base_model_name_or_path to record (default: the run's init_from)")
  frm = sub.add_parser("from-peft", help="PEFT PROMPT_TUNING adapter -> jaxllm run directory")
  frm.add_argument("src", nargs="?", help="PEFT adapter directory")
  frm.add_argument("dst", nargs="?", help="run directory to write")
  frm.add_argument("--base", required=True, help="jaxllm model directory of the base model")
  frm.add_argument("--adapter", help="alias of SRC")
  frm.add_argument("--out", help="alias of DST")
  args = parser.parse_args(argv)
  src_flag = "--run" if args.command == "to-peft" else "--adapter"
  args.src = _one_of(parser, args.src, getattr(args, src_flag[2:]), "SRC", src_flag)
  args.dst = _one_of(parser, args.dst, args.out, "DST", "--out")
  return run_command(lambda: _convert_peft(args))


def _one_of(parser: argparse.ArgumentParser, positional: str | None, flag: str | None, name: str,
            flag_name: str) -> str:
  if positional and flag and positional != flag:
    parser.error(f"{name} is given twice ({positional!r} and {flag_name} {flag!r}); give it once")
  if not (positional or flag):
    parser.error(f"{name} is missing; write `{parser.prog} SUBCOMMAND SRC DST`")
  return positional or flag


def _convert_peft(args: argparse.Namespace) -> None:
  if args.command == "to-peft":
    export_run(args.src, args.dst, args.base_model)
  else:
    import_adapter(args.src, args.base, args.dst)
  print(f"wrote {args.dst}")


if __name__ == "__main__":
  sys.exit(main())
