"""The base of every request model: strict types, and `null` read as "not given"."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


class WireModel(BaseModel):
    # Strict: a string where a number belongs is a 400, not silently coerced.
    # Unknown fields are tolerated (clients add their own); subclasses may keep them.
    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_absent(cls, data: Any) -> Any:
        # OpenAI's schema makes every optional parameter nullable and SDKs send nulls
        # (`"stream": null`): an optional field given as null takes its default.
        # Required fields keep their null, so leaving one out is still refused.
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        dropped = [
            name
            for name, value in data.items()
            if value is None and (field := fields.get(name)) is not None and not field.is_required()
        ]
        if not dropped:
            return data
        return {name: value for name, value in data.items() if name not in dropped}
