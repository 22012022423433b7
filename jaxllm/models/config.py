"""The model's hyperparameters as one frozen dataclass, built from `config.model`."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Every linear layer of the blocks, as QLoRA (Dettmers et al. 2023) found best.
DEFAULT_LORA_TARGETS = r"attn/(query|key|value|out)$|mlp/(wi|wo|wi_gate|wi_up)$"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything a model needs to know about its shape and numerics.

  One config covers GPT-2 (learned positions, LayerNorm, GELU, biases, tied
  embeddings), LLaMA (RMSNorm, SwiGLU, rotary, grouped-query attention, no
  biases, untied head) and Bloom (ALiBi, LayerNorm on the embeddings).
  """
  vocab_size: int = 50257
  d_model: int = 768
  num_layers: int = 12
  num_heads: int = 12
  num_kv_heads: int = 0          # 0 means num_heads (multi-head attention)
  head_dim: int = 0              # 0 means d_model // num_heads
  d_ff: int = 0                  # 0 means 4 * d_model
  max_seq_len: int = 1024
  family: str = "gpt"            # gpt | bert
  position: str = "learned"      # learned | rotary | alibi | none
  norm: str = "layernorm"        # layernorm | rmsnorm
  norm_eps: float = 1e-5
  activation: str = "gelu_tanh"  # gelu_tanh | gelu | relu | silu | swiglu | geglu
  use_bias: bool = True
  tie_embeddings: bool = True
  embed_norm: bool = False       # Bloom: LayerNorm right after the token embedding
  rope_theta: float = 10000.0
  dropout_rate: float = 0.0
  init_std: float = 0.02
  dtype: str = "float32"         # compute dtype
  param_dtype: str = "float32"   # storage dtype of the master weights
  remat: str = "none"            # none | dots | full
  attention_impl: str = "auto"   # auto | xla | cpu | cudnn | pallas_gpu | splash (docs/attention.md)
  # auto: cpu_vjp on the CPU backend, xla elsewhere | xla: plain lax.dot_general |
  # cpu_vjp: Dense backwards laid out for XLA CPU (jaxllm/models/cpu_matmul.py)
  matmul_impl: str = "auto"
  scan_layers: bool = True       # the blocks under nn.scan, parameters stacked `layers/...` [num_layers, ...]
  # Layers per iteration of the scanned loop: 0 = auto (on the CPU backend all of them up to 12
  # layers, where XLA CPU's loop costs more step time than the longer program costs compile
  # time; 1 elsewhere and for deeper models). Parameters stay stacked either way.
  scan_unroll: int = 0
  num_virtual_tokens: int = 0    # prompt tuning: learned embeddings `prompt/embedding` before every input
  # LoRA (jaxllm/models/lora.py): rank 0 = off; adapters on the linear layers whose module path
  # ("layers/attn/query", "layer_3/mlp/wi") the regex lora_targets matches; scale lora_alpha / rank.
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_targets: str = DEFAULT_LORA_TARGETS
  # BERT only.
  type_vocab_size: int = 2
  use_pooler: bool = False

  def __post_init__(self):
    num_kv_heads = self.num_kv_heads or self.num_heads
    object.__setattr__(self, "num_kv_heads", num_kv_heads)
    object.__setattr__(self, "head_dim", self.head_dim or self.d_model // self.num_heads)
    object.__setattr__(self, "d_ff", self.d_ff or 4 * self.d_model)
    if self.num_heads % num_kv_heads:
      raise ValueError(
          f"model.num_heads={self.num_heads} is not a multiple of model.num_kv_heads="
          f"{num_kv_heads}; grouped-query attention needs whole groups.")
    for name, allowed in (("position", ("learned", "rotary", "alibi", "none")),
                          ("norm", ("layernorm", "rmsnorm")),
                          ("activation", ("gelu_tanh", "gelu", "relu", "silu", "swiglu", "geglu")),
                          ("remat", ("none", "dots", "full")),
                          ("attention_impl", ("auto", "xla", "cpu", "cudnn", "pallas_gpu", "splash")),
                          ("matmul_impl", ("auto", "xla", "cpu_vjp")),
                          ("dtype", tuple(_DTYPES)), ("param_dtype", tuple(_DTYPES)),
                          ("family", ("gpt", "bert"))):
      if getattr(self, name) not in allowed:
        raise ValueError(f"model.{name}={getattr(self, name)!r} is not one of {allowed}.")
    if self.lora_rank < 0 or not 0.0 <= self.lora_dropout < 1.0:
      raise ValueError(f"model.lora_rank={self.lora_rank} must be >= 0 (0 = off) and model.lora_dropout="
                       f"{self.lora_dropout} in [0, 1).")
    if self.lora_rank:
      try:
        re.compile(self.lora_targets)
      except re.error as e:
        raise ValueError(f"model.lora_targets={self.lora_targets!r} is not a regular expression ({e}).") from e
    if self.position == "rotary" and self.head_dim % 2:
      raise ValueError(f"rotary positions need an even head_dim, got {self.head_dim}.")

  @classmethod
  def from_config(cls, model_cfg: Any) -> "ModelConfig":
    """Builds from a ConfigDict (or dict), ignoring keys that are not model fields."""
    values = dict(model_cfg)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})

  @property
  def layers_per_scan_step(self) -> int:
    """`scan_unroll` resolved (when the model is traced): how many layers one loop iteration runs."""
    if self.scan_unroll > 0:
      return min(self.scan_unroll, self.num_layers)
    import jax  # pylint: disable=import-outside-toplevel
    return self.num_layers if jax.default_backend() == "cpu" and self.num_layers <= 12 else 1

  @property
  def cpu_matmul(self) -> bool:
    """Whether the blocks use the CPU-laid-out matmul backwards (resolved when the model is traced)."""
    if self.matmul_impl == "auto":
      import jax  # pylint: disable=import-outside-toplevel
      return jax.default_backend() == "cpu"
    return self.matmul_impl == "cpu_vjp"

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return _DTYPES[self.param_dtype]

  def num_params(self, include_embeddings: bool = True) -> int:
    """Parameter count from the shapes (no model build needed)."""
    d, h, kv, hd, ff = self.d_model, self.num_heads, self.num_kv_heads, self.head_dim, self.d_ff
    gated = self.activation in ("swiglu", "geglu")
    attn = d * hd * (h + 2 * kv) + h * hd * d
    mlp = d * ff * (3 if gated else 2)
    ln_terms = 2 if self.norm == "layernorm" and self.use_bias else 1  # scale (+ bias)
    norms = 2 * d * ln_terms
    biases = (hd * (h + 2 * kv) + d + ff * (2 if gated else 1) + d) if self.use_bias else 0
    norm_size = d * ln_terms
    total = self.num_layers * (attn + mlp + norms + biases) + norm_size * (2 if self.embed_norm else 1)
    if self.family == "bert":  # MLM head transform (+ pooler); embed_norm stands where final_norm is
      total += (d * d + d) * (2 if self.use_pooler else 1) + norm_size
    if include_embeddings:
      if self.family == "bert":
        total += self.type_vocab_size * d + self.vocab_size  # token types, MLM output bias
      total += self.vocab_size * d
      if not self.tie_embeddings:
        total += self.vocab_size * d
      if self.position == "learned":
        total += self.max_seq_len * d
    return total

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12 * L * H * Q * T (PaLM appendix B, as in nanoGPT).

    N counts the non-embedding weights plus the output projection (its matmul is
    real work even when tied); the second term is the attention scores and values.
    """
    n = self.num_params(include_embeddings=False) + self.vocab_size * self.d_model
    return 6 * n + 12 * self.num_layers * self.num_heads * self.head_dim * seq_len

  def matmul_flops_per_token(self, seq_len: int, causal: bool = True) -> float:
    """Training FLOPs per token of the matmuls alone, counted as MaxText counts them
    (`calculate_tflops_training_per_device`): 3 x the forward (forward + backward), the weight
    matmuls (q, k, v, out, MLP, output projection; no biases or norms) plus the attention scores
    and values, halved under a causal mask since only the lower triangle is real work.
    """
    d, h, kv, hd, ff = self.d_model, self.num_heads, self.num_kv_heads, self.head_dim, self.d_ff
    mlp_in = 2 if self.activation in ("swiglu", "geglu") else 1
    weights = d * hd * (h + 2 * kv) + h * hd * d + d * ff * (mlp_in + 1)
    attention = 2 * 2 * seq_len * h * hd  # q k^T and p v: 2 FLOPs per multiply-add
    if causal:
      attention //= 2
    forward = 2 * (self.num_layers * weights + self.vocab_size * d) + self.num_layers * attention
    return 3 * forward
