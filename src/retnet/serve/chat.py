"""Chat messages → prompt token ids with the tokenizer's role-tagged template, and each
message's end.

Messages are tokenised one by one and concatenated, so the token count at each message
boundary is exact: the server stores prefix states there, and the next turn of the same
conversation reuses them."""

from __future__ import annotations

from retnet.tokenizer import Tokenizer


def render_chat(messages: list[dict], tokenizer: Tokenizer, template: dict[str, str]
                ) -> tuple[list[int], list[int]]:
    """(ids, message_ends): the prompt, and the token count after each message."""
    ids: list[int] = []
    ends = []
    for m in messages:
        ids += tokenizer.encode(template["message"].format(role=m["role"], content=m["content"]))
        ends.append(len(ids))
    ids += tokenizer.encode(template["generation_prompt"])
    return ids, ends
