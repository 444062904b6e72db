"""Fixed-size KV blocks with reference counts and a prefix cache.

A full block's identity is hash(parent block's hash, its token ids); a hit is checked against the
stored (parent hash, token ids). Blocks whose last reference goes away keep their contents and
stay findable (LRU order) until a new allocation evicts them.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from .sequence import Sequence


class NoFreeBlocks(RuntimeError):
    pass


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        self.key: list[tuple | None] = [None] * num_blocks  # (parent hash, tokens) of a cached block
        self.hash: list[int | None] = [None] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))  # unreferenced, holding nothing cached
        self.evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced cached blocks, LRU first
        self.table: dict[int, int] = {}  # hash -> block
        self.hit_tokens = 0
        self.query_tokens = 0

    # -- counts -------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks an allocation can take (free + evictable cached)."""
        return len(self.free) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self.table)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    # -- allocation ---------------------------------------------------------------------------
    def _take(self) -> int:
        if self.free:
            b = self.free.popleft()
        elif self.evictable:
            b, _ = self.evictable.popitem(last=False)
            del self.table[self.hash[b]]
            self.hash[b] = self.key[b] = None
        else:
            raise NoFreeBlocks("no free KV blocks")
        self.ref[b] = 1
        return b

    def allocate_new(self) -> int:
        """A fresh block with one reference (for forks)."""
        return self._take()

    def ensure(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow seq's block table to hold num_tokens slots. False (and no change) if blocks run out."""
        need = self.blocks_needed(seq, num_tokens)
        if need > self.num_free:
            return False
        for _ in range(need):
            seq.block_table.append(self._take())
        return True

    def free_seq(self, seq: Sequence) -> None:
        """Drop seq's references; the tail is freed first so it is evicted first."""
        for b in reversed(seq.block_table):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if self.hash[b] is not None:
                    self.evictable[b] = None
                else:
                    self.free.append(b)
            elif self.ref[b] < 0:
                raise AssertionError(f"block {b} freed twice")
        seq.block_table = []
        seq.num_hashed_blocks = 0
        seq.block_hashes = []

    def share(self, seq: Sequence, blocks: list[int]) -> None:
        """Add references to already-filled blocks (n > 1 children share the prompt's blocks)."""
        for b in blocks:
            self._ref(b)
        seq.block_table.extend(blocks)

    def _ref(self, b: int) -> None:
        if self.ref[b] == 0:
            self.evictable.pop(b, None)
        self.ref[b] += 1

    # -- prefix cache -------------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> int:
        """Attach cached blocks for seq's leading full blocks (keeping at least one token to
        compute, so the step yields logits). Returns the number of tokens found."""
        if not self.enable_prefix_caching or seq.block_table:
            return 0
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        parent = None
        found: list[tuple[int, int]] = []
        for i in range(max_blocks):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = hash((parent, tokens))
            b = self.table.get(h)
            if b is None or self.key[b] != (parent, tokens):
                break
            found.append((b, h))
            parent = h
        for b, h in found:
            self._ref(b)
            seq.block_table.append(b)
            seq.block_hashes.append(h)
        seq.num_hashed_blocks = len(found)
        n = len(found) * bs
        seq.num_computed = n
        return n

    def count_lookup(self, num_tokens: int, hit_tokens: int) -> None:
        self.hit_tokens += hit_tokens
        self.query_tokens += num_tokens

    def register_full_blocks(self, seq: Sequence) -> None:
        """Enter seq's newly completed blocks into the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = seq.num_computed // bs
        while seq.num_hashed_blocks < full:
            i = seq.num_hashed_blocks
            parent = seq.block_hashes[i - 1] if i else None
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = hash((parent, tokens))
            b = seq.block_table[i]
            if h not in self.table and self.hash[b] is None:
                self.table[h] = b
                self.hash[b], self.key[b] = h, (parent, tokens)
            seq.block_hashes.append(h)
            seq.num_hashed_blocks += 1

    def reset_prefix_cache(self) -> None:
        for b in list(self.evictable):
            self.free.append(b)
        self.evictable.clear()
        for b in range(self.num_blocks):
            self.hash[b] = self.key[b] = None
        self.table.clear()

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0
