"""AttentionStore: each conversation's KV cache kept across turns in device, host and disk
memory, under byte budgets, with scheduler hints for fetching and eviction."""

from jattn.store.config import StoreConfig
from jattn.store.store import AttentionStore, BlockKV

__all__ = ["AttentionStore", "BlockKV", "StoreConfig"]
