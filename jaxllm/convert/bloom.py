"""BloomForCausalLM <-> jaxllm GPT (ALiBi, LayerNorm after the embedding, GELU, biases).

Bloom fuses q, k and v into one `query_key_value` Linear whose output is laid out
[heads, 3, head_dim]: the three are interleaved per head, not concatenated.
"""

from __future__ import annotations

from typing import Any

from jaxllm.convert.base import Architecture, Rule, copy, export_problems, fused, linear, norm, refuse
from jaxllm.models.config import ModelConfig

_NAME = "BloomForCausalLM"
# Bloom has no position table, so no length limit of its own; the published models trained on 2048.
DEFAULT_MAX_SEQ_LEN = 2048


def model_config(hf: Any) -> dict:
  if hf.apply_residual_connection_post_layernorm:
    raise refuse(_NAME, "apply_residual_connection_post_layernorm", True,
                 "jaxllm blocks add the residual before the norm")
  d, h = hf.hidden_size, hf.n_head
  return dict(family="gpt", vocab_size=hf.vocab_size, d_model=d, num_layers=hf.n_layer, num_heads=h,
              num_kv_heads=0, head_dim=d // h, d_ff=4 * d,
              max_seq_len=getattr(hf, "seq_length", None) or DEFAULT_MAX_SEQ_LEN, position="alibi",
              norm="layernorm", norm_eps=hf.layer_norm_epsilon, activation="gelu_tanh", use_bias=True,
              tie_embeddings=bool(hf.tie_word_embeddings), embed_norm=True)


def export_problem(cfg: ModelConfig) -> str | None:
  return export_problems(cfg, dict(
      family="gpt", position="alibi", norm="layernorm", activation="gelu_tanh", use_bias=True,
      embed_norm=True, num_kv_heads=cfg.num_heads, head_dim=cfg.d_model // cfg.num_heads,
      d_ff=4 * cfg.d_model))


def hf_config(cfg: ModelConfig) -> dict:
  return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, n_layer=cfg.num_layers,
              n_head=cfg.num_heads, layer_norm_epsilon=cfg.norm_eps,
              tie_word_embeddings=cfg.tie_embeddings, hidden_dropout=cfg.dropout_rate,
              attention_dropout=cfg.dropout_rate)


def rules(cfg: ModelConfig) -> list[Rule]:
  d, h, hd, ff = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.d_ff
  qkv = ("query", "key", "value")
  out = [copy("transformer.word_embeddings.weight", "embed/embedding")]
  out += norm("transformer.word_embeddings_layernorm", "embed_norm", cfg)
  for i in range(cfg.num_layers):
    hf, jx = f"transformer.h.{i}", f"layer_{i}"
    out += norm(f"{hf}.input_layernorm", f"{jx}/attn_norm", cfg)
    out.append(fused(f"{hf}.self_attention.query_key_value.weight",
                     tuple(f"{jx}/attn/{n}/kernel" for n in qkv),
                     merged_shape=(d, h * 3 * hd), split_shape=(d, h, 3, hd), axis=2, transpose=True))
    out.append(fused(f"{hf}.self_attention.query_key_value.bias",
                     tuple(f"{jx}/attn/{n}/bias" for n in qkv),
                     merged_shape=(h * 3 * hd,), split_shape=(h, 3, hd), axis=1))
    out.append(linear(f"{hf}.self_attention.dense.weight", f"{jx}/attn/out/kernel", (h, hd), (d,)))
    out.append(copy(f"{hf}.self_attention.dense.bias", f"{jx}/attn/out/bias"))
    out += norm(f"{hf}.post_attention_layernorm", f"{jx}/mlp_norm", cfg)
    out.append(linear(f"{hf}.mlp.dense_h_to_4h.weight", f"{jx}/mlp/wi/kernel", (d,), (ff,)))
    out.append(copy(f"{hf}.mlp.dense_h_to_4h.bias", f"{jx}/mlp/wi/bias"))
    out.append(linear(f"{hf}.mlp.dense_4h_to_h.weight", f"{jx}/mlp/wo/kernel", (ff,), (d,)))
    out.append(copy(f"{hf}.mlp.dense_4h_to_h.bias", f"{jx}/mlp/wo/bias"))
  out += norm("transformer.ln_f", "final_norm", cfg)
  if not cfg.tie_embeddings:
    out.append(linear("lm_head.weight", "lm_head/kernel", (d,), (cfg.vocab_size,)))
  return out


ARCHITECTURE = Architecture(
    name=_NAME, model_type="bloom", auto_class="AutoModelForCausalLM", model_config=model_config,
    export_problem=export_problem, hf_config=hf_config, rules=rules, base_prefix="transformer.")
