"""Prices per model and the cost of one request.

Costs are integers in millionths of the registry's currency ("micros"): a price per
million tokens times a token count is then a cost in micros, sums stay exact, and every
store and Redis counts them without floating-point drift. A record's cost is rounded to
the nearest micro (at most half a micro off per request).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MICROS = 1_000_000


class Price(BaseModel):
    """Per million tokens, in the registry's currency. Reasoning tokens are output."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: float = Field(ge=0, le=1e6)
    cached_input: float | None = Field(
        default=None, ge=0, le=1e6, description="Input read from the prompt cache; `input` if unset"
    )
    output: float = Field(ge=0, le=1e6)
    # Speech models are priced by what they hear or say, on top of any token price.
    audio_second: float = Field(
        default=0, ge=0, le=1e6, description="Per second of audio heard or spoken"
    )
    million_characters: float = Field(
        default=0, ge=0, le=1e9, description="Per million characters spoken"
    )

    def cost_micros(
        self, prompt_tokens: int, cached_tokens: int, completion_tokens: int,
        audio_seconds: float = 0.0, characters: int = 0,
    ) -> int:  # fmt: skip
        cached = min(cached_tokens, prompt_tokens)
        cached_price = self.input if self.cached_input is None else self.cached_input
        return round(
            (prompt_tokens - cached) * self.input
            + cached * cached_price
            + completion_tokens * self.output
            # Tokens are priced per million and costs are in millionths: a token costs
            # `price` micros; a second costs a million times its price in micros.
            + audio_seconds * self.audio_second * MICROS
            + characters * self.million_characters
        )


def cost_micros(
    price: Price | None, prompt_tokens: int, cached_tokens: int, completion_tokens: int,
    audio_seconds: float = 0.0, characters: int = 0,
) -> int:  # fmt: skip
    """What a request cost; nothing for a model without a price."""
    if price is None:
        return 0
    return price.cost_micros(prompt_tokens, cached_tokens, completion_tokens,
                             audio_seconds, characters)  # fmt: skip


def as_money(micros: int) -> float:
    return micros / MICROS


def to_micros(amount: float) -> int:
    return round(amount * MICROS)
