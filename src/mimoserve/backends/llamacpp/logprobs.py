"""Log-probabilities of sampled tokens, read from the logits llama.cpp computed.

They are the model's own distribution at that step (a log-softmax of the raw logits),
before temperature, penalties or cuts: what vLLM reports by default and what OpenAI's
`logprobs` describe.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from mimoserve.events import RivalToken, TokenLogprob

TokenBytes = Callable[[int], bytes]


def log_softmax(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    shifted = logits - np.max(logits)
    return shifted - np.log(np.sum(np.exp(shifted)))  # type: ignore[no-any-return]


def _as_text(data: bytes) -> str:
    # A token may hold part of a character; its exact bytes are in `token_bytes`.
    return data.decode("utf-8", errors="replace")


def token_logprob(
    dist: npt.NDArray[np.float32], token: int, rivals: int, token_bytes: TokenBytes
) -> TokenLogprob:
    """The sampled token's log-probability and the `rivals` most likely tokens."""
    top: tuple[RivalToken, ...] = ()
    if rivals:
        best = np.argpartition(dist, -rivals)[-rivals:]
        best = best[np.argsort(dist[best])[::-1]]
        top = tuple(
            RivalToken(_as_text(piece := token_bytes(int(i))), tuple(piece), float(dist[i]))
            for i in best
        )
    piece = token_bytes(token)
    return TokenLogprob(_as_text(piece), tuple(piece), float(dist[token]), top)
