"""The run's ledger: the run state a checkpoint records beside the weights, and the prompt stream it numbers.

Every training prompt has a stream position (its index in the task's seeded ``train_items`` stream). The
state records which positions are done, as a low watermark plus the sparse set above it, so that a
resumed run (or a rebuilt learner) dispatches exactly the prompts the restored weights have not been
trained on: each prompt is trained once across a kill and a resume (tests/test_reliability.py counts it).
A position is done when a learner step trained it, or when it was settled untrained (its prompt longer than
``rollout.max_prompt_tokens``, or its group dropped as stale; the rollout events in metrics.jsonl name them):
every position handed out is settled sooner or later, so the watermark follows the stream and the sparse
set stays as small as the groups in flight. ``Ledger`` keeps the two in step for the driver's loop.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

_POSITION_PREFIX = "p"


@dataclass
class RunState:
    """Typed run state; ``to_dict`` / ``from_dict`` are what checkpoints store."""

    step: int = 0  # learner steps taken
    version: int = 0  # policy version the rollout workers should hold
    call_id: int = 0  # rollout calls dispatched (with ``incarnation``, makes group ids unique)
    incarnation: int = 0  # drivers this run has had: a resumed driver never reuses an earlier one's group ids
    trained_below: int = 0  # every prompt position below this is done (trained, or settled untrained)
    trained_above: list[int] = field(default_factory=list)  # done positions >= trained_below, sorted

    def mark_trained(self, positions: Iterable[int]) -> None:
        """Record positions a learner step trained, or settled untrained; the watermark moves over the
        contiguous ones."""
        above = set(self.trained_above) | {p for p in positions if p >= self.trained_below}
        while self.trained_below in above:
            above.remove(self.trained_below)
            self.trained_below += 1
        self.trained_above = sorted(above)

    def is_done(self, position: int) -> bool:
        """Whether ``position`` was trained or settled untrained."""
        return position < self.trained_below or position in self.trained_above

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> "RunState":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(record) - names
        if unknown:
            raise ValueError(f"run state has unknown fields {sorted(unknown)}: written by another Unmask version")
        return cls(**record)


class PromptStream:
    """The task's training items numbered by stream position, without the positions ``state`` has trained.

    Each item handed out carries its position in its id (``p<position>:<item id>``), so the groups made
    from it name the prompt they answer (``position_of``).
    """

    def __init__(self, items: Iterable, state: RunState, in_flight: Iterable[int] = ()):
        self._items: Iterator = itertools.islice(enumerate(items), state.trained_below, None)
        self._skip = set(state.trained_above) | set(in_flight)  # done, or handed out by an earlier stream
        self._frontier = state.trained_below  # every position below was handed out or is done
        self._again: collections.deque = collections.deque()  # given back: handed out before new positions

    def take(self, n: int) -> list:
        out = []
        while self._again and len(out) < n:
            out.append(self._again.popleft())
        while len(out) < n:
            position, item = next(self._items)
            self._frontier = position + 1
            if position not in self._skip:
                out.append(dataclasses.replace(item, id=f"{_POSITION_PREFIX}{position}:{item.id}"))
        return out

    def give_back(self, items: list) -> None:
        """Items handed out whose rollout failed before it produced their groups: the next ``take`` hands them
        out again, first."""
        self._again.extend(items)

    def in_flight(self, state: RunState) -> set[int]:
        """Positions handed out (by this stream or the one it replaced) that ``state`` does not count as done:
        in a rollout, in the queue or in the learner's batch (not those given back)."""
        handed = set(range(state.trained_below, self._frontier)) | self._skip
        again = {position_of(f"t:{item.id}") for item in self._again}
        return {p for p in handed if p >= state.trained_below} - set(state.trained_above) - again


def position_of(group_id: str) -> int:
    """The prompt position of a group id ``<call tag>:p<position>:<item id>`` (see ``PromptStream``)."""
    parts = group_id.split(":", 2)
    if len(parts) < 3 or not parts[1].startswith(_POSITION_PREFIX) or not parts[1][1:].isdigit():
        raise ValueError(f"group id {group_id!r} does not name a prompt position (<call tag>:p<position>:<item id>)")
    return int(parts[1][len(_POSITION_PREFIX):])


class Ledger:
    """The run state and the prompt stream it numbers, kept in step: the loop takes prompts from it and tells
    it which were trained, settled untrained, or came back from a failed call."""

    def __init__(self, items: Callable[[], Iterable], state: RunState):
        self._items = items  # the task's seeded training stream, from its start
        self.state = state
        self.prompts = PromptStream(items(), state)

    def take(self, n: int) -> tuple[list, str]:
        """The next ``n`` prompts and the tag of the rollout call that answers them (unique across drivers)."""
        items, tag = self.prompts.take(n), f"{self.state.incarnation}.{self.state.call_id}"
        self.state.call_id += 1
        return items, tag

    def trained(self, positions: Iterable[int]) -> None:
        """A learner step trained these positions."""
        self.state.mark_trained(positions)

    def settle(self, group_ids: Iterable[str]) -> None:
        """Prompts a rollout refused (over-long) or whose groups the queue dropped as stale are done: marked
        with the trained ones, so the watermark moves past them (a resumed run does not send them again)."""
        self.state.mark_trained(position_of(g) for g in group_ids)

    def give_back(self, items: list, group_ids: list[str], unsettled: Iterable[str], in_batch: set[int]) -> None:
        """A failed call's prompts whose groups the queue still counts unsettled are handed out again, first;
        not those done since, nor those in the learner's batch (a restarted queue remembers only the groups it
        recovered: one it had handed to the learner before is in the batch or trained, not unsettled)."""
        again = {g for g in unsettled if not self.state.is_done(position_of(g)) and position_of(g) not in in_batch}
        self.prompts.give_back([item for item, g in zip(items, group_ids) if g in again])

    def roll_back_to(self, restored: RunState) -> None:
        """The weights went back to the checkpoint's ``restored`` state: so do the step, the version and the
        prompts counted done, as on ``--resume``. Prompts done after the checkpoint are dispatched again; those
        in a rollout, in the queue or in the batch being retried are not (each is trained once in the weights'
        history). Call ids and the incarnation go on: group ids are never reused."""
        in_flight = self.prompts.in_flight(self.state)
        restored.call_id, restored.incarnation = self.state.call_id, self.state.incarnation
        self.state = restored
        self.prompts = PromptStream(self._items(), restored, in_flight=in_flight)
