"""nanoGPT's shakespeare_char CPU recipe in PyTorch, for the wall-time comparison in docs/performance.md.

  python scripts/nanogpt_shakespeare_char.py --data /path/to/tinyshakespeare.txt [--out result.json]

A faithful condensation of karpathy/nanoGPT (model.py, train.py, data/shakespeare_char/
prepare.py) with the README's CPU command:
  train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
      --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
      --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0
Same model (no biases, exact GELU, tied embeddings, scaled c_proj init), AdamW with
decay on 2-D weights only, grad clip 1.0, warmup + cosine lr, random-offset batches,
a 90/10 split by position, and estimate_loss over train and val (20 batches each)
every 250 iterations, from iteration 0. The wall time counts everything from start-up.
"""

from __future__ import annotations

import argparse
import json
import math
import time

START = time.perf_counter()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402


class CausalSelfAttention(nn.Module):
  def __init__(self, n_embd, n_head, bias):
    super().__init__()
    self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
    self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
    self.n_head = n_head

  def forward(self, x):
    b, t, c = x.size()
    q, k, v = self.c_attn(x).split(c, dim=2)
    q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
    return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class MLP(nn.Module):
  def __init__(self, n_embd, bias):
    super().__init__()
    self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
    self.gelu = nn.GELU()
    self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)

  def forward(self, x):
    return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
  def __init__(self, n_embd, n_head, bias):
    super().__init__()
    self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
    self.attn = CausalSelfAttention(n_embd, n_head, bias)
    self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
    self.mlp = MLP(n_embd, bias)

  def forward(self, x):
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
  def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd, bias=False):
    super().__init__()
    self.transformer = nn.ModuleDict(dict(
        wte=nn.Embedding(vocab_size, n_embd), wpe=nn.Embedding(block_size, n_embd),
        h=nn.ModuleList([Block(n_embd, n_head, bias) for _ in range(n_layer)]),
        ln_f=nn.LayerNorm(n_embd, bias=bias)))
    self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
    self.transformer.wte.weight = self.lm_head.weight  # weight tying
    self.apply(self._init_weights)
    for name, p in self.named_parameters():
      if name.endswith("c_proj.weight"):
        torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

  @staticmethod
  def _init_weights(module):
    if isinstance(module, nn.Linear):
      torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
      if module.bias is not None:
        torch.nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
      torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

  def forward(self, idx, targets):
    t = idx.size(1)
    x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(t, dtype=torch.long))
    for block in self.transformer.h:
      x = block(x)
    logits = self.lm_head(self.transformer.ln_f(x))
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

  def configure_optimizers(self, weight_decay, learning_rate, betas):
    params = [p for p in self.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", required=True, help="tinyshakespeare.txt")
  parser.add_argument("--out", default="", help="write the result as JSON here")
  parser.add_argument("--max_iters", type=int, default=2000)
  parser.add_argument("--seed", type=int, default=1337)
  args = parser.parse_args()
  batch_size, block_size, n_layer, n_head, n_embd = 12, 64, 4, 4, 128
  eval_interval, eval_iters, max_iters = 250, 20, args.max_iters
  learning_rate, min_lr, warmup_iters, lr_decay_iters = 1e-3, 1e-4, 100, 2000
  weight_decay, beta1, beta2, grad_clip = 1e-1, 0.9, 0.99, 1.0
  torch.manual_seed(args.seed)

  with open(args.data, encoding="utf-8") as f:
    text = f.read()
  chars = sorted(set(text))
  stoi = {ch: i for i, ch in enumerate(chars)}
  ids = np.array([stoi[c] for c in text], dtype=np.uint16)
  n = len(ids)
  splits = {"train": ids[:int(n * 0.9)], "val": ids[int(n * 0.9):]}

  def get_batch(split):
    data = splits[split]
    ix = torch.randint(len(data) - block_size, (batch_size,))
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
    return x, y

  model = GPT(len(chars), block_size, n_layer, n_head, n_embd)
  optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2))

  @torch.no_grad()
  def estimate_loss():
    out = {}
    model.eval()
    for split in ("train", "val"):
      losses = torch.zeros(eval_iters)
      for k in range(eval_iters):
        losses[k] = model(*get_batch(split)).item()
      out[split] = losses.mean().item()
    model.train()
    return out

  def get_lr(it):
    if it < warmup_iters:
      return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
      return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)

  history, best_val = [], float("inf")
  x, y = get_batch("train")
  train_start = time.perf_counter()
  for it in range(max_iters + 1):
    for group in optimizer.param_groups:
      group["lr"] = get_lr(it)
    if it % eval_interval == 0:
      losses = estimate_loss()
      best_val = min(best_val, losses["val"])
      history.append({"step": it, **losses})
      print(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}", flush=True)
    if it == max_iters:
      break
    loss = model(x, y)
    x, y = get_batch("train")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss.item()  # log_interval=1: nanoGPT reads the loss every iteration
  wall = time.perf_counter() - START
  result = {"best_val_loss": best_val, "wall_s": wall, "train_loop_s": time.perf_counter() - train_start,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "history": history}
  print(json.dumps({k: v for k, v in result.items() if k != "history"}), flush=True)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
