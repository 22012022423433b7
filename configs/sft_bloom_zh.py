"""Chinese instruction tuning, the classic recipe: a Bloom model, alpaca-zh data, the
`Human: ...\n\nAssistant: ` template, max_len 256 (BELLE / Chinese-LLaMA-Alpaca style).

Import the base first (a local Hugging Face directory, e.g. bloom-389m-zh or bloomz-560m):
  python -m jaxllm.convert from-hf PATH/bloom-389m-zh runs/bloom-389m-zh
  python -m jaxllm.train --config configs/sft_bloom_zh.py --workdir runs/bloom-zh-sft \
    --config.data.path=alpaca_zh.json
Records are Alpaca-shaped ({instruction, input, output}, optional history) or chat-shaped.
The architecture is bloom-389m-zh's; for another base set --config.model.* to its shape
(init_from must match it).
"""

from configs.bloom_389m_zh import get_config as bloom_config


def get_config():
  config = bloom_config()
  config.task = "sft"
  config.init_from = "runs/bloom-389m-zh"
  config.data.update(source="jsonl", path="", seq_len=256, template="human_assistant",
                     tokenizer="runs/bloom-389m-zh/tokenizer", val_fraction=0.02, pad_multiple=32)
  config.train.update(steps=3000, batch_size=32, log_every=20, eval_every=500, eval_steps=10,
                      checkpoint_every=1000, sample_prompt="请介绍一下北京。", sample_tokens=128,
                      sample_temperature=0.7)
  config.optim.update(lr=2e-5, warmup_steps=100, min_lr=2e-6, weight_decay=0.0)
  return config
