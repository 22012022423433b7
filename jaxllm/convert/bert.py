"""BertForMaskedLM <-> jaxllm Bert (post-norm encoder, learned + token-type embeddings, tied MLM head).

HF BERT keeps q, k, v and every projection as torch Linear weights ([out, in]); the MLM
decoder shares the word embedding, so only `cls.predictions.bias` is its own tensor.
An encoder-only `BertModel` checkpoint imports too: its encoder exactly, and a masked-LM head
initialised as transformers initialises BertForMaskedLM's (`init_head`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxllm.convert.base import Architecture, Rule, copy, export_problems, linear, norm, refuse, reshape
from jaxllm.models.config import ModelConfig

_NAME = "BertForMaskedLM"
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "relu": "relu", "silu": "silu", "swish": "silu"}
_EXPORT_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}


def model_config(hf: Any) -> dict:
  act = hf.hidden_act if isinstance(hf.hidden_act, str) else None
  if act not in ACTIVATIONS:
    raise refuse(_NAME, "hidden_act", hf.hidden_act, f"supported: {', '.join(ACTIVATIONS)}")
  position = getattr(hf, "position_embedding_type", "absolute") or "absolute"
  if position != "absolute":
    raise refuse(_NAME, "position_embedding_type", position, "jaxllm's BERT has absolute positions")
  for option in ("is_decoder", "add_cross_attention"):
    if getattr(hf, option, False):
      raise refuse(_NAME, option, True, "jaxllm's BERT is an encoder")
  if not getattr(hf, "tie_word_embeddings", True):
    raise refuse(_NAME, "tie_word_embeddings", False, "the MLM head is tied to the word embeddings")
  return dict(family="bert", vocab_size=hf.vocab_size, d_model=hf.hidden_size,
              num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads, num_kv_heads=0,
              head_dim=hf.hidden_size // hf.num_attention_heads, d_ff=hf.intermediate_size,
              max_seq_len=hf.max_position_embeddings, position="learned", norm="layernorm",
              norm_eps=hf.layer_norm_eps, activation=ACTIVATIONS[act], use_bias=True,
              tie_embeddings=True, embed_norm=False, type_vocab_size=hf.type_vocab_size,
              use_pooler=False)


def export_problem(cfg: ModelConfig) -> str | None:
  return export_problems(cfg, dict(
      family="bert", position="learned", norm="layernorm", activation=tuple(_EXPORT_ACTIVATIONS),
      use_bias=True, tie_embeddings=True, num_kv_heads=cfg.num_heads,
      head_dim=cfg.d_model // cfg.num_heads, use_pooler=False))


def hf_config(cfg: ModelConfig) -> dict:
  return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
              num_attention_heads=cfg.num_heads, intermediate_size=cfg.d_ff,
              hidden_act=_EXPORT_ACTIVATIONS[cfg.activation], max_position_embeddings=cfg.max_seq_len,
              type_vocab_size=cfg.type_vocab_size, layer_norm_eps=cfg.norm_eps,
              hidden_dropout_prob=cfg.dropout_rate, attention_probs_dropout_prob=cfg.dropout_rate,
              tie_word_embeddings=True)


def rules(cfg: ModelConfig) -> list[Rule]:
  d, h, hd, ff = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.d_ff
  emb = "bert.embeddings"
  out = [copy(f"{emb}.word_embeddings.weight", "embed/embedding"),
         copy(f"{emb}.position_embeddings.weight", "pos_embed/embedding"),
         copy(f"{emb}.token_type_embeddings.weight", "type_embed/embedding")]
  out += norm(f"{emb}.LayerNorm", "embed_norm", cfg)
  for i in range(cfg.num_layers):
    hf, jx = f"bert.encoder.layer.{i}", f"layer_{i}"
    for name in ("query", "key", "value"):
      out.append(linear(f"{hf}.attention.self.{name}.weight", f"{jx}/attn/{name}/kernel", (d,), (h, hd)))
      out.append(reshape(f"{hf}.attention.self.{name}.bias", f"{jx}/attn/{name}/bias", (h, hd)))
    out.append(linear(f"{hf}.attention.output.dense.weight", f"{jx}/attn/out/kernel", (h, hd), (d,)))
    out.append(copy(f"{hf}.attention.output.dense.bias", f"{jx}/attn/out/bias"))
    out += norm(f"{hf}.attention.output.LayerNorm", f"{jx}/attn_norm", cfg)
    out.append(linear(f"{hf}.intermediate.dense.weight", f"{jx}/mlp/wi/kernel", (d,), (ff,)))
    out.append(copy(f"{hf}.intermediate.dense.bias", f"{jx}/mlp/wi/bias"))
    out.append(linear(f"{hf}.output.dense.weight", f"{jx}/mlp/wo/kernel", (ff,), (d,)))
    out.append(copy(f"{hf}.output.dense.bias", f"{jx}/mlp/wo/bias"))
    out += norm(f"{hf}.output.LayerNorm", f"{jx}/mlp_norm", cfg)
  out.append(linear("cls.predictions.transform.dense.weight", "mlm_dense/kernel", (d,), (d,)))
  out.append(copy("cls.predictions.transform.dense.bias", "mlm_dense/bias"))
  out += norm("cls.predictions.transform.LayerNorm", "mlm_norm", cfg)
  out.append(copy("cls.predictions.bias", "mlm_bias"))
  return out


HEAD_SEED = 0  # the initialised head is the same on every import


def init_head(hf: Any) -> dict[str, np.ndarray]:
  """BertForMaskedLM's head for a BertModel checkpoint, as transformers' _init_weights makes it:
  the transform's dense weight ~ N(0, initializer_range), biases 0, LayerNorm 1 and 0. The
  decoder needs nothing: it is the word embedding (tied)."""
  d = hf.hidden_size
  rng = np.random.default_rng(HEAD_SEED)
  return {"cls.predictions.transform.dense.weight":
              rng.normal(0.0, hf.initializer_range, (d, d)).astype(np.float32),  # [out, in]
          "cls.predictions.transform.dense.bias": np.zeros(d, np.float32),
          "cls.predictions.transform.LayerNorm.weight": np.ones(d, np.float32),
          "cls.predictions.transform.LayerNorm.bias": np.zeros(d, np.float32),
          "cls.predictions.bias": np.zeros(hf.vocab_size, np.float32)}


ARCHITECTURE = Architecture(
    name=_NAME, model_type="bert", auto_class="AutoModelForMaskedLM", model_config=model_config,
    export_problem=export_problem, hf_config=hf_config, rules=rules,
    # The decoder is the word embedding (tied) and its bias is cls.predictions.bias; hub checkpoints
    # saved from BertForPreTraining also carry the pooler and next-sentence head, which MLM does not use.
    ignored=(r"^cls\.predictions\.decoder\.(weight|bias)$", r"position_ids$", r"^(bert\.)?pooler\.",
             r"^cls\.seq_relationship\."),
    base_prefix="bert.", headless=("BertModel",), init_head=init_head)
