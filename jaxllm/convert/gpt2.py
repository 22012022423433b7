"""GPT2LMHeadModel <-> jaxllm GPT (learned positions, LayerNorm, GELU, biases).

HF GPT-2 stores its projections as Conv1D ([in, out], no transpose needed) and fuses
q, k and v into one `c_attn` tensor laid out [d_model, 3, heads, head_dim].
"""

from __future__ import annotations

from typing import Any

from jaxllm.convert.base import Architecture, Rule, conv1d, copy, export_problems, fused, linear, norm, refuse
from jaxllm.models.config import ModelConfig

_NAME = "GPT2LMHeadModel"
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
               "relu": "relu", "silu": "silu", "swish": "silu"}
_EXPORT_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}


def model_config(hf: Any) -> dict:
  if hf.activation_function not in ACTIVATIONS:
    raise refuse(_NAME, "activation_function", hf.activation_function,
                 f"supported: {', '.join(ACTIVATIONS)}")
  for option, unsupported in (("scale_attn_by_inverse_layer_idx", True), ("scale_attn_weights", False),
                              ("add_cross_attention", True)):
    if getattr(hf, option, not unsupported) == unsupported:
      raise refuse(_NAME, option, unsupported)
  return dict(family="gpt", vocab_size=hf.vocab_size, d_model=hf.n_embd, num_layers=hf.n_layer,
              num_heads=hf.n_head, num_kv_heads=0, head_dim=hf.n_embd // hf.n_head,
              d_ff=hf.n_inner or 4 * hf.n_embd, max_seq_len=hf.n_positions, position="learned",
              norm="layernorm", norm_eps=hf.layer_norm_epsilon,
              activation=ACTIVATIONS[hf.activation_function], use_bias=True,
              tie_embeddings=bool(hf.tie_word_embeddings), embed_norm=False)


def export_problem(cfg: ModelConfig) -> str | None:
  return export_problems(cfg, dict(
      family="gpt", position="learned", norm="layernorm", activation=tuple(_EXPORT_ACTIVATIONS),
      use_bias=True, embed_norm=False, num_kv_heads=cfg.num_heads, head_dim=cfg.d_model // cfg.num_heads))


def hf_config(cfg: ModelConfig) -> dict:
  return dict(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model,
              n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.d_ff,
              activation_function=_EXPORT_ACTIVATIONS[cfg.activation], layer_norm_epsilon=cfg.norm_eps,
              tie_word_embeddings=cfg.tie_embeddings, resid_pdrop=cfg.dropout_rate,
              embd_pdrop=cfg.dropout_rate, attn_pdrop=cfg.dropout_rate)


def rules(cfg: ModelConfig) -> list[Rule]:
  d, h, hd, ff = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.d_ff
  qkv = ("query", "key", "value")
  out = [copy("transformer.wte.weight", "embed/embedding"),
         copy("transformer.wpe.weight", "pos_embed/embedding")]
  for i in range(cfg.num_layers):
    hf, jx = f"transformer.h.{i}", f"layer_{i}"
    out += norm(f"{hf}.ln_1", f"{jx}/attn_norm", cfg)
    out.append(fused(f"{hf}.attn.c_attn.weight", tuple(f"{jx}/attn/{n}/kernel" for n in qkv),
                     merged_shape=(d, 3 * h * hd), split_shape=(d, 3, h, hd), axis=1))
    out.append(fused(f"{hf}.attn.c_attn.bias", tuple(f"{jx}/attn/{n}/bias" for n in qkv),
                     merged_shape=(3 * h * hd,), split_shape=(3, h, hd), axis=0))
    out.append(conv1d(f"{hf}.attn.c_proj.weight", f"{jx}/attn/out/kernel", (h, hd), (d,)))
    out.append(copy(f"{hf}.attn.c_proj.bias", f"{jx}/attn/out/bias"))
    out += norm(f"{hf}.ln_2", f"{jx}/mlp_norm", cfg)
    out.append(conv1d(f"{hf}.mlp.c_fc.weight", f"{jx}/mlp/wi/kernel", (d,), (ff,)))
    out.append(copy(f"{hf}.mlp.c_fc.bias", f"{jx}/mlp/wi/bias"))
    out.append(conv1d(f"{hf}.mlp.c_proj.weight", f"{jx}/mlp/wo/kernel", (ff,), (d,)))
    out.append(copy(f"{hf}.mlp.c_proj.bias", f"{jx}/mlp/wo/bias"))
  out += norm("transformer.ln_f", "final_norm", cfg)
  if not cfg.tie_embeddings:
    out.append(linear("lm_head.weight", "lm_head/kernel", (d,), (cfg.vocab_size,)))
  return out


ARCHITECTURE = Architecture(
    name=_NAME, model_type="gpt2", auto_class="AutoModelForCausalLM", model_config=model_config,
    export_problem=export_problem, hf_config=hf_config, rules=rules,
    # The causal-mask buffers older checkpoints saved alongside the weights.
    ignored=(r"\.attn\.bias$", r"\.attn\.masked_bias$"), base_prefix="transformer.")
