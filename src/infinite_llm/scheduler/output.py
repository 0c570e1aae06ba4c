"""``SchedulerOutput``: what one step computes, handed from the scheduler to the model runner."""

from __future__ import annotations

from dataclasses import dataclass, field

from infinite_llm.scheduler.request import Request


@dataclass(frozen=True, slots=True)
class ScheduledRequest:
    """Compute tokens [request.num_computed_tokens, + num_new_tokens) of ``request`` this step."""

    request: Request
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """The chunk reaches the end of the known tokens, so the step samples the next one."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    def unschedule(self, request: Request) -> int:
        """Take ``request`` out of this step (it is being preempted); the tokens it had."""
        for i, item in enumerate(self.scheduled):
            if item.request is request:
                del self.scheduled[i]
                return item.num_new_tokens
        return 0

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled
