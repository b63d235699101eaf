"""Supervised fine-tuning data: chat records rendered with the chat template the server uses,
the loss on the assistant's tokens only, as rows that the one training step reads unchanged.

Records (JSONL, one per line), the forms TRL and most chat datasets use:

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    {"prompt": "...", "completion": "..."}   (or lists of messages for either)

Each message is rendered on its own (`template["message"]`), as `retnet.tokenizer.render_chat`
does, and an assistant message is trained on after its generation prompt (the server writes
that part), followed by <|endoftext|>, the token the server stops at. A row is int64 [T + 1]
whose low 32 bits are the token id and whose high bits are flags: TARGET (the loss is taken
where this token is predicted) and START (a conversation starts here: `resets` of the forward).
Rows hold one conversation padded, or several packed, each then read alone through the resets.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from retnet.data import Document, split_documents
from retnet.tokenizer import Tokenizer

ID_BITS = 0xFFFFFFFF
TARGET, START = 1 << 32, 1 << 33
ROLES = ("system", "user", "assistant")
LONG = ("truncate", "refuse")


@dataclass(frozen=True)
class Conversation:
    name: str  # FILE#LINE
    messages: tuple[dict[str, str], ...]


def _messages(value, where: str, role: str) -> list[dict[str, str]]:
    """A prompt/completion side: a string (one `role` message) or a list of messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return value
    raise ValueError(f"{where}: prompt and completion must be strings or lists of messages")


def _conversation(record, where: str) -> list[dict[str, str]]:
    if isinstance(record, dict) and "messages" in record:
        messages = record["messages"]
    elif isinstance(record, dict) and {"prompt", "completion"} <= set(record):
        messages = (_messages(record["prompt"], where, "user")
                    + _messages(record["completion"], where, "assistant"))
    else:
        raise ValueError(f"{where}: a record needs \"messages\" (a list of {{role, content}}) "
                         "or \"prompt\" and \"completion\"")
    for m in messages if isinstance(messages, list) else [None]:
        if not (isinstance(m, dict) and m.get("role") in ROLES
                and isinstance(m.get("content"), str)):
            raise ValueError(f"{where}: each message needs a role ({', '.join(ROLES)}) and a "
                             f"string content; got {m!r}"[:300])
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: no assistant message, so nothing to train on")
    return messages


def read_conversations(path: str | Path) -> list[Conversation]:
    """Every record of a chat JSONL file; a bad line is one error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: no such file; --sft reads one .jsonl file")
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{where} is not valid JSON; fix or remove that line") from None
        out.append(Conversation(f"{path.name}#{i}", tuple(_conversation(record, where))))
    if not out:
        raise ValueError(f"--data {path} holds no conversations")
    return out


def special_tokens(template: dict[str, str]) -> list[str]:
    """The <|...|> markers the template writes for each role, which should be one token each."""
    texts = [template["message"].format(role=r, content="") for r in ROLES]
    found = re.findall(r"<\|[^|\s]+\|>", "".join(texts) + template["generation_prompt"])
    return list(dict.fromkeys(found))


def render(messages, tokenizer: Tokenizer, template: dict[str, str]
           ) -> tuple[list[int], list[bool]]:
    """(ids, trained): the conversation's tokens, and for each whether the loss is taken where
    it is predicted: the assistant's tokens after the generation prompt, and the
    <|endoftext|> that ends each assistant message."""
    prompt = tokenizer.encode(template["generation_prompt"])
    ids: list[int] = []
    trained: list[bool] = []
    for m in messages:
        piece = tokenizer.encode(template["message"].format(role=m["role"], content=m["content"]))
        if m["role"] != "assistant":
            ids += piece
            trained += [False] * len(piece)
            continue
        given = len(prompt) if piece[:len(prompt)] == prompt else 0
        ids += piece + [tokenizer.eos_id]
        trained += [False] * given + [True] * (len(piece) - given + 1)
    return ids, trained


def encode(ids: list[int], trained: list[bool]) -> np.ndarray:
    """One conversation as flagged int64 tokens: TARGET where trained, START on the first."""
    row = np.asarray(ids, dtype=np.int64) | np.where(trained, TARGET, 0).astype(np.int64)
    row[0] |= START
    return row


def fit(rows: list[np.ndarray], length: int, long: str, names: list[str]) -> list[np.ndarray]:
    """Conversations longer than `length` tokens cut (`truncate`) or refused (`refuse`); those
    left without a trained token are dropped."""
    kept = []
    for row, name in zip(rows, names):
        if row.size > length and long == "refuse":
            raise ValueError(f"{name} has {row.size} tokens, more than --seq-len + 1 = {length}; "
                             "raise --seq-len, or pass --sft-long truncate")
        row = row[:length]
        if (row & TARGET).any():
            kept.append(row)
    return kept


def pack(convs: list[np.ndarray], length: int, pad_id: int, packed: bool) -> torch.Tensor:
    """Rows [N, length]: one conversation each, padded (untrained pad tokens), or with
    `packed` as many whole conversations as fit, in order."""
    rows: list[list[np.ndarray]] = []
    used = length  # the open row is full: start one
    for c in convs:
        if not packed or used + c.size > length:
            rows.append([])
            used = 0
        rows[-1].append(c)
        used += c.size
    out = np.full((len(rows), length), pad_id, dtype=np.int64)
    for i, parts in enumerate(rows):
        joined = np.concatenate(parts)
        out[i, :joined.size] = joined
    return torch.from_numpy(out)


def loss_fn(model: torch.nn.Module, form) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The step's loss (ids, targets) → mean cross-entropy over the trained targets, reading
    the flags: ids and targets are a row's tokens [:-1] and [1:]."""
    def loss_of(ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        resets = (ids & START) != 0
        wanted = (targets & TARGET) != 0
        labels = torch.where(wanted, targets & ID_BITS, -100)
        return model(ids & ID_BITS, mode=form, targets=labels, resets=resets).loss
    return loss_of


class ChatRows:
    """Rows of flagged tokens [N, T + 1], drawn as `retnet.data.PackedWindows` draws windows:
    a pure function of (seed, step, rank)."""

    def __init__(self, rows: torch.Tensor, what: str) -> None:
        if rows.shape[0] == 0:
            raise ValueError(f"the {what} holds no conversation with a trained token")
        self.rows = rows
        self.tokens = rows.flatten().numpy()  # the loop's summary counts .size

    def batch(self, seed: int, step: int, rows: int, rank: int = 0, world: int = 1
              ) -> torch.Tensor:
        g = np.random.default_rng([seed, step])
        picks = g.integers(0, self.rows.shape[0], size=rows * world)
        return self.rows[torch.from_numpy(picks[rank * rows:(rank + 1) * rows])]

    def evaluation_batches(self, rows: int, n_batches: int) -> list[torch.Tensor]:
        """Every held-out row, in order, up to rows · n_batches."""
        held = self.rows[:rows * n_batches]
        return list(held.split(rows))


def split(convs: list[Conversation]) -> tuple[list[Conversation], list[Conversation]]:
    """(train, validation) by the hash of each record's name, as `retnet.data` splits text;
    a lone record is both (a record is not cut in two as a lone text document is)."""
    if len(convs) == 1:
        return convs, convs
    docs = [Document(c.name, "") for c in convs]
    train, val = split_documents(docs)
    by_name = {c.name: c for c in convs}
    return [by_name[d.name] for d in train], [by_name[d.name] for d in val]


def chat_rows(convs: list[Conversation], tokenizer: Tokenizer, template: dict[str, str],
              seq_len: int, long: str, packed: bool, what: str) -> ChatRows:
    """`convs` rendered, fitted to seq_len + 1 tokens and put in rows."""
    rendered = [encode(*render(c.messages, tokenizer, template)) for c in convs]
    kept = fit(rendered, seq_len + 1, long, [c.name for c in convs])
    return ChatRows(pack(kept, seq_len + 1, tokenizer.pad_id, packed), what)


def sample_prompts(convs: list[Conversation], tokenizer: Tokenizer, template: dict[str, str],
                   n: int = 3) -> list[list[int]]:
    """The first `n` conversations up to their first assistant message, with the generation
    prompt: what the server would send the model."""
    prompts = []
    for c in convs[:n]:
        head = []
        for m in c.messages:
            if m["role"] == "assistant":
                break
            head.append(m)
        ids, _ = render(head, tokenizer, template)
        prompts.append(ids + tokenizer.encode(template["generation_prompt"]))
    return prompts
