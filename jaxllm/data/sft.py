"""Instruction tuning (SFT) data: records -> templated tokens with loss weights -> batches.

Records come in two shapes, both normalised to a list of messages
`{"role": "system" | "user" | "assistant", "content": str}`:
  Alpaca: {"instruction", "input", "output"} (+ optional "system", "history": [[user, assistant], ...])
  chat:   {"messages": [{"role", "content"}, ...]} (also ShareGPT "conversations" with "from"/"value",
          and content given as a list of {"type": "text", "text" | "value"} parts).
A template (registered by name in TEMPLATES) turns messages into text segments, each
marked prompt or response. Response segments end with EOS and are the only ones with
loss weight 1 (unless `train_on_prompt`). Examples longer than `max_len` lose the
response tail first; the prompt is kept where possible.

Batches are either padded (examples of similar length batched together, padded to
the longest, rounded up to `pad_multiple`) or packed (several examples per row of
`seq_len`, with `segment_ids` and restarting `positions` so none sees another). Both
give the same loss per example; both are grain datasets whose state resumes exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterable

import grain
import numpy as np

from jaxllm.data.pipeline import GlobalPositionIterDataset
from jaxllm.data.sources import DataError

Message = dict[str, str]
# (text, is_response); text None stands for the EOS token that closes a response.
Segment = tuple[str | None, bool]

# ---------------------------------------------------------------------------- records

_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
          "model": "assistant", "bot": "assistant", "system": "system"}


def _text(content: Any, where: str) -> str:
  if isinstance(content, str):
    return content
  if isinstance(content, list):  # multimodal-style parts; only text parts are supported
    parts = []
    for part in content:
      if isinstance(part, dict) and part.get("type", "text") == "text":
        parts.append(str(part.get("text", part.get("value", ""))))
      else:
        raise DataError(f"{where}: content part {part!r} is not text; only text parts are supported.")
    return "".join(parts)
  raise DataError(f"{where}: message content must be a string or a list of text parts, got "
                  f"{type(content).__name__}.")


def normalize_record(record: Any, where: str = "record") -> list[Message]:
  """An Alpaca- or chat-shaped record as a list of {role, content} messages (with 'input' kept
  separately on Alpaca user turns, for templates that show it apart)."""
  if not isinstance(record, dict):
    raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}.")
  if "messages" in record or "conversations" in record:
    raw = record.get("messages", record.get("conversations"))
    if not isinstance(raw, list) or not raw:
      raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects.")
    messages = []
    for i, m in enumerate(raw):
      role = m.get("role", m.get("from")) if isinstance(m, dict) else None
      if role not in _ROLES:
        raise DataError(f"{where}: message {i} has role {role!r}; use one of {sorted(_ROLES)}.")
      messages.append({"role": _ROLES[role], "content": _text(m.get("content", m.get("value")),
                                                               f"{where} message {i}")})
  elif "instruction" in record and "output" in record:
    messages = []
    if record.get("system"):
      messages.append({"role": "system", "content": str(record["system"])})
    for pair in record.get("history") or []:
      if not isinstance(pair, (list, tuple)) or len(pair) != 2:
        raise DataError(f"{where}: 'history' must be a list of [instruction, response] pairs.")
      messages += [{"role": "user", "content": str(pair[0])},
                   {"role": "assistant", "content": str(pair[1])}]
    messages += [{"role": "user", "content": str(record["instruction"]),
                  "input": str(record.get("input") or "")},
                 {"role": "assistant", "content": str(record["output"])}]
  else:
    raise DataError(f"{where}: neither Alpaca-shaped (instruction, input, output) nor chat-shaped "
                    f"(messages); its keys are {sorted(record)[:8]}.")
  if not any(m["role"] == "assistant" for m in messages):
    raise DataError(f"{where}: has no assistant message, so nothing to learn from.")
  return messages


def load_records(path: str) -> list[dict]:
  """Records from a JSON list file, a JSONL file, or a `datasets` directory (save_to_disk)."""
  if os.path.isdir(path):
    import datasets  # pylint: disable=import-outside-toplevel
    try:
      return list(datasets.load_from_disk(path))
    except FileNotFoundError as e:
      raise DataError(f"data.path={path!r}: a directory but not a saved `datasets` dataset "
                      "(save_to_disk); give a .json/.jsonl file or such a directory.") from e
  if not os.path.isfile(path):
    raise DataError(f"data.path={path!r}: no such file; give an Alpaca/chat .json or .jsonl file.")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if text.lstrip().startswith("["):
    try:
      return json.loads(text)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}.") from e
  records = []
  for line_no, line in enumerate(text.splitlines(), 1):
    if line.strip():
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON on line {line_no}: {e.msg}.") from e
  return records


# -------------------------------------------------------------------------- templates

Template = Callable[[list[Message], Any], list[Segment]]
TEMPLATES: dict[str, Template] = {}


def register_template(name: str):
  """Decorator: `@register_template("mine") def mine(messages, tokenizer) -> [(text, is_response)]`."""
  def register(fn: Template) -> Template:
    TEMPLATES[name] = fn
    return fn
  return register


def _user_text(message: Message) -> str:
  extra = message.get("input", "")
  return f"{message['content']}\n{extra}" if extra else message["content"]


def _turns(messages: list[Message]) -> tuple[str, list[tuple[Message, str]]]:
  """(system text, [(user message, assistant reply)]); a trailing user turn has reply ''."""
  system = "\n".join(m["content"] for m in messages if m["role"] == "system")
  turns, user = [], None
  for m in messages:
    if m["role"] == "user":
      if user is not None:  # two user turns in a row: join them
        user = {**user, "content": user["content"] + "\n" + m["content"]}
      else:
        user = m
    elif m["role"] == "assistant":
      turns.append((user or {"role": "user", "content": ""}, m["content"]))
      user = None
  if user is not None:
    turns.append((user, ""))
  return system, turns


ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
ALPACA_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that "
                         "provides further context. Write a response that appropriately completes "
                         "the request.")


@register_template("alpaca")
def alpaca(messages: list[Message], tokenizer: Any = None) -> list[Segment]:
  """Stanford Alpaca: preamble, '### Instruction:', optional '### Input:', '### Response:'."""
  del tokenizer
  system, turns = _turns(messages)
  segments: list[Segment] = []
  for i, (user, reply) in enumerate(turns):
    prompt = ""
    if i == 0:
      prompt = (system or (ALPACA_PREAMBLE_INPUT if user.get("input") else ALPACA_PREAMBLE)) + "\n\n"
    else:
      prompt = "\n\n"
    prompt += f"### Instruction:\n{user['content']}\n\n"
    if user.get("input"):
      prompt += f"### Input:\n{user['input']}\n\n"
    prompt += "### Response:\n"
    segments.append((prompt, False))
    if reply or i < len(turns) - 1 or messages[-1]["role"] == "assistant":
      segments += [(reply, True), (None, True)]
  return segments


@register_template("human_assistant")
def human_assistant(messages: list[Message], tokenizer: Any = None) -> list[Segment]:
  """'Human: ...\\n\\nAssistant: ' (BELLE / Chinese-LLaMA-Alpaca style); input follows the instruction."""
  del tokenizer
  system, turns = _turns(messages)
  segments: list[Segment] = [(system + "\n\n", False)] if system else []
  for i, (user, reply) in enumerate(turns):
    segments.append((f"Human: {_user_text(user)}\n\nAssistant: ", False))
    if reply or i < len(turns) - 1 or messages[-1]["role"] == "assistant":
      segments += [(reply, True), (None, True)]
  return segments


@register_template("chat_template")
def chat_template(messages: list[Message], tokenizer: Any) -> list[Segment]:
  """The tokenizer's own Jinja `chat_template`. Each assistant turn's text is found by rendering
  the conversation up to it with and without the reply; the reply and the template's closing
  text up to and including the EOS token train, what follows EOS (e.g. a newline) does not."""
  if not getattr(tokenizer, "chat_template", None):
    raise DataError("data.template='chat_template' but the tokenizer has no chat_template; "
                    "use data.template='alpaca' or 'human_assistant', or a tokenizer that has one.")
  plain = [{"role": m["role"], "content": _user_text(m) if m["role"] == "user" else m["content"]}
           for m in messages]
  render = lambda msgs, gen: tokenizer.apply_chat_template(  # noqa: E731
      msgs, tokenize=False, add_generation_prompt=gen)
  segments: list[Segment] = []
  done = ""
  eos = tokenizer.eos_token
  for i, m in enumerate(plain):
    if m["role"] != "assistant":
      continue
    prompt = render(plain[:i], True)
    full = render(plain[:i + 1], False)
    if not (prompt.startswith(done) and full.startswith(prompt)):
      raise DataError("the tokenizer's chat_template does not render conversations as growing "
                      "prefixes, so replies cannot be located; use another data.template.")
    segments.append((prompt[len(done):], False))
    reply = full[len(prompt):]
    cut = reply.find(eos, len(m["content"])) if eos else -1
    if cut >= 0:
      segments.append((reply[:cut + len(eos)], True))
      if reply[cut + len(eos):]:
        segments.append((reply[cut + len(eos):], False))
    else:  # the template closes turns without EOS: add it so the model learns to stop
      segments += [(reply, True), (None, True)]
    done = full
  if plain[-1]["role"] != "assistant":
    segments.append((render(plain, True)[len(done):], False))
  return [(text, resp) for text, resp in segments if text is None or text]


def get_template(name: str) -> Template:
  if name not in TEMPLATES:
    raise DataError(f"data.template={name!r} is not known; use one of {sorted(TEMPLATES)} "
                    "(or register one with jaxllm.data.sft.register_template).")
  return TEMPLATES[name]


# --------------------------------------------------------------------------- encoding

@dataclasses.dataclass
class Encoded:
  """One example: tokens [n] and weights [n] (weight of predicting tokens[i] from tokens[:i])."""
  tokens: np.ndarray
  weights: np.ndarray
  truncated: bool = False


def _bos_prefix(tokenizer: Any) -> list[int]:
  """[BOS] when the tokenizer adds one by itself (LLaMA-style), else []."""
  bos = getattr(tokenizer, "bos_token_id", None)
  if bos is None:
    return []
  with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
  plain = tokenizer("a", add_special_tokens=False)["input_ids"]
  return [bos] if with_special[:1] == [bos] and plain[:1] != [bos] else []


def encode_segments(segments: list[Segment], tokenizer: Any, max_len: int,
                    train_on_prompt: bool = False) -> Encoded:
  """Tokenizes segments one by one (so weights follow segment boundaries exactly) and truncates
  to `max_len` tokens: whole later turns are dropped first, then the response tail is cut; the
  prompt is shortened (its tail) only when it leaves less than a quarter of max_len to reply."""
  eos = tokenizer.eos_token_id
  turns: list[tuple[list[int], list[int]]] = []  # (prompt ids, response ids) per turn
  prompt, response = list(_bos_prefix(tokenizer)), []
  for text, is_response in segments:
    ids = [eos] if text is None else tokenizer(text, add_special_tokens=False)["input_ids"]
    if is_response:
      response += ids
    else:
      if response:
        turns.append((prompt, response))
        prompt, response = [], []
      prompt += ids
  if prompt or response:
    turns.append((prompt, response))

  tokens: list[int] = []
  weights: list[float] = []
  truncated = False
  for p, r in turns:
    room = max_len - len(tokens)
    if len(p) + len(r) > room:
      truncated = True
      if tokens and len(p) >= room:
        break  # a later turn whose prompt does not fit: drop it whole
      keep_r = min(len(r), max(room - len(p), min(len(r), max(1, max_len // 4))))
      p, r = p[:room - keep_r], r[:keep_r]
    tokens += p + r
    weights += [1.0 if train_on_prompt else 0.0] * len(p) + [1.0] * len(r)
    if truncated:
      break
  return Encoded(np.asarray(tokens, np.int32), np.asarray(weights, np.float32), truncated)


def encode_record(record: Any, template: Template, tokenizer: Any, max_len: int,
                  train_on_prompt: bool = False, where: str = "record") -> Encoded:
  return encode_segments(template(normalize_record(record, where), tokenizer), tokenizer, max_len,
                         train_on_prompt)


def prompt_ids(tokenizer: Any, template: Template, instruction: str, input_text: str = "") -> list[int]:
  """Token ids of the prompt for one instruction, ready for generation (ends where the reply starts)."""
  messages = [{"role": "user", "content": instruction, "input": input_text}]
  segments = template(messages, tokenizer)
  ids = list(_bos_prefix(tokenizer))
  for text, _ in segments:
    if text is not None:
      ids += tokenizer(text, add_special_tokens=False)["input_ids"]
  return ids


# --------------------------------------------------------------------------- batching

def padded_batch(examples: list[Encoded], width: int) -> dict[str, np.ndarray]:
  """One example per row, right-padded to `width` inputs; padding has weight 0."""
  batch = {k: np.zeros((len(examples), width), dt) for k, dt in
           (("inputs", np.int32), ("targets", np.int32), ("weights", np.float32))}
  for row, ex in enumerate(examples):
    n = len(ex.tokens) - 1
    batch["inputs"][row, :n] = ex.tokens[:-1]
    batch["targets"][row, :n] = ex.tokens[1:]
    batch["weights"][row, :n] = ex.weights[1:]
  return batch


def packed_batch(rows: list[list[Encoded]], width: int) -> dict[str, np.ndarray]:
  """Several examples per row: segment_ids 1, 2, ... (0 = padding) and positions restarting at 0."""
  batch = {k: np.zeros((len(rows), width), dt) for k, dt in
           (("inputs", np.int32), ("targets", np.int32), ("weights", np.float32),
            ("segment_ids", np.int32), ("positions", np.int32))}
  for row, examples in enumerate(rows):
    start = 0
    for seg, ex in enumerate(examples, 1):
      n = len(ex.tokens) - 1
      end = start + n
      batch["inputs"][row, start:end] = ex.tokens[:-1]
      batch["targets"][row, start:end] = ex.tokens[1:]
      batch["weights"][row, start:end] = ex.weights[1:]
      batch["segment_ids"][row, start:end] = seg
      batch["positions"][row, start:end] = np.arange(n)
      start = end
  return batch


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple if multiple > 1 else n


def plan_padded(lengths: list[int], batch_size: int, seed: int | None, bucket_batches: int = 16
                ) -> list[list[list[int]]]:
  """Global batches of single-example rows. Examples are shuffled, then sorted by length within
  windows of `bucket_batches` batches, so each batch holds similar lengths (little padding)."""
  order = np.arange(len(lengths)) if seed is None else np.random.default_rng(seed).permutation(len(lengths))
  window = batch_size * max(bucket_batches, 1)
  plans = []
  for start in range(0, len(order), window):
    chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
    plans += [[[int(i)] for i in chunk[b:b + batch_size]] for b in range(0, len(chunk), batch_size)]
  return [p for p in plans if len(p) == batch_size]


def plan_packed(lengths: list[int], batch_size: int, seq_len: int, seed: int | None,
                open_rows: int = 64) -> list[list[list[int]]]:
  """Global batches of packed rows: first fit over the shuffled examples into rows of `seq_len`
  inputs (at most `open_rows` rows open at once, so memory stays bounded)."""
  order = np.arange(len(lengths)) if seed is None else np.random.default_rng(seed).permutation(len(lengths))
  rows: list[list[int]] = []
  free: list[int] = []
  first_open = 0
  for i in order:
    n = lengths[i]
    for r in range(first_open, len(rows)):
      if free[r] >= n:
        rows[r].append(int(i))
        free[r] -= n
        break
    else:
      rows.append([int(i)])
      free.append(seq_len - n)
      first_open = max(first_open, len(rows) - open_rows)
  return [rows[b:b + batch_size] for b in range(0, len(rows) - batch_size + 1, batch_size)]


def collate_fn(examples: list[Encoded], *, packing: bool, seq_len: int, pad_multiple: int,
               shard_index: int = 0, shard_count: int = 1) -> Callable[[list[list[int]]], dict]:
  """plan (global batch: rows of example indices) -> this host's rows as arrays. Padded widths
  come from the whole global batch, so every host builds the same shape and the global batch
  does not depend on the process count."""
  def collate(plan: list[list[int]]) -> dict[str, np.ndarray]:
    per_host = len(plan) // shard_count
    mine = plan[shard_index * per_host:(shard_index + 1) * per_host]
    if packing:
      return packed_batch([[examples[i] for i in row] for row in mine], seq_len)
    longest = max(len(examples[row[0]].tokens) - 1 for row in plan)
    width = min(_round_up(longest, pad_multiple), seq_len)
    return padded_batch([examples[row[0]] for row in mine], width)
  return collate


def sft_dataset(examples: list[Encoded], batch_size: int, *, seq_len: int, packing: bool = False,
                pad_multiple: int = 16, bucket_batches: int = 16, seed: int = 0, shuffle: bool = True,
                repeat: bool = True, shard_index: int = 0, shard_count: int = 1) -> grain.IterDataset:
  """Batches of `examples` (global `batch_size` rows; each host gets its share) as a grain dataset."""
  lengths = [len(ex.tokens) - 1 for ex in examples]
  plan_seed = seed if shuffle else None
  plans = (plan_packed(lengths, batch_size, seq_len, plan_seed) if packing
           else plan_padded(lengths, batch_size, plan_seed, bucket_batches))
  if not plans:
    raise DataError(f"{len(examples)} examples do not fill one batch of {batch_size} rows; "
                    "add data or lower train.batch_size.")
  ds = grain.MapDataset.source(plans)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat()
  ds = ds.map(collate_fn(examples, packing=packing, seq_len=seq_len, pad_multiple=pad_multiple,
                         shard_index=shard_index, shard_count=shard_count))
  # The position counts global batches (plans), the same on every host: any process count resumes it.
  return GlobalPositionIterDataset(ds.to_iter_dataset())


# ------------------------------------------------------------------------ from config

@dataclasses.dataclass
class SftData:
  tokenizer: Any
  train: grain.IterDataset
  val_batches: list[dict[str, np.ndarray]]
  template: Template
  num_examples: int
  num_truncated: int

  @property
  def summary(self) -> str:
    return (f"sft: {self.num_examples} examples, {self.num_truncated} truncated to data.seq_len "
            f"(response tail cut)")


def _training_texts(records: Iterable[dict], template: Template) -> Iterable[str]:
  for i, record in enumerate(records):
    yield "".join(t for t, _ in template(normalize_record(record, f"record {i + 1}"), None) if t)


def build_sft_data(config: Any, workdir: str) -> SftData:
  """Tokenizer, training dataset and validation batches for `config.task == 'sft'`."""
  import jax  # pylint: disable=import-outside-toplevel
  from jaxllm.data.tokenizers import prepare_tokenizer  # pylint: disable=import-outside-toplevel
  from jaxllm.data.sources import train_val_split  # pylint: disable=import-outside-toplevel
  d = config.data
  template = get_template(d.template)
  records = load_records(d.path)
  if not records:
    raise DataError(f"data.path={d.path!r}: holds no records.")
  train_records, val_records = train_val_split(records, d.val_fraction, d.seed)
  texts = [] if d.tokenizer or d.template == "chat_template" else list(_training_texts(train_records, template))
  tokenizer = prepare_tokenizer(config, workdir, texts)
  encode = lambda recs, tag: [  # noqa: E731
      encode_record(r, template, tokenizer, d.seq_len, d.train_on_prompt, f"{d.path} {tag} record {i + 1}")
      for i, r in enumerate(recs)]
  train_examples, val_examples = encode(train_records, "train"), encode(val_records, "val")
  kwargs = dict(seq_len=d.seq_len, packing=d.packing == "document", pad_multiple=d.pad_multiple,
                bucket_batches=d.bucket_batches, seed=d.seed, shard_index=jax.process_index(),
                shard_count=jax.process_count())
  train_ds = sft_dataset(train_examples, config.train.batch_size, **kwargs)
  val_batches = []
  if val_examples and config.train.eval_steps > 0:
    val_ds = sft_dataset(val_examples, min(config.train.batch_size, len(val_examples)), shuffle=False,
                         repeat=False, **kwargs) if len(val_examples) >= config.train.batch_size else None
    if val_ds is None:
      raise DataError(f"the validation split has {len(val_examples)} examples, fewer than "
                      f"train.batch_size={config.train.batch_size}; raise data.val_fraction.")
    for batch in val_ds:
      val_batches.append(batch)
      if len(val_batches) >= config.train.eval_steps:
        break
  num_truncated = sum(ex.truncated for ex in train_examples + val_examples)
  return SftData(tokenizer, train_ds, val_batches, template, len(records), num_truncated)
