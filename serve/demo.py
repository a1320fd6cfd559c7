"""The main job: a scripted multi-turn conversation with `jattn-serve` over gRPC, with
KV reuse on and off, and a table of what each turn cost.

Two servers run the embedded model on loopback: one with the AttentionStore, one that
recomputes every turn's whole conversation (as a server without KV reuse prefills a
stateless request carrying it). Each holds the same conversation, after holding it once
under another tenant's token: that compiles every shape (so compile time is in neither
column) and leaves nothing the demo's tenant may reuse.
"""

from __future__ import annotations

from serve.client import Client
from serve.config import ServeConfig
from serve.server import Server

OPENING = ("Once upon a time, there was a little girl named Lily. She loved to play in the "
           "park with her friends. One day, she saw a big red ball under a tree. She ran "
           "to the ball and picked it up. It was soft and round. Lily wanted to show it to "
           "her mom, so she ran home as fast as she could. Her mom smiled and said they "
           "could play with it after lunch. Lily was so happy that she sang a song while "
           "she waited. Tell me what happened next.")
FOLLOW_UPS = ["What did Lily do after lunch?", "Did her friend Tom come to play?",
              "Then it started to rain.", "What did they do inside?",
              "At night the stars came out.", "How did the day end?",
              "Tell me one more thing.", "The end."]


def converse(client: Client, session: str, turns: int, max_tokens: int):
    messages = [OPENING] + FOLLOW_UPS[:turns - 1]
    return [client.chat(session, message, max_tokens=max_tokens, ignore_eos=True)
            for message in messages]


def run_demo(*, turns: int = 6, max_tokens: int = 32) -> list[dict]:
    """Runs the conversation on both servers, prints the table, returns its rows."""
    # Two tenants: the warm-up runs the very same conversation (so it compiles every
    # shape the demo meets) under another token, whose KV the demo can never reuse.
    tokens = {"warm-up": "token-of-the-warm-up", "demo": "token-of-the-demo"}
    servers = {reuse: Server(ServeConfig(port=0, http_port=0, store=reuse, warm_up=False,
                                         auth_tokens=list(tokens.values()))).start()
               for reuse in (True, False)}
    try:
        replies = {}
        for reuse, server in servers.items():
            clients = {name: Client(f"127.0.0.1:{server.port}", token=token)
                       for name, token in tokens.items()}
            clients["demo"].wait_ready()
            converse(clients["warm-up"], "conversation", turns, max_tokens)
            replies[reuse] = converse(clients["demo"], "conversation", turns, max_tokens)
            for client in clients.values():
                client.close()
    finally:
        for server in servers.values():
            server.stop()
    rows = []
    print(f"\n{turns}-turn conversation with jattn-serve (embedded stories260K) over gRPC\n")
    print(f"{'turn':>4} {'new tok':>7} {'TTFT reuse ms':>14} {'TTFT recompute ms':>18} "
          f"{'ratio':>6} {'reused tok':>10}  KV came from")
    for turn, (on, off) in enumerate(zip(replies[True], replies[False]), start=1):
        tiers = ", ".join(f"{tier} {blocks} blocks"
                          for tier, blocks in sorted(on.facts.tier_blocks.items())) or "-"
        row = {"turn": turn, "new_tokens": on.facts.input_tokens,
               "ttft_reuse_s": on.facts.ttft_s, "ttft_recompute_s": off.facts.ttft_s,
               "reused_tokens": on.facts.cached_tokens, "tiers": dict(on.facts.tier_blocks),
               "same_answer": on.token_ids == off.token_ids}
        rows.append(row)
        print(f"{turn:>4} {row['new_tokens']:>7} {row['ttft_reuse_s'] * 1e3:>14.2f} "
              f"{row['ttft_recompute_s'] * 1e3:>18.2f} "
              f"{row['ttft_reuse_s'] / row['ttft_recompute_s']:>6.2f} "
              f"{row['reused_tokens']:>10}  {tiers}")
    same = all(row["same_answer"] for row in rows)
    print(f"\nanswers with reuse {'equal' if same else 'DIFFER FROM'} the recomputed ones")
    return rows
