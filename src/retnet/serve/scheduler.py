"""What the engine works on at each step, as pure decisions over counts: which waiting
requests join (a fair share of the batch per HTTP request, the one holding fewest rows
first), how one step's budget of prompt tokens is split across the prompts being read, and
where a prompt's states are kept in the prefix cache (a few points per request)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from retnet.serve.cache import boundaries

# A request keeps at most this many prefix states (first and last message ends, the whole
# prompt, the rest spread evenly): a 200-message chat must not become 200 cache entries.
CACHE_POINTS_PER_REQUEST = 8


@dataclass(frozen=True)
class Waiting:
    """A request waiting to join, as the scheduler sees it."""

    group: Hashable  # the HTTP request it belongs to (a list of prompts is one group)
    rows: int  # the rows it needs (its n)


def pick(waiting: Sequence[Waiting], held: dict[Hashable, int], max_batch: int,
         share: int) -> int | None:
    """The index of the waiting request to admit next, or None to admit nobody now.

    Args:
        waiting: in arrival order.
        held: rows each group holds (decoding or being prefilled).
        max_batch: rows the batch holds at most.
        share: rows one group may hold; a request needing more starts only when its group
            holds none (it waits, and is never refused for its size).
    Returns:
        Groups are served fewest rows held first (ties: the earliest), so a small request
        never queues behind the other prompts of a large one. The chosen request must wait
        when it does not fit the free rows, and then nobody passes it: a request of many
        rows is never starved by a stream of small ones.
    """
    free = max_batch - sum(held.values())
    firsts: dict[Hashable, int] = {}
    for i, w in enumerate(waiting):
        firsts.setdefault(w.group, i)
    for i in sorted(firsts.values(), key=lambda i: (held.get(waiting[i].group, 0), i)):
        w, mine = waiting[i], held.get(waiting[i].group, 0)
        if mine and mine + w.rows > share:
            continue  # over its share: it waits for its own rows to finish
        # A request larger than the whole batch runs alone, once the batch is empty.
        fits = w.rows <= free or (w.rows > max_batch and free == max_batch)
        return i if fits else None
    return None


def split_budget(needs: Sequence[int], budget: int) -> list[int]:
    """Prompt tokens to read for each prompt this step: `budget` shared equally, a prompt
    needing less than its equal part taking only what it needs (water filling), so short
    prompts finish in one step beside a long one.

    Args:
        needs: tokens each prompt has left to read.
        budget: tokens read in one engine step, all prompts together.
    Returns:
        one grant per prompt, summing to at most the budget.
    """
    grants = [0] * len(needs)
    left = budget
    order = sorted(range(len(needs)), key=lambda i: needs[i])
    for k, i in enumerate(order):
        grants[i] = min(needs[i], left // (len(order) - k))
        left -= grants[i]  # the last (largest) takes what division left over
    return grants


def cache_points(n_tokens: int, message_ends: Sequence[int] = (),
                 cap: int = CACHE_POINTS_PER_REQUEST) -> list[int]:
    """Where one prompt's states are stored in the prefix cache: at most `cap` of the
    candidate `boundaries` — the whole prompt (a repeated prompt), the first message end (a
    shared system prompt), the last (the conversation's next turn), the rest evenly spread."""
    candidates = boundaries(n_tokens, message_ends)
    keep = {n_tokens}
    if message_ends:
        keep |= {p for p in (message_ends[0], message_ends[-1]) if 0 < p <= n_tokens}
    rest = [p for p in candidates if p not in keep]
    room = cap - len(keep)
    if room > 0:  # the room-th, 2·room-th, … of the rest: evenly spread, the last included
        keep |= {rest[len(rest) * (j + 1) // room - 1] for j in range(room) if rest}
    return sorted(keep)[-cap:]
