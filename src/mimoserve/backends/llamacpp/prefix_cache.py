"""Shared prompt prefixes: a radix tree over token ids whose nodes own KV cells.

The idea is SGLang's RadixAttention, on llama.cpp's unified KV cache. In that cache a
cell belongs to a set of sequence ids, and `llama_memory_seq_cp` adds an id to the
cells of another (the cells are shared, not copied). So each tree node holds the cells
of its edge under a sequence id of its own (its *holder*); a request that starts with a
cached prefix gets its running sequence added to those cells and computes only the
rest. Cells are freed when no id holds them any more.

A node that a running sequence attends to is *locked* (reference count); only unlocked
leaves are evicted, least recently used first, and only as far as room is needed.

Positions: a node's edge covers positions [start, end) of every sequence through it,
because all prompts start at position 0.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol


class KvMemory(Protocol):
    """The two operations on llama.cpp's memory the tree needs."""

    def copy(self, src: int, dst: int, start: int, end: int) -> None:
        """Adds `dst` to the cells of `src` at positions [start, end) (sharing them)."""
        ...

    def remove(self, seq: int, start: int = 0, end: int = -1) -> None:
        """Takes `seq` off its cells at positions [start, end); -1 is the end."""
        ...


_clock = itertools.count()


def _now() -> float:
    # Monotonic time plus a tie-breaker: two touches in one clock tick keep their order.
    return time.monotonic() + next(_clock) * 1e-12


@dataclass(eq=False)
class Node:
    tokens: list[int]  # the edge: tokens at positions [start, end)
    start: int
    holder: int  # the sequence id that holds these cells (-1 for the root)
    parent: Node | None
    children: dict[int, Node] = field(default_factory=dict)  # by first token
    refs: int = 0  # running sequences attending to (a part of) this node
    last_used: float = field(default_factory=_now)

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    def path_tokens(self) -> list[int]:
        """The tokens of every position up to this node's end (from the root down)."""
        edges: list[list[int]] = []
        node: Node | None = self
        while node is not None:
            edges.append(node.tokens)
            node = node.parent
        return [token for edge in reversed(edges) for token in edge]


@dataclass(frozen=True)
class Match:
    """The longest cached prefix of a token list: the nodes it goes through (the last
    one may be matched only in part) and how many tokens it covers."""

    nodes: tuple[Node, ...]
    length: int


def common_prefix(a: list[int], b: list[int], start_b: int = 0) -> int:
    n = 0
    limit = min(len(a), len(b) - start_b)
    while n < limit and a[n] == b[start_b + n]:
        n += 1
    return n


class PrefixCache:
    def __init__(self, memory: KvMemory, holder_ids: Iterable[int]) -> None:
        self._memory = memory
        self._free_ids = list(holder_ids)[::-1]
        self.root = Node(tokens=[], start=0, holder=-1, parent=None)
        self.cells = 0  # cells the tree holds
        self.locked_cells = 0  # of those, cells of nodes some running sequence attends to

    # ---- looking up ----------------------------------------------------------------

    def match(self, tokens: list[int]) -> Match:
        node, pos, path = self.root, 0, []
        now = _now()
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                break
            k = common_prefix(child.tokens, tokens, pos)
            child.last_used = now
            path.append(child)
            pos += k
            if k < len(child.tokens):
                break
            node = child
        return Match(tuple(path), pos)

    def attach(self, seq: int, match: Match, upto: int) -> None:
        """Shares the cells of the first `upto` matched tokens with `seq`. The caller has
        locked the match (`lock(match.nodes[-1])`) before making room for the rest."""
        for node in match.nodes:
            if node.start >= upto:
                break
            self._memory.copy(node.holder, seq, node.start, min(node.end, upto))

    def lock(self, deepest: Node | None) -> None:
        """Locks a node and every node above it: a sequence attends to the whole path."""
        node = deepest
        while node is not None and node is not self.root:
            if node.refs == 0:
                self.locked_cells += len(node.tokens)
            node.refs += 1
            node = node.parent

    def unlock(self, deepest: Node | None) -> None:
        now = _now()
        node = deepest
        while node is not None and node is not self.root:
            node.refs -= 1
            assert node.refs >= 0, "a node was unlocked more often than locked"
            if node.refs == 0:
                self.locked_cells -= len(node.tokens)
            node.last_used = now
            node = node.parent

    # ---- adding ----------------------------------------------------------------------

    def insert(
        self, seq: int, tokens: list[int], shared: int, holding: Node | None
    ) -> tuple[Node | None, int]:
        """Caches the cells `seq` holds for `tokens` (positions 0..len-1).

        `seq` already shares its first `shared` tokens with the tree, through the path
        that ends at `holding` (locked). Where the tree already had more of the tokens from
        someone else, `seq` drops its own duplicate cells and shares the tree's instead.
        Returns the deepest node `seq` now attends to (locked in place of `holding`) and
        how many of its tokens are shared."""
        node, pos, path = self.root, 0, []
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                break
            k = common_prefix(child.tokens, tokens, pos)
            if pos + k == len(tokens):  # the tokens end inside this node: all cached
                path.append(child)
                pos = len(tokens)
                break
            if k < len(child.tokens):
                head = self._split(child, k, keep=path)
                if head is None:
                    break
                child = head
            path.append(child)
            pos += len(child.tokens)
            node = child
        if pos < shared:
            return holding, shared  # no sequence id to split with: nothing changes
        if pos < len(tokens) and (holder := self._take_id(keep=path)) is not None:
            self._memory.copy(seq, holder, pos, len(tokens))
            leaf = Node(tokens=tokens[pos:], start=pos, holder=holder, parent=node)
            node.children[tokens[pos]] = leaf
            self.cells += len(leaf.tokens)
            path.append(leaf)
            pos = len(tokens)
        if pos > shared:
            # The tree had [shared, pos) already: share its cells, free ours.
            self._memory.remove(seq, shared, pos)
            for cached in path:
                if cached.end > shared and cached.start < pos:
                    start = max(cached.start, shared)
                    self._memory.copy(cached.holder, seq, start, min(cached.end, pos))
        deepest = path[-1] if path else None
        self.lock(deepest)
        self.unlock(holding)
        return deepest, pos

    def _split(self, node: Node, k: int, keep: list[Node]) -> Node | None:
        """Cuts `node` after its first `k` tokens: the head becomes a new node (with a new
        holder) above the tail. Whoever locked the node now locks both halves (locks are
        taken and released along the path to the root). Returns the head, or None when
        no sequence id is free for it."""
        holder = self._take_id(keep=[*keep, node])
        if holder is None:
            return None
        parent = node.parent
        assert parent is not None
        head = Node(
            tokens=node.tokens[:k],
            start=node.start,
            holder=holder,
            parent=parent,
            refs=node.refs,
            last_used=node.last_used,
        )
        self._memory.copy(node.holder, holder, node.start, node.start + k)
        self._memory.remove(node.holder, node.start, node.start + k)
        parent.children[node.tokens[0]] = head
        node.tokens = node.tokens[k:]
        node.start += k
        node.parent = head
        head.children[node.tokens[0]] = node
        return head

    def _take_id(self, keep: list[Node]) -> int | None:
        if not self._free_ids:
            self._evict_leaf(keep)
        return self._free_ids.pop() if self._free_ids else None

    # ---- evicting --------------------------------------------------------------------

    def evictable(self) -> int:
        return self.cells - self.locked_cells

    def evict(self, cells: int) -> int:
        """Frees at least `cells` cells if that many are unlocked; returns how many were."""
        freed = 0
        while freed < cells:
            leaf = self._lru_leaf(keep=[])
            if leaf is None:
                break
            want = cells - freed
            if want < len(leaf.tokens):
                # Trim the leaf's tail: the start of a prefix is what others reuse.
                cut = leaf.end - want
                self._memory.remove(leaf.holder, cut, leaf.end)
                del leaf.tokens[len(leaf.tokens) - want :]
                self.cells -= want
                freed += want
            else:
                freed += self._drop(leaf)
        return freed

    def idle_leaves(self) -> list[Node]:
        """Leaves no running sequence attends to."""
        found: list[Node] = []
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node.refs == 0:
                found.append(node)
        return found

    def drop(self, leaf: Node) -> int:
        """Frees an idle leaf's cells; returns how many."""
        return self._drop(leaf)

    def clear(self) -> None:
        """Forgets everything (after an engine failure, cells are in an unknown state)."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            self._memory.remove(node.holder)
            self._free_ids.append(node.holder)
        self.root.children.clear()
        self.cells = self.locked_cells = 0

    def _evict_leaf(self, keep: list[Node]) -> None:
        leaf = self._lru_leaf(keep)
        if leaf is not None:
            self._drop(leaf)

    def _lru_leaf(self, keep: list[Node]) -> Node | None:
        idle = (leaf for leaf in self.idle_leaves() if leaf not in keep)
        return min(idle, key=lambda leaf: leaf.last_used, default=None)

    def _drop(self, leaf: Node) -> int:
        assert leaf.refs == 0 and not leaf.children and leaf.parent is not None
        self._memory.remove(leaf.holder)
        self._free_ids.append(leaf.holder)
        del leaf.parent.children[leaf.tokens[0]]
        self.cells -= len(leaf.tokens)
        return len(leaf.tokens)
