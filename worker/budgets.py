"""What one upstream call may carry (``BatchingConfig``): how many inputs, how long the first may wait, how many
calls at once, and the byte and token budgets the batcher weighs inputs against. Both lanes build their batches
from it, so it sits beside neither."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from worker import limits
from worker.inputs import ENTRY_OVERHEAD, EmbedInput, cost
from worker.messages import EmbedConfig

if TYPE_CHECKING:
    from worker.settings import Settings

Weigher = Callable[[EmbedInput], tuple[int, int]]  # an input's (bytes, tokens): ``weigh``


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    max_size: int
    max_wait_s: float
    max_concurrent: int
    max_request_bytes: int = limits.MAX_REQUEST_BYTES  # one call's body (UPSTREAM_MAX_REQUEST_BYTES)
    max_tokens_per_call: int = 0  # estimated tokens in one call (UPSTREAM_MAX_TOKENS_PER_CALL); 0 = no limit
    # weighing()'s answer per model: it is asked on every submit (batcher) and every request (service)
    _weighings: dict[str, Weigher | None] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> BatchingConfig:
        return cls(
            settings.batch_max_size,
            settings.batch_max_wait_ms / 1000,
            settings.max_concurrent_batches,
            settings.upstream_max_request_bytes,
            settings.upstream_max_tokens_per_call,
        )

    @property
    def budgets(self) -> tuple[int, int]:
        """(bytes, tokens) a batch may hold: the request's own framing is kept out of the byte budget."""
        return self.max_request_bytes - CALL_OVERHEAD, self.max_tokens_per_call

    def over_budget(self, item: EmbedInput) -> str | None:
        """Why an input can never be sent (it alone breaks a budget), or None."""
        tokens, size = cost(item)
        if size > self.budgets[0]:
            return f"about {size} bytes in the API request; one call carries {self.max_request_bytes}"
        if self.max_tokens_per_call and tokens > self.max_tokens_per_call:
            return f"about {tokens} tokens; one call carries {self.max_tokens_per_call}"
        return None

    def weighing(self, config: EmbedConfig) -> Weigher | None:
        """How the batcher weighs this configuration's items, or None when no budget can bind: a full batch of
        a text-only model's longest texts stays under the byte budget (2,048 tokens x 4 characters x 4 bytes
        x 100 is 3.3 MB), so the common case pays nothing for budgets. Worked out once per model."""
        try:
            return self._weighings[config.model]
        except KeyError:
            pass
        model = limits.model(config.model)
        worst = model.max_tokens * limits.CHARS_PER_TOKEN * 4 + ENTRY_OVERHEAD
        binds = model.multimodal or self.max_tokens_per_call or worst * self.max_size > self.budgets[0]
        answer = weigh if binds else None
        self._weighings[config.model] = answer
        return answer


CALL_OVERHEAD = 64  # {"requests": [...]} around the entries


def weigh(item: EmbedInput) -> tuple[int, int]:
    """An input's weights in the order of ``BatchingConfig.budgets``: (bytes, tokens)."""
    tokens, size = cost(item)
    return size, tokens
