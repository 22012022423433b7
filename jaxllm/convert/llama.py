"""LlamaForCausalLM <-> jaxllm GPT (rotary, RMSNorm, SwiGLU, grouped-query attention).

HF LLaMA applies rotary to the halves (i, i + head_dim/2) of each head ("rotate
half"), which is jaxllm's layout too, so q and k need no permutation.
"""

from __future__ import annotations

from typing import Any

from jaxllm.convert.base import Architecture, ConvertError, Rule, copy, export_problems, linear, norm, refuse, reshape
from jaxllm.models.config import ModelConfig

_NAME = "LlamaForCausalLM"
ACTIVATIONS = {"silu": "swiglu", "gelu": "geglu"}
_EXPORT_ACTIVATIONS = {v: k for k, v in ACTIVATIONS.items()}


def rope_theta(hf: Any) -> float:
  """The rotary base, refusing any scaling (transformers 5 `rope_parameters`, 4.x `rope_scaling`)."""
  params = getattr(hf, "rope_parameters", None)
  if params:
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
      raise refuse(_NAME, "rope_type", rope_type, "only plain rotary; rope scaling is not implemented")
    return float(params.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))
  scaling = getattr(hf, "rope_scaling", None)
  if scaling:
    raise refuse(_NAME, "rope_scaling", scaling, "only plain rotary; rope scaling is not implemented")
  return float(getattr(hf, "rope_theta", 10000.0))


def model_config(hf: Any) -> dict:
  if hf.hidden_act not in ACTIVATIONS:
    raise refuse(_NAME, "hidden_act", hf.hidden_act, f"supported: {', '.join(ACTIVATIONS)}")
  attention_bias, mlp_bias = bool(hf.attention_bias), bool(getattr(hf, "mlp_bias", False))
  if attention_bias != mlp_bias:
    raise ConvertError(f"{_NAME} with attention_bias={attention_bias} but mlp_bias={mlp_bias} is not "
                       "supported: jaxllm's model.use_bias switches both together.")
  head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
  return dict(family="gpt", vocab_size=hf.vocab_size, d_model=hf.hidden_size,
              num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
              num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads, head_dim=head_dim,
              d_ff=hf.intermediate_size, max_seq_len=hf.max_position_embeddings, position="rotary",
              norm="rmsnorm", norm_eps=hf.rms_norm_eps, activation=ACTIVATIONS[hf.hidden_act],
              use_bias=attention_bias, tie_embeddings=bool(hf.tie_word_embeddings), embed_norm=False,
              rope_theta=rope_theta(hf))


def export_problem(cfg: ModelConfig) -> str | None:
  return export_problems(cfg, dict(family="gpt", position="rotary", norm="rmsnorm",
                                   activation=tuple(_EXPORT_ACTIVATIONS), embed_norm=False))


def hf_config(cfg: ModelConfig) -> dict:
  return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
              num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
              max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
              hidden_act=_EXPORT_ACTIVATIONS[cfg.activation], tie_word_embeddings=cfg.tie_embeddings,
              attention_bias=cfg.use_bias, mlp_bias=cfg.use_bias, attention_dropout=cfg.dropout_rate,
              rope_theta=cfg.rope_theta,
              rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})


def rules(cfg: ModelConfig) -> list[Rule]:
  d, h, kv, hd, ff = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff
  out = [copy("model.embed_tokens.weight", "embed/embedding")]
  for i in range(cfg.num_layers):
    hf, jx = f"model.layers.{i}", f"layer_{i}"
    out += norm(f"{hf}.input_layernorm", f"{jx}/attn_norm", cfg)
    for proj, name, heads in (("q_proj", "query", h), ("k_proj", "key", kv), ("v_proj", "value", kv)):
      out.append(linear(f"{hf}.self_attn.{proj}.weight", f"{jx}/attn/{name}/kernel", (d,), (heads, hd)))
      if cfg.use_bias:
        out.append(reshape(f"{hf}.self_attn.{proj}.bias", f"{jx}/attn/{name}/bias", (heads, hd)))
    out.append(linear(f"{hf}.self_attn.o_proj.weight", f"{jx}/attn/out/kernel", (h, hd), (d,)))
    out += norm(f"{hf}.post_attention_layernorm", f"{jx}/mlp_norm", cfg)
    for proj, name, n_in, n_out in (("gate_proj", "wi_gate", d, ff), ("up_proj", "wi_up", d, ff),
                                    ("down_proj", "wo", ff, d)):
      out.append(linear(f"{hf}.mlp.{proj}.weight", f"{jx}/mlp/{name}/kernel", (n_in,), (n_out,)))
      if cfg.use_bias:
        out.append(copy(f"{hf}.mlp.{proj}.bias", f"{jx}/mlp/{name}/bias"))
    if cfg.use_bias:
      out.append(copy(f"{hf}.self_attn.o_proj.bias", f"{jx}/attn/out/bias"))
  out += norm("model.norm", "final_norm", cfg)
  if not cfg.tie_embeddings:
    out.append(linear("lm_head.weight", "lm_head/kernel", (d,), (cfg.vocab_size,)))
  return out


ARCHITECTURE = Architecture(
    name=_NAME, model_type="llama", auto_class="AutoModelForCausalLM", model_config=model_config,
    export_problem=export_problem, hf_config=hf_config, rules=rules,
    ignored=(r"rotary_emb\.inv_freq$",), base_prefix="model.")
