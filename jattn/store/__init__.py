"""AttentionStore: KV blocks kept by their content key in tiers (host memory, local disk)
behind one interface (`BlockTier`), for any request with the same prefix to reuse, and
each session's record, under byte budgets, with scheduler hints for fetching and
eviction."""

from jattn.store.config import StoreConfig
from jattn.store.store import AttentionStore
from jattn.store.tier import BlockKV, BlockSpec, BlockTier

__all__ = ["AttentionStore", "BlockKV", "BlockSpec", "BlockTier", "StoreConfig"]
