"""Continued pretraining of bloom-389m-zh (a Bloom model with a vocabulary cut to Chinese)
on Chinese text, e.g. one document a line as {"completion": ...}.

First import the weights and tokenizer from a local Hugging Face directory:
  python -m jaxllm.convert from-hf PATH/bloom-389m-zh runs/bloom-389m-zh
then: --config.init_from=runs/bloom-389m-zh --config.data.path=zh_text.jsonl
The architecture below is bloom-389m-zh's (24 layers, d_model 1024, 16 heads, ALiBi,
LayerNorm on the embeddings, vocabulary 42,437), so a from-scratch run has its shape too.
"""

from jaxllm.config import default_config


def get_config():
  config = default_config()
  config.data.update(source="jsonl", path="", field="completion", seq_len=512, val_fraction=0.02)
  config.model.update(vocab_size=42437, d_model=1024, num_layers=24, num_heads=16, max_seq_len=2048,
                      position="alibi", embed_norm=True, norm="layernorm", activation="gelu_tanh",
                      use_bias=True, tie_embeddings=True, dtype="bfloat16", param_dtype="float32")
  config.train.update(steps=5000, batch_size=32, log_every=20, eval_every=500, eval_steps=20,
                      checkpoint_every=1000)
  config.optim.update(lr=5e-5, warmup_steps=200, min_lr=5e-6, weight_decay=0.01)
  config.mesh.update(data=-1, fsdp=1, tensor=1)
  return config
