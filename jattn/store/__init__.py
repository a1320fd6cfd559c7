"""AttentionStore: KV blocks kept by their content key in host memory and on disk, for any
request with the same prefix to reuse, and each session's record, under byte budgets,
with scheduler hints for fetching and eviction."""

from jattn.store.config import StoreConfig
from jattn.store.store import AttentionStore, BlockKV

__all__ = ["AttentionStore", "BlockKV", "StoreConfig"]
