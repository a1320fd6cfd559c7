"""Llama-family models over a paged KV cache: config, modules, weights, cache, runner."""
