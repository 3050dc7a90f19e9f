"""What is known about the request being served, wherever the code runs for it."""

from __future__ import annotations

import contextvars

# Set by the HTTP layer for each request (api/request_id.py); read by logs and metering.
current_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
