"""Prometheus metrics. Names follow vLLM's (`vllm:` becomes `mimoserve:`) where the same
thing is measured, so dashboards built for vLLM carry over."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from mimoserve.events import KvCells, KvTierStats, ReplicaRoutingCounts

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20)

_Labelled = Counter | Gauge | Histogram
# (model) -> (running, waiting)
LoadProbe = Callable[[], dict[str, tuple[int, int]]]
# () -> (usage records waiting to be written, records the store refused and set aside)
LedgerProbe = Callable[[], tuple[int, int]]
# (model) -> its engine's KV pool, for engines we can see into
MemoryProbe = Callable[[], dict[str, KvCells]]
# (model) -> what fleet routing counted per replica (name, counts)
RoutingProbe = Callable[[], dict[str, list[ReplicaRoutingCounts]]]


class Metrics:
    def __init__(
        self,
        load_probe: LoadProbe | None = None,
        ledger_probe: LedgerProbe | None = None,
        memory_probe: MemoryProbe | None = None,
        routing_probe: RoutingProbe | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self._routing_probe = routing_probe
        self._load_probe = load_probe
        self._memory_probe = memory_probe
        self._ledger_probe = ledger_probe
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry
        self.requests = Counter(
            "mimoserve:requests", "Chat requests by model and HTTP status", ["model", "status"],
            registry=r,
        )  # fmt: skip
        self.request_success = Counter(
            "mimoserve:request_success", "Finished generations by finish reason",
            ["model", "finished_reason"], registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "mimoserve:prompt_tokens", "Prompt tokens processed", ["model"], registry=r
        )
        self.generation_tokens = Counter(
            "mimoserve:generation_tokens", "Completion tokens generated", ["model"], registry=r
        )
        self.cached_tokens = Counter(
            "mimoserve:prompt_tokens_cached", "Prompt tokens reused from the KV cache", ["model"],
            registry=r,
        )  # fmt: skip
        # Speculative decoding, per request as the engine reports it: the acceptance rate
        # is accepted / draft.
        self.draft_tokens = Counter(
            "mimoserve:spec_draft_tokens", "Tokens guessed by speculative decoding and verified",
            ["model"], registry=r,
        )  # fmt: skip
        self.accepted_draft_tokens = Counter(
            "mimoserve:spec_accepted_tokens",
            "Guessed tokens the sampler chose (kept in the output)", ["model"], registry=r,
        )  # fmt: skip
        self.rejected_draft_tokens = Counter(
            "mimoserve:spec_rejected_tokens", "Guessed tokens the sampler did not choose",
            ["model"], registry=r,
        )  # fmt: skip
        self.audio_seconds = Counter(
            "mimoserve:audio_seconds", "Seconds of audio heard (recognition) or spoken (synthesis)",
            ["model"], registry=r,
        )  # fmt: skip
        self.speech_characters = Counter(
            "mimoserve:speech_characters", "Characters of text spoken by speech synthesis",
            ["model"], registry=r,
        )  # fmt: skip
        self.e2e_latency = Histogram(
            "mimoserve:e2e_request_latency_seconds", "Request latency", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "mimoserve:time_to_first_token_seconds", "Time to first token", ["model"],
            buckets=_TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.aborted = Counter(
            "mimoserve:request_aborted", "Generations cut short (client gone, engine error)",
            ["model", "reason"], registry=r,
        )  # fmt: skip
        self.rate_limited = Counter(
            "mimoserve:rate_limit_refusals", "Requests refused by rate limits", ["model"],
            registry=r,
        )  # fmt: skip
        self.budget_refused = Counter(
            "mimoserve:budget_refusals", "Requests refused because a budget was spent (402)",
            ["model"], registry=r,
        )  # fmt: skip
        # No account or key appears in a label: /metrics is open to whoever reaches the
        # port, and per-owner series told anyone which accounts exist and how much of
        # their budget each had spent. Who is over: the admin API and the dashboard.
        self.budgets_over_soft = Gauge(
            "mimoserve:budgets_over_soft_threshold",
            "Budgets whose spend has passed their soft threshold", ["scope"], registry=r,
        )  # fmt: skip
        self._over_soft: dict[str, set[str]] = {}  # scope -> owners past the threshold
        self.running = Gauge(
            "mimoserve:num_requests_running", "Requests generating now", ["model"], registry=r
        )
        self.waiting = Gauge(
            "mimoserve:num_requests_waiting", "Requests queued for the engine", ["model"],
            registry=r,
        )  # fmt: skip
        self.kv_cells = Gauge(
            "mimoserve:kv_cache_cells",
            "KV pool cells (tokens): used by running requests, cached prefixes, free",
            ["model", "state"], registry=r,
        )  # fmt: skip
        self.kv_usage = Gauge(
            "mimoserve:kv_cache_usage_perc", "Share of the KV pool running requests use (0-1)",
            ["model"], registry=r,
        )  # fmt: skip
        self.preemptions = Counter(
            "mimoserve:kv_preemptions", "Sequences pre-empted because the KV pool was full",
            ["model"], registry=r,
        )  # fmt: skip
        self.constraint_timeouts = Counter(
            "mimoserve:constraint_step_timeouts",
            "Sequences ended because their grammar took too long for one token", ["model"],
            registry=r,
        )  # fmt: skip
        # The tiers under the pool (host memory, disk): where uncomputed prompt tokens
        # came from, and what the tiers cost.
        self.kv_tier_hits = Counter(
            "mimoserve:kv_tier_hits", "Requests that reused cached prompt cells, by tier",
            ["model", "tier"], registry=r,
        )  # fmt: skip
        self.kv_tier_tokens = Counter(
            "mimoserve:kv_tier_tokens", "Prompt tokens served from a cache tier instead of "
            "computed", ["model", "tier"], registry=r,
        )  # fmt: skip
        self.kv_tier_bytes = Gauge(
            "mimoserve:kv_tier_bytes", "Bytes of KV cells held by the host and disk tiers",
            ["model", "tier"], registry=r,
        )  # fmt: skip
        self.kv_tier_seconds = Counter(
            "mimoserve:kv_tier_seconds", "Time spent moving cells: capture (out of the pool), "
            "store (writing), load (back into the pool)", ["model", "operation"], registry=r,
        )  # fmt: skip
        self.kv_tier_failures = Counter(
            "mimoserve:kv_tier_failures", "Stores that failed (full disk, queue full) and "
            "stored cells refused at load (torn, foreign)", ["model", "operation"], registry=r,
        )  # fmt: skip
        self.kv_tier_spilled = Counter(
            "mimoserve:kv_tier_spilled_cells", "Idle cached cells moved out of the pool "
            "while requests ran", ["model"], registry=r,
        )  # fmt: skip
        self._engine_counts: dict[tuple[tuple[str, ...], str], float] = {}
        # Fleet routing (upstream replicas), as counted by this gateway.
        self.fleet_routed = Counter(
            "mimoserve:fleet_routed",
            "Requests sent to each replica, by whether routing expected it to hold part of "
            "the prompt in its cache", ["model", "replica", "predicted"], registry=r,
        )  # fmt: skip
        self.fleet_prompt_tokens = Counter(
            "mimoserve:fleet_prompt_tokens", "Prompt tokens each replica reported",
            ["model", "replica"], registry=r,
        )  # fmt: skip
        self.fleet_cached_tokens = Counter(
            "mimoserve:fleet_cached_tokens", "Prompt tokens each replica reported as cached",
            ["model", "replica"], registry=r,
        )  # fmt: skip
        self.fleet_reliability = Gauge(
            "mimoserve:fleet_replica_reliability",
            "How much of the predicted cached prefix each replica reported holding (0-1)",
            ["model", "replica"], registry=r,
        )  # fmt: skip
        self.ledger_pending = Gauge(
            "mimoserve:usage_records_pending", "Usage records not yet in the database",
            registry=r,
        )  # fmt: skip
        self.ledger_set_aside = Gauge(
            "mimoserve:usage_records_set_aside", "Usage records the database refused (logged)",
            registry=r,
        )  # fmt: skip

    def child(self, metric: _Labelled, *labels: str) -> Any:
        """`metric.labels(*labels)`, remembered: prometheus_client builds and locks on
        every call, which on a busy relay was a few percent of each request. Labels are
        bounded (served model ids, status codes, finish reasons), so is this cache."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def budget_flag(self, scope: str, owner: str, over_soft: bool) -> None:
        """Notes whether one budget is past its soft threshold; /metrics shows the count
        per scope."""
        owners = self._over_soft.setdefault(scope, set())
        if over_soft:
            owners.add(owner)
        else:
            owners.discard(owner)
        self.child(self.budgets_over_soft, scope).set(len(owners))

    def _count_up(
        self, counter: Counter, labels: str | tuple[str, ...], name: str, total: float
    ) -> None:
        """Moves a counter to an engine's own running total (engines count, we export)."""
        key = (labels,) if isinstance(labels, str) else labels
        seen = self._engine_counts.get((key, name), 0)
        if total > seen:
            counter.labels(*key).inc(total - seen)
            self._engine_counts[(key, name)] = total

    def _render_routing(self, routing: dict[str, list[ReplicaRoutingCounts]]) -> None:
        for model, replicas in routing.items():
            for counts in replicas:
                replica = counts.replica
                hits, misses = counts.predicted_hits, counts.routed - counts.predicted_hits
                routed = self.fleet_routed
                self._count_up(routed, (model, replica, "hit"), "routed", hits)
                self._count_up(routed, (model, replica, "miss"), "routed", misses)
                self._count_up(self.fleet_prompt_tokens, (model, replica), "prompt",
                               counts.prompt_tokens)  # fmt: skip
                self._count_up(self.fleet_cached_tokens, (model, replica), "cached",
                               counts.cached_tokens)  # fmt: skip
                self.fleet_reliability.labels(model, replica).set(counts.reliability)

    def _render_tiers(self, model: str, tiers: KvTierStats) -> None:
        for tier, hits, tokens in (
            ("pool", tiers.pool_hits, tiers.pool_tokens),
            ("host", tiers.host_hits, tiers.host_tokens),
            ("disk", tiers.disk_hits, tiers.disk_tokens),
        ):
            # Every tier's series exists from the start (at 0), so a rate is defined.
            self.child(self.kv_tier_hits, model, tier)
            self.child(self.kv_tier_tokens, model, tier)
            self._count_up(self.kv_tier_hits, (model, tier), "hits", hits)
            self._count_up(self.kv_tier_tokens, (model, tier), "tokens", tokens)
        self.kv_tier_bytes.labels(model, "disk").set(tiers.disk_bytes)
        self.kv_tier_bytes.labels(model, "host").set(tiers.host_bytes)
        for operation, seconds in (
            ("capture", tiers.capture_seconds),
            ("store", tiers.store_seconds),
            ("load", tiers.load_seconds),
        ):
            self._count_up(self.kv_tier_seconds, (model, operation), "seconds", seconds)
        self._count_up(self.kv_tier_failures, (model, "store"), "failures",
                       tiers.store_failures)  # fmt: skip
        self._count_up(self.kv_tier_failures, (model, "load"), "failures", tiers.load_failures)
        self._count_up(self.kv_tier_spilled, model, "spilled", tiers.spilled_cells)

    def render(self) -> bytes:
        if self._load_probe is not None:
            for model, (running, waiting) in self._load_probe().items():
                self.running.labels(model).set(running)
                self.waiting.labels(model).set(waiting)
        if self._memory_probe is not None:
            for model, cells in self._memory_probe().items():
                self.kv_cells.labels(model, "used").set(cells.used)
                self.kv_cells.labels(model, "cached").set(cells.cached)
                self.kv_cells.labels(model, "free").set(cells.free)
                self.kv_usage.labels(model).set(cells.used / cells.total if cells.total else 0)
                self._count_up(self.preemptions, model, "preemptions", cells.preemptions)
                self._count_up(
                    self.constraint_timeouts, model, "constraint", cells.constraint_timeouts
                )
                if cells.tiers is not None:
                    self._render_tiers(model, cells.tiers)
        if self._routing_probe is not None:
            self._render_routing(self._routing_probe())
        if self._ledger_probe is not None:
            pending, set_aside = self._ledger_probe()
            self.ledger_pending.set(pending)
            self.ledger_set_aside.set(set_aside)
        return generate_latest(self.registry)
