"""GPT-2 small (124M) pretraining from scratch, the nanoGPT/llm.c reference shape.

Point it at a corpus: --config.data.path=FILE_OR_DIR (--config.data.source=jsonl and
--config.data.field=text for JSONL). A 50,257-token byte-level BPE is trained on it
first unless --config.data.tokenizer names one. One host of GPUs: pure data parallel.
"""

from jaxllm.config import default_config


def get_config():
  config = default_config()
  config.data.update(source="text", path="", seq_len=1024, tokenizer_vocab_size=50257)
  # 50304 = 50257 rounded up to a multiple of 128: the embedding shards evenly.
  config.model.update(vocab_size=50304, d_model=768, num_layers=12, num_heads=12, max_seq_len=1024,
                      dtype="bfloat16", param_dtype="float32")
  config.train.update(steps=20000, batch_size=64, grad_accum=1, log_every=50, eval_every=1000,
                      eval_steps=20, checkpoint_every=2000)
  config.optim.update(lr=6e-4, warmup_steps=700, min_lr=6e-5, weight_decay=0.1, b2=0.95)
  config.mesh.update(data=-1, fsdp=1, tensor=1)
  return config
