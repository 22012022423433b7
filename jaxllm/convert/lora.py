"""LoRA adapters <-> Hugging Face PEFT LORA adapters, placed by the architecture's own rules.

No second name table: each block kernel's `Rule` (jaxllm/convert/gpt2.py, llama.py, ...) already
says which HF module holds it and how (a torch Linear [out, in], GPT-2's Conv1D [in, out], or a
fused q/k/v tensor). `module_maps` runs each rule's `to_hf` on kernels whose entries encode
(module, input index, output index), which gives, for every HF module, where each of its input
and output features lives in jaxllm's kernels. An adapter then moves by indexing:

- one jaxllm module per HF module: lora_A = A^T, lora_B = B^T, features permuted if the rule does;
- a fused module (GPT-2 `c_attn`, Bloom `query_key_value`): rank r x (adapted modules), lora_A the
  modules' A stacked, lora_B block-diagonal, lora_alpha scaled alike (`rank_pattern`,
  `alpha_pattern`), so the scale alpha/r and the product are the same: exact;
- back from PEFT: a fused module's A is every part's A, its B split by output rows. Rank
  components whose B row is all zero contribute nothing and are dropped (this undoes the
  block-diagonal export); adapters of other ranks are zero-padded to the largest, and a module
  whose scale differs from the adapter's own has it folded into B.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Mapping

import numpy as np

from jaxllm.convert.base import Architecture, ConvertError
from jaxllm.models import ModelConfig, abstract_params
from jaxllm.models.lora import LORA_A, LORA_B, input_ndim, is_block_kernel

PEFT_PREFIX = "base_model.model."


@dataclasses.dataclass(frozen=True)
class ModuleMap:
  """One HF linear module and the jaxllm modules (unrolled paths) it holds."""
  hf_module: str                 # "transformer.h.0.attn.c_attn"
  modules: tuple[str, ...]       # ("layer_0/attn/query", "layer_0/attn/key", ...)
  in_index: np.ndarray           # [hf in features] -> flat input index in the jaxllm kernels
  out_module: np.ndarray         # [hf out features] -> which of `modules`
  out_index: np.ndarray          # [hf out features] -> flat output index in that module's kernel
  fan_in_fan_out: bool           # the HF weight is [in, out] (GPT-2's Conv1D)


def _probe(rule, shapes: list[tuple[int, ...]]) -> tuple[np.ndarray, ...]:
  """(in_index, out_module, out_index, fan_in_fan_out) of one rule, from its to_hf on encoded kernels."""
  modules = [p.rsplit("/", 1)[0] for p in rule.params]
  n_ins = [math.prod(s[:input_ndim(m.split("/")[-1])]) for m, s in zip(modules, shapes)]
  n_outs = [math.prod(s) // n for s, n in zip(shapes, n_ins)]
  size_in, size_out = max(n_ins), max(n_outs)
  fakes = [((j * size_in + np.arange(n_in)[:, None]) * size_out + np.arange(n_out)[None, :])
           .astype(np.float64).reshape(shape)
           for j, (n_in, n_out, shape) in enumerate(zip(n_ins, n_outs, shapes))]
  code = np.asarray(rule.to_hf(*fakes)).astype(np.int64)
  assert code.ndim == 2, (rule.hf, code.shape)
  i = (code // size_out) % size_in
  fan_in_fan_out = bool((i == i[:, :1]).all())  # each row one input feature: [in, out]
  if not fan_in_fan_out:
    assert (i == i[:1, :]).all(), f"{rule.hf}: the probe finds no input axis"
    code = code.T  # torch Linear [out, in] -> [in, out]
  column = code[0]
  return (code[:, 0] // size_out % size_in, column // (size_in * size_out), column % size_out, fan_in_fan_out)


@functools.lru_cache(maxsize=16)
def _kernel_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  plain = dataclasses.replace(cfg, scan_layers=False, lora_rank=0, num_virtual_tokens=0)
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract_params(plain), sep="/").items()}


def module_maps(arch: Architecture, cfg: ModelConfig) -> list[ModuleMap]:
  """Every HF module that can carry a LoRA adapter (the blocks' linear layers), in rule order."""
  shapes = _kernel_shapes(cfg)
  probes: dict[Any, tuple] = {}
  out = []
  for rule in arch.rules(cfg):
    if not rule.hf.endswith(".weight") or not all(is_block_kernel(tuple(p.split("/"))) for p in rule.params):
      continue
    rule_shapes = [shapes[p] for p in rule.params]
    key = (re.sub(r"\d+", "#", rule.hf), tuple(rule_shapes))  # every layer's rule is laid out alike
    if key not in probes:
      probes[key] = _probe(rule, rule_shapes)
    in_index, out_module, out_index, fan_in_fan_out = probes[key]
    out.append(ModuleMap(rule.hf[:-len(".weight")], tuple(p.rsplit("/", 1)[0] for p in rule.params),
                         in_index, out_module, out_index, fan_in_fan_out))
  return out


def _module_regex(names: list[str]) -> str:
  """A regex that fullmatches exactly `names` (HF module names), layer numbers grouped."""
  groups: dict[str, list[str]] = {}
  for name in names:
    match = re.search(r"\.(\d+)\.", name)
    if match:
      groups.setdefault(re.escape(name[:match.start()]) + r"\.{}\." + re.escape(name[match.end():]), []
                        ).append(match.group(1))
    else:
      groups.setdefault(re.escape(name), [])
  parts = []
  for template, layers in groups.items():
    if not layers:
      parts.append(template)
    else:
      parts.append(template.replace("{}", "(" + "|".join(sorted(set(layers), key=int)) + ")"))
  return "|".join(f"({p})" for p in parts) if len(parts) > 1 else parts[0]


def _suffix(hf_module: str) -> str:
  """The part of an HF module name after its layer number ("attn.c_attn"), as a pattern key."""
  match = re.search(r"\.\d+\.", hf_module)
  return re.escape(hf_module[match.end():] if match else hf_module)


# ------------------------------------------------------------------------------- export

def to_peft_tensors(flat: Mapping[str, Any], arch: Architecture, cfg: ModelConfig
                    ) -> tuple[dict[str, np.ndarray], dict]:
  """({PEFT key: tensor}, the LoraConfig fields that depend on the weights) of a jaxllm model's
  adapters; `flat` is {"layer_i/attn/query/lora_a": array} (unrolled, e.g. stacking.UnrolledView)."""
  r = cfg.lora_rank
  tensors: dict[str, np.ndarray] = {}
  ranks, fan_in_fan_out = {}, set()
  for mm in module_maps(arch, cfg):
    adapted = [j for j, m in enumerate(mm.modules) if f"{m}/{LORA_A}" in flat]
    if not adapted:
      continue
    lora_a = np.zeros((r * len(adapted), len(mm.in_index)), np.float32)  # [rank, in]
    lora_b = np.zeros((len(mm.out_index), r * len(adapted)), np.float32)  # [out, rank]
    for slot, j in enumerate(adapted):
      a = np.asarray(flat[f"{mm.modules[j]}/{LORA_A}"], np.float32).reshape(-1, r)  # [in, r]
      b = np.asarray(flat[f"{mm.modules[j]}/{LORA_B}"], np.float32).reshape(r, -1)  # [r, out]
      cols = slice(slot * r, (slot + 1) * r)
      lora_a[cols] = a[mm.in_index].T
      rows = np.nonzero(mm.out_module == j)[0]
      lora_b[rows, cols] = b[:, mm.out_index[rows]].T
    tensors[f"{PEFT_PREFIX}{mm.hf_module}.lora_A.weight"] = lora_a
    tensors[f"{PEFT_PREFIX}{mm.hf_module}.lora_B.weight"] = lora_b
    ranks[mm.hf_module] = r * len(adapted)
    fan_in_fan_out.add(mm.fan_in_fan_out)
  if not tensors:
    raise ConvertError("the model has no LoRA adapter on a linear layer Hugging Face PEFT can hold.")
  # A fused module holding k adapters has rank k r and alpha k alpha: the same scale alpha / r.
  patterns = {_suffix(m): rank for m, rank in ranks.items() if rank != r}
  fields = {"r": r, "lora_alpha": cfg.lora_alpha, "target_modules": _module_regex(list(ranks)),
            "rank_pattern": patterns, "alpha_pattern": {k: cfg.lora_alpha * v / r for k, v in patterns.items()},
            "fan_in_fan_out": fan_in_fan_out == {True}}
  return tensors, fields


def peft_config(fields: dict, cfg: ModelConfig, base_model_name_or_path: str | None) -> dict:
  """adapter_config.json of a LoRA adapter (what `peft.LoraConfig.to_dict()` writes that matters)."""
  return {"peft_type": "LORA", "task_type": "CAUSAL_LM" if cfg.family == "gpt" else None,
          "inference_mode": True, "base_model_name_or_path": base_model_name_or_path, "revision": None,
          "lora_dropout": cfg.lora_dropout, "bias": "none", "use_rslora": False, "use_dora": False,
          "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
          "layers_pattern": None, **fields}


# ------------------------------------------------------------------------------- import

def _scale(peft_cfg: dict, hf_module: str, rank: int) -> float:
  """PEFT's scaling for one module: alpha / r (alpha / sqrt(r) with use_rslora), patterns applied."""
  alpha = peft_cfg.get("lora_alpha", 8)
  for key, value in (peft_cfg.get("alpha_pattern") or {}).items():
    if re.match(rf"(.*\.)?({key})$", hf_module):
      alpha = value
      break
  return alpha / (math.sqrt(rank) if peft_cfg.get("use_rslora") else rank)


def check_supported(peft_cfg: dict, where: str) -> None:
  """Refuses LoRA variants jaxllm does not compute (DoRA, trained biases, extra trained modules)."""
  if peft_cfg.get("peft_type") != "LORA":
    raise ConvertError(f"{where}: peft_type={peft_cfg.get('peft_type')!r}, not LORA.")
  for key, ok in (("use_dora", (False, None)), ("bias", ("none", None)), ("modules_to_save", (None,)),
                  ("trainable_token_indices", (None,)), ("lora_bias", (False, None))):
    value = peft_cfg.get(key)
    if value not in ok and value != []:
      raise ConvertError(f"{where}: {key}={value!r} is not supported; jaxllm's LoRA adapts linear layers "
                         "only (no DoRA, no trained biases or extra modules).")


def from_peft_tensors(tensors: Mapping[str, np.ndarray], peft_cfg: dict, arch: Architecture,
                      cfg: ModelConfig, where: str) -> tuple[dict[str, np.ndarray], dict]:
  """({"layer_i/attn/query/lora_a": array, ...} unrolled, the model.lora_* keys) of a PEFT adapter
  for the base `cfg`; refuses modules jaxllm has no adapter for and tensors that do not fit."""
  maps = {mm.hf_module: mm for mm in module_maps(arch, cfg)}
  pairs: dict[str, dict[str, np.ndarray]] = {}
  for key, tensor in tensors.items():
    match = re.fullmatch(rf"{re.escape(PEFT_PREFIX)}(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
    if not match:
      raise ConvertError(f"{where}: tensor {key!r} is not a LoRA A/B weight jaxllm can place "
                         "(embedding LoRA, DoRA magnitudes and trained biases are not supported).")
    pairs.setdefault(match.group(1), {})[match.group(2)] = np.asarray(tensor, np.float32)
  parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # jaxllm module -> (A [in, R], B [R, out])
  scales: dict[str, float] = {}
  for hf_module, ab in sorted(pairs.items()):
    if hf_module not in maps:
      raise ConvertError(f"{where}: the adapter has a LoRA on {hf_module}, which jaxllm's {arch.name} cannot "
                         f"adapt; it adapts the blocks' linear layers ({', '.join(list(maps)[:4])}, ...).")
    if set(ab) != {"lora_A", "lora_B"}:
      raise ConvertError(f"{where}: {hf_module} has {sorted(ab)} but a LoRA needs lora_A and lora_B.")
    mm, a_hf, b_hf = maps[hf_module], ab["lora_A"], ab["lora_B"]
    rank = a_hf.shape[0]
    if a_hf.shape != (rank, len(mm.in_index)) or b_hf.shape != (len(mm.out_index), rank):
      raise ConvertError(f"{where}: {hf_module} lora_A {list(a_hf.shape)} / lora_B {list(b_hf.shape)} do not fit "
                         f"the base model's {len(mm.out_index)} x {len(mm.in_index)} layer; use the adapter's own "
                         "base model.")
    inverse_in = np.argsort(mm.in_index)
    for j, module in enumerate(mm.modules):
      rows = np.nonzero(mm.out_module == j)[0]
      b = np.zeros((rank, len(rows)), np.float32)
      b[:, mm.out_index[rows]] = b_hf[rows].T
      a = a_hf[:, inverse_in].T  # [in, R]
      keep = np.any(b != 0, axis=1)
      if keep.any() and not keep.all():  # components that add nothing to this part (a fused export)
        a, b = a[:, keep], b[keep]
      parts[module] = (a, b)
      scales[module] = _scale(peft_cfg, hf_module, rank)
  if not parts:
    raise ConvertError(f"{where}: the adapter holds no LoRA weights.")
  rank = max(a.shape[1] for a, _ in parts.values())
  target = _scale(peft_cfg, "", peft_cfg.get("r", rank))  # the adapter's own scale; alpha_pattern keys name modules
  out = {}
  for module, (a, b) in parts.items():
    pad = rank - a.shape[1]
    if scales[module] != target:
      b = b * (scales[module] / target)
    out[f"{module}/{LORA_A}"] = np.pad(a, ((0, 0), (0, pad)))
    out[f"{module}/{LORA_B}"] = np.pad(b, ((0, pad), (0, 0)))
  return out, {"lora_rank": rank, "lora_alpha": target * rank, "lora_dropout": float(peft_cfg.get("lora_dropout") or 0.0),
               "lora_targets": _jaxllm_targets(sorted(parts))}


def _jaxllm_targets(modules: list[str]) -> str:
  """model.lora_targets covering the adapted module kinds ("attn/query"); scanned layers adapt every
  layer, so a layer without one in the adapter gets zeros (`complete_layers`)."""
  kinds = sorted({m.split("/", 1)[1] for m in modules})
  return "|".join(f"{re.escape(k)}$" for k in kinds)


def shaped_adapters(flat: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
  """`flat` ({module/lora_a: [in, rank]}) in the model's shapes ([*in, rank], [rank, *out]), with zero
  adapters for every layer `cfg.lora_targets` adapts but the adapter skipped (PEFT's
  layers_to_transform): zeros add nothing, and scanned layers need every layer's."""
  out = {}
  for key, leaf in _lora_shapes(cfg).items():
    out[key] = flat[key].reshape(leaf.shape) if key in flat else np.zeros(leaf.shape, np.float32)
  assert set(flat) <= set(out), sorted(set(flat) - set(out))
  return out


def _lora_shapes(cfg: ModelConfig) -> dict[str, Any]:
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  unrolled = dataclasses.replace(cfg, scan_layers=False)
  flat = traverse_util.flatten_dict(abstract_params(unrolled), sep="/")
  return {k: v for k, v in flat.items() if k.rsplit("/", 1)[-1] in (LORA_A, LORA_B)}
