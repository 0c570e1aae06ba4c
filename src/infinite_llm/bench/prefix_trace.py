"""The multi-turn trace ``bench prefix`` replays: users asking questions about shared documents.

Every server sees the same prompts, so the trace fixes the whole transcript in advance: each
user's turn ``t`` prompt is ``doc + q1 + a1 + ... + qt``, where the questions and answers are
random token ids drawn from the seed (the server's own answers are discarded). A prefix cache
can reuse the document across users reading it and the growing transcript across a user's turns;
without one every turn prefills its whole prompt again.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class TraceConfig:
    """Sizes of the trace, in tokens (``output_len``: the answer each turn asks for)."""

    num_docs: int = 2
    doc_len: int = 2000
    num_users: int = 4
    turns: int = 3
    question_len: int = 64
    output_len: int = 64
    repeat_len: int = 2048
    stagger_s: float = 0.0  # users start at a seeded uniform delay in [0, stagger_s]
    seed: int = 0

    def max_prompt_len(self) -> int:
        """The longest prompt of the trace (a last turn; the repeat probe's own prompt aside)."""
        return self.doc_len + self.turns * self.question_len + (self.turns - 1) * self.output_len


@dataclass(frozen=True)
class UserTrace:
    """One user: the document it reads, when it starts, and its prompts (one per turn)."""

    user_id: int
    doc_id: int
    start_delay_s: float
    prompts: list[list[int]]


@dataclass(frozen=True)
class PrefixTrace:
    """The whole workload: the users, the repeat probe's prompt and a warm-up prompt that shares
    no prefix with anything measured."""

    config: TraceConfig
    vocab_size: int
    users: list[UserTrace]
    repeat_prompt: list[int]
    warm_up_prompt: list[int]

    @property
    def num_requests(self) -> int:
        return sum(len(u.prompts) for u in self.users)


def random_tokens(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    """``n`` token ids away from both ends of the vocabulary (where special tokens live)."""
    margin = min(100, vocab_size // 4)
    return [rng.randrange(margin, vocab_size - margin) for _ in range(n)]


def make_trace(config: TraceConfig, vocab_size: int) -> PrefixTrace:
    """The trace of ``config``: the same under the same seed and vocabulary. User ``u`` reads
    document ``u % num_docs``, so users share documents once there are more users than them."""
    rng = random.Random(config.seed)
    docs = [random_tokens(rng, config.doc_len, vocab_size) for _ in range(config.num_docs)]
    users = []
    for user_id in range(config.num_users):
        doc_id = user_id % config.num_docs
        transcript = list(docs[doc_id])
        prompts = []
        for turn in range(config.turns):
            if turn > 0:  # the answer to the previous question, fixed by the trace
                transcript += random_tokens(rng, config.output_len, vocab_size)
            transcript += random_tokens(rng, config.question_len, vocab_size)
            prompts.append(list(transcript))
        delay = rng.uniform(0.0, config.stagger_s) if config.stagger_s > 0 else 0.0
        users.append(UserTrace(user_id, doc_id, delay, prompts))
    return PrefixTrace(
        config=config,
        vocab_size=vocab_size,
        users=users,
        repeat_prompt=random_tokens(rng, config.repeat_len, vocab_size),
        warm_up_prompt=random_tokens(rng, 16, vocab_size),
    )
