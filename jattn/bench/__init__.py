"""Evidence tools: Mooncake trace replay against the engine or a server, and the
store's placement policy simulated at a trace's full size."""
