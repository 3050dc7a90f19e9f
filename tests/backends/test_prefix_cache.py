"""The prefix tree against a model of llama.cpp's unified KV cache.

`SimulatedKv` (fake_engine.py) keeps cells as llama.cpp does (a position, the token computed there, a
set of sequence ids; a cell no id holds is free) and does what `llama_memory_seq_cp` and
`llama_memory_seq_rm` do on one stream. A state machine then starts, caches, finishes
and evicts sequences in any order, with few tokens (many shared prefixes) and few spare
sequence ids (splits and inserts that find none), and checks after every step:

- every running sequence attends to exactly one cell per position, holding its tokens
  (sharing never gives a sequence someone else's cells or loses one of its own);
- every tree node's holder holds exactly its edge;
- the cells in use are exactly the tree's plus the sequences' own (the accounting the
  scheduler admits and evicts by), and locks match the running sequences' paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mimoserve.backends.llamacpp.prefix_cache import Node, PrefixCache
from tests.backends.fake_engine import SimulatedKv


@dataclass
class Lane:
    fed: list[int] = field(default_factory=list)
    shared: int = 0
    holding: Node | None = None


LANES = 3
tokens_strategy = st.lists(st.integers(0, 2), min_size=1, max_size=10)


class PrefixCacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.kv = SimulatedKv()
        self.cache = PrefixCache(self.kv, holder_ids=range(LANES, LANES + 5))
        self.lanes: dict[int, Lane] = {}

    @precondition(lambda self: len(self.lanes) < LANES)
    @rule(tokens=tokens_strategy)
    def start(self, tokens: list[int]) -> None:
        lane_id = next(i for i in range(LANES) if i not in self.lanes)
        match = self.cache.match(tokens)
        reuse = min(match.length, len(tokens) - 1)
        deepest = match.nodes[-1] if reuse > 0 else None
        self.cache.lock(deepest)
        self.cache.attach(lane_id, match, reuse)
        self.kv.compute(lane_id, tokens[reuse:], reuse)
        self.lanes[lane_id] = Lane(list(tokens), reuse, deepest)

    @precondition(lambda self: self.lanes)
    @rule(data=st.data(), more=tokens_strategy)
    def generate(self, data: st.DataObject, more: list[int]) -> None:
        lane_id = data.draw(st.sampled_from(sorted(self.lanes)))
        lane = self.lanes[lane_id]
        self.kv.compute(lane_id, more, len(lane.fed))
        lane.fed += more

    @precondition(lambda self: self.lanes)
    @rule(data=st.data())
    def cache_prompt(self, data: st.DataObject) -> None:
        lane_id = data.draw(st.sampled_from(sorted(self.lanes)))
        lane = self.lanes[lane_id]
        lane.holding, lane.shared = self.cache.insert(lane_id, lane.fed, lane.shared, lane.holding)

    @precondition(lambda self: self.lanes)
    @rule(data=st.data(), keep=st.booleans())
    def leave(self, data: st.DataObject, keep: bool) -> None:
        """A sequence ends (or is pre-empted, or cancelled): cached or just dropped."""
        lane_id = data.draw(st.sampled_from(sorted(self.lanes)))
        lane = self.lanes.pop(lane_id)
        holding = lane.holding
        if keep:
            holding, _ = self.cache.insert(lane_id, lane.fed, lane.shared, holding)
        self.cache.unlock(holding)
        self.kv.remove(lane_id)

    @rule(cells=st.integers(1, 30))
    def evict(self, cells: int) -> None:
        before = len(self.kv.cells)
        evictable = self.cache.evictable()
        freed = self.cache.evict(cells)
        assert freed == min(cells, evictable) or freed >= cells
        assert before - len(self.kv.cells) == freed

    # ---- what must always hold ----------------------------------------------------------

    @invariant()
    def lanes_see_their_own_tokens(self) -> None:
        for lane_id, lane in self.lanes.items():
            assert self.kv.view(lane_id) == list(enumerate(lane.fed))

    @invariant()
    def nodes_hold_their_edges(self) -> None:
        for node, path_tokens in self._nodes():
            expected = [(node.start + i, t) for i, t in enumerate(node.tokens)]
            assert self.kv.view(node.holder) == expected
            assert path_tokens[node.start :] == node.tokens

    @invariant()
    def accounting_matches_the_cells(self) -> None:
        private = sum(len(lane.fed) - lane.shared for lane in self.lanes.values())
        assert len(self.kv.cells) == self.cache.cells + private
        assert self.cache.cells == sum(len(node.tokens) for node, _ in self._nodes())

    @invariant()
    def locks_are_the_running_paths(self) -> None:
        expected: dict[int, int] = {}
        for lane in self.lanes.values():
            node = lane.holding
            while node is not None and node is not self.cache.root:
                expected[id(node)] = expected.get(id(node), 0) + 1
                node = node.parent
        for node, _ in self._nodes():
            assert node.refs == expected.get(id(node), 0)
        locked = sum(len(node.tokens) for node, _ in self._nodes() if node.refs)
        assert self.cache.locked_cells == locked

    def _nodes(self) -> list[tuple[Node, list[int]]]:
        found: list[tuple[Node, list[int]]] = []
        stack: list[tuple[Node, list[int]]] = [
            (child, []) for child in self.cache.root.children.values()
        ]
        while stack:
            node, above = stack.pop()
            path = above + node.tokens
            found.append((node, path))
            stack.extend((child, path) for child in node.children.values())
        return found


PrefixCacheMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None
)
TestPrefixCache = PrefixCacheMachine.TestCase
