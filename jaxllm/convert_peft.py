"""Prompt-tuning and LoRA adapters to and from the Hugging Face PEFT format.

  python -m jaxllm.convert_peft to-peft WORKDIR ADAPTER_DIR [--base-model NAME_OR_PATH]
  python -m jaxllm.convert_peft from-peft ADAPTER_DIR RUN_DIR --base MODEL_DIR

`to-peft` reads the prompt or the LoRA adapters of a run (its latest checkpoint) and writes
adapter_config.json + adapter_model.safetensors, which `PeftModel.from_pretrained(base, dir)`
loads onto the same base model in transformers. `from-peft` turns a PEFT PROMPT_TUNING or
LORA adapter into a jaxllm run directory that references MODEL_DIR (a jaxllm model directory,
e.g. from `convert from-hf`) as its base, ready for `generate` or further training.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys

import json

import numpy as np
from flax import traverse_util

from jaxllm import checkpoint, model_dir, peft
from jaxllm.cli import ArgumentParser, run_command
from jaxllm.config_types import RunConfig
from jaxllm.convert import lora as lora_convert
from jaxllm.convert.exporter import pick_architecture
from jaxllm.errors import ConvertError
from jaxllm.models import ModelConfig, abstract_params, stacking
from jaxllm.models.lora import LORA_A, LORA_B


def export_run(run_dir: str, out_dir: str, base_model: str | None = None) -> None:
  run_config = checkpoint.read_run_config(run_dir)
  model_cfg = ModelConfig.from_config(run_config["model"])
  if model_cfg.lora_rank and model_cfg.num_virtual_tokens:
    raise ConvertError(f"{run_dir}: the run has a prompt and LoRA adapters; a PEFT adapter holds one kind. "
                       "Merge the LoRA into the base with `to-hf --merge-lora` first.")
  if model_cfg.lora_rank:
    export_lora(run_dir, out_dir, run_config, model_cfg, base_model)
    return
  if not model_cfg.num_virtual_tokens:
    raise ConvertError(f"{run_dir}: model.num_virtual_tokens and model.lora_rank are 0; not a prompt-tuning "
                       "or LoRA run (export a plain model with `to-hf`).")
  model = abstract_params(model_cfg)
  params = checkpoint.load_params(run_dir, {"prompt": model["prompt"]}, expected=model)
  saved = RunConfig.from_config(run_config, strict=False)
  peft.to_peft(np.asarray(params["prompt"]["embedding"]), out_dir, model_cfg,
               base_model_name_or_path=base_model or saved.init_from or None,
               init_text=saved.train.prompt_init_text, tokenizer_name_or_path=saved.data.tokenizer or None)


def export_lora(run_dir: str, out_dir: str, run_config: dict, model_cfg: ModelConfig,
                base_model: str | None) -> None:
  """Writes the run's LoRA adapters as a PEFT LORA adapter for its base's HF architecture."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  arch = pick_architecture(model_cfg)
  model = traverse_util.flatten_dict(abstract_params(model_cfg))
  adapters = {k: v for k, v in model.items() if k[-1] in (LORA_A, LORA_B)}
  params = checkpoint.load_params(run_dir, traverse_util.unflatten_dict(adapters),
                                  expected=traverse_util.unflatten_dict(model))
  flat = stacking.UnrolledView(traverse_util.flatten_dict(params, sep="/"))
  tensors, fields = lora_convert.to_peft_tensors(flat, arch, model_cfg)
  os.makedirs(out_dir, exist_ok=True)
  weights = os.path.join(out_dir, peft.PEFT_WEIGHTS)
  save_file(tensors, weights + ".tmp", metadata={"format": "pt"})
  os.replace(weights + ".tmp", weights)
  checkpoint.write_json(os.path.join(out_dir, peft.PEFT_CONFIG), lora_convert.peft_config(
      fields, model_cfg, base_model or RunConfig.from_config(run_config, strict=False).init_from or None))


def import_lora(adapter_dir: str, peft_config: dict, base_dir: str, out_dir: str) -> None:
  """A PEFT LORA adapter -> a jaxllm LoRA run directory on the base model directory `base_dir`."""
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  lora_convert.check_supported(peft_config, adapter_dir)
  weights = os.path.join(adapter_dir, peft.PEFT_WEIGHTS)
  if not os.path.isfile(weights):
    raise FileNotFoundError(f"{adapter_dir}: no {peft.PEFT_WEIGHTS} (adapters saved as .bin need "
                            "`save_pretrained(safe_serialization=True)`).")
  base_config = checkpoint.read_run_config(base_dir)
  base_cfg = ModelConfig.from_config(base_config["model"])
  flat, lora_keys = lora_convert.from_peft_tensors(load_file(weights), peft_config, pick_architecture(base_cfg),
                                                   base_cfg, adapter_dir)
  run_config = copy.deepcopy(base_config)
  run_config["model"].update(lora_keys)
  run_config["init_from"] = os.path.abspath(base_dir)
  run_config.setdefault("train", {})["trainable"] = ""  # a LoRA run trains its adapters
  model_cfg = ModelConfig.from_config(run_config["model"])
  flat = lora_convert.shaped_adapters(flat, model_cfg)
  params = traverse_util.unflatten_dict({k: v.astype(model_cfg.weight_dtype) for k, v in flat.items()}, sep="/")
  model_dir.save_model_dir(out_dir, run_config, stacking.like(params, model_cfg.scan_layers))
  _copy_tokenizer(base_dir, out_dir)


def _copy_tokenizer(base_dir: str, out_dir: str) -> None:
  base_tokenizer = os.path.join(base_dir, "tokenizer")
  if os.path.isdir(base_tokenizer) and not os.path.isdir(os.path.join(out_dir, "tokenizer")):
    shutil.copytree(base_tokenizer, os.path.join(out_dir, "tokenizer"))


def _peft_type(adapter_dir: str) -> tuple[str | None, dict]:
  config_path = os.path.join(adapter_dir, peft.PEFT_CONFIG)
  if not os.path.isfile(config_path):
    return None, {}
  with open(config_path, encoding="utf-8") as f:
    try:
      config = json.load(f)
    except ValueError as e:
      raise ConvertError(f"{config_path} is not JSON ({e}).") from e
  return config.get("peft_type"), config


def import_adapter(adapter_dir: str, base_dir: str, out_dir: str) -> None:
  peft_type, config = _peft_type(adapter_dir) if os.path.isdir(adapter_dir) else (None, {})
  if peft_type == "LORA":
    import_lora(adapter_dir, config, base_dir, out_dir)
    return
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
  _copy_tokenizer(base_dir, out_dir)


def main(argv: list[str] | None = None, prog: str = "python -m jaxllm.convert_peft") -> int:
  parser = ArgumentParser(prog=prog, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  # SRC DST like to-hf / from-hf; the older --run/--out (--adapter/--out) spelling still works.
  to = sub.add_parser("to-peft", help="a jaxllm prompt-tuning or LoRA run -> PEFT adapter directory")
  to.add_argument("src", nargs="?", help="the run's workdir")
  to.add_argument("dst", nargs="?", help="adapter directory to write")
  to.add_argument("--run", help="alias of SRC")
  to.add_argument("--out", help="alias of DST")
  to.add_argument("--base-model", default=None,
                  help="base_model_name_or_path to record (default: the run's init_from)")
  frm = sub.add_parser("from-peft", help="PEFT PROMPT_TUNING or LORA adapter -> jaxllm run directory")
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
