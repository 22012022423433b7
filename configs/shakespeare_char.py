"""nanoGPT's shakespeare_char CPU recipe: a 4-layer character-level GPT on tiny Shakespeare.

  python -m jaxllm.train --config configs/shakespeare_char.py --workdir runs/shakespeare \
      --config.data.path=/path/to/tinyshakespeare.txt

The published recipe (nanoGPT README, "I only have a macbook"): 4 layers, 4 heads,
d_model 128, context 64, batch 12, 2000 iterations, lr 1e-3 with 100 warmup steps
and cosine decay to 1e-4, beta2 0.99, no dropout; validation loss about 1.88.
As in nanoGPT the text is split 90/10 by position (the last 10% validates) and
every row starts at a random offset; evaluation is 20 batches every 250 steps.
nanoGPT's model has no biases (bias=False, LayerNorms included) and exact GELU, and
its AdamW decays every 2-D weight, the tied embedding included; its vocabulary is the
65 characters of the text (ours adds an EOS token that this data never uses).
"""

from jaxllm.config import default_config


def get_config():
  config = default_config()
  config.data.update(source="text", path="", text_unit="file", tokenizer="char", packing="windows",
                     val_fraction=0.1, seq_len=64)
  config.model.update(vocab_size=66, d_model=128, num_layers=4, num_heads=4, max_seq_len=64,
                      activation="gelu", use_bias=False, tie_embeddings=True, dropout_rate=0.0)
  config.train.update(steps=2000, batch_size=12, log_every=50, eval_every=250, eval_steps=20,
                      checkpoint_every=1000, sample_prompt="ROMEO:", sample_tokens=200,
                      sample_temperature=0.8, sample_top_k=200)
  config.optim.update(lr=1e-3, warmup_steps=100, min_lr=1e-4, b1=0.9, b2=0.99, weight_decay=0.1,
                      grad_clip=1.0, decay_embeddings=True)
  return config
