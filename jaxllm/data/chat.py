"""Instruction-tuning records and chat templates: what an example says and how it is written out.

Records come in two shapes, both normalised to a list of messages
`{"role": "system" | "user" | "assistant", "content": str}`:
  Alpaca: {"instruction", "input", "output"} (+ optional "system", "history": [[user, assistant], ...])
  chat:   {"messages": [{"role", "content"}, ...]} (also ShareGPT "conversations" with "from"/"value",
          and content given as a list of {"type": "text", "text" | "value"} parts).
A template (registered by name in TEMPLATES) turns messages into text segments, each
marked prompt or response; sft.py encodes and batches them.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

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
