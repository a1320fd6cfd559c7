"""What `jattn stats` and `jattn describe` print: a short table for a person, or JSON
for a script, of a server's `ServerStatsResponse` and a session's `SessionInfo`."""

from __future__ import annotations

import json

from google.protobuf import descriptor, json_format

_INT64 = (descriptor.FieldDescriptor.CPPTYPE_INT64, descriptor.FieldDescriptor.CPPTYPE_UINT64)
# (tier, its store counter for blocks held, for bytes held as its budget counts them)
TIERS = (("hbm", "hbm_blocks", None), ("host", "host_blocks", "host_bytes"),
         ("disk", "disk_blocks", "disk_bytes"), ("remote", "remote_blocks_known", None))


def as_json(message) -> str:
    """`message` (of scalar fields and maps) as indented JSON, fields under their proto
    names, zeros included, 64-bit integers as JSON numbers (protobuf's JSON mapping
    writes them as strings)."""
    values = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                       always_print_fields_with_no_presence=True)
    for field in message.DESCRIPTOR.fields:
        if field.cpp_type in _INT64 and field.name in values:
            values[field.name] = int(values[field.name])
    return json.dumps(values, indent=2, sort_keys=True)


def size(nbytes: float) -> str:
    """`nbytes` in B, KiB, MiB, GiB or TiB, three significant digits."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024:
            return f"{nbytes:.3g} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.3g} TiB"


def duration(seconds: float) -> str:
    """`seconds` as 1d02h, 3h04m, 5m06s or 7.8s."""
    seconds = int(seconds) if seconds >= 60 else seconds
    if seconds < 60:
        return f"{seconds:.1f}s"
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _rows(header: list[str], rows: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell; the first left-aligned, the others right."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                      for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
            for row in [header, *rows]]


def server_table(stats) -> str:
    """A `ServerStatsResponse` as a few lines: the server, its tokens and time to first
    token, then one row per tier in use (blocks, bytes, hits and their share of the
    lookups, bytes loaded, evictions), then the store's health counters."""
    store = dict(stats.store)
    context = stats.prefilled_tokens + stats.reused_tokens
    lines = [
        f"server   up {duration(stats.uptime_s)}, {stats.requests:,} requests, "
        f"{stats.active_sessions:,} sessions, {stats.running} running, {stats.queued} queued",
        f"tokens   {stats.generated_tokens:,} generated, {context:,} of context: "
        f"{stats.reused_tokens:,} reused"
        f"{f' ({stats.reused_tokens / context:.0%})' if context else ''}, "
        f"{stats.prefilled_tokens:,} prefilled",
        f"TTFT     p50 {stats.ttft_p50_s * 1000:.1f} ms, p99 {stats.ttft_p99_s * 1000:.1f} ms "
        f"(last {stats.ttft_turns:,} turns)" if stats.ttft_turns else "TTFT     no turn yet",
    ]
    if not store:
        return "\n".join(lines + ["store    off (every turn recomputes its history)"])
    lookups = sum(store.get(f"{tier}_hits", 0) for tier, _, _ in TIERS) + store.get("misses", 0)
    rows = []
    for tier, blocks, nbytes in TIERS:
        hits = store.get(f"{tier}_hits", 0)
        if tier in ("disk", "remote") and not (store.get(f"{tier}_tier_enabled") or hits
                                               or store.get(blocks)):
            continue
        rows.append([tier, f"{int(store.get(blocks, 0)):,}",
                     size(store[nbytes]) if nbytes else "-",
                     f"{int(hits):,}", f"{hits / lookups:.0%}" if lookups else "-",
                     size(store.get(f"{tier}_bytes_loaded", 0)),
                     f"{int(store[f'{tier}_evictions']):,}" if f"{tier}_evictions" in store
                     else "-"])
    rows.append(["miss", "", "", f"{int(store.get('misses', 0)):,}",
                 f"{store.get('misses', 0) / lookups:.0%}" if lookups else "-", "", ""])
    lines += [""] + _rows(["tier", "blocks", "bytes", "hits", "share", "loaded", "evicted"],
                          rows)
    health = [f"{name.replace('_', ' ')} {int(store[name]):,}"
              for name in ("corrupt_entries", "stale_entries", "disk_write_errors",
                           "remote_errors", "lost_sessions") if store.get(name)]
    if store.get("disk_write_errors") and not store.get("disk_tier_enabled"):
        health.append("disk tier disabled")
    if store.get("remote_tier_enabled") and not store.get("remote_available"):
        health.append("Redis unreachable")
    lines += ["", "health   " + (", ".join(health) if health else "no faults")]
    return "\n".join(lines)


def session_table(info) -> str:
    """A `SessionInfo` as a few lines: turns, tokens, and its blocks per tier."""
    blocks = ", ".join(f"{tier} {count:,}" for tier, count in
                       sorted(info.resident_blocks_by_tier.items())) or "none"
    return "\n".join([
        f"session  {info.session_id}",
        f"turns    {info.turns:,}",
        f"tokens   {info.context_tokens:,} in the context window, {info.history_tokens:,} "
        f"in the conversation, {info.dropped_tokens:,} truncated out",
        f"blocks   {blocks}",
    ])
