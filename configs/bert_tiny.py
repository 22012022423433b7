"""A tiny BERT masked-LM, pretrained from scratch on CPU in a few minutes.

The BERT recipe in miniature: a WordPiece tokenizer is trained on the corpus first (into
WORKDIR/tokenizer), documents are packed into `[CLS] ... [SEP]` blocks of seq_len tokens,
15% of the tokens are chosen for the loss (80% [MASK], 10% random, 10% kept), and 10% of
the documents are held out to measure MLM loss and masked-token accuracy. The default corpus
is the Python standard library's source (on every machine); any other source works, e.g.
  --config.data.source=text --config.data.path=wiki.txt --config.data.text_unit=line
Then: python -m jaxllm.fill_mask --checkpoint WORKDIR "for i in [MASK](10):"
"""

from jaxllm.config import default_config


def get_config():
  config = default_config()
  config.task = "mlm"
  config.data.source = "stdlib"
  config.data.max_chars = 2_000_000
  config.data.seq_len = 64
  config.data.val_fraction = 0.1
  config.mlm.lowercase = False        # code is case-sensitive
  config.model.update(family="bert", vocab_size=2048, d_model=128, num_layers=4, num_heads=4,
                      d_ff=512, max_seq_len=64, position="learned", norm="layernorm",
                      norm_eps=1e-12, activation="gelu", use_bias=True, tie_embeddings=True,
                      type_vocab_size=2, use_pooler=False)
  config.train.update(steps=800, batch_size=32, log_every=25, eval_every=100, eval_steps=8,
                      checkpoint_every=400)
  config.optim.update(lr=1e-3, warmup_steps=40, min_lr=1e-4, weight_decay=0.01, b2=0.98, eps=1e-6)
  return config
