"""Sampling parameters, their validation (InvalidRequest naming a bad one), and choosing
the next token from logits."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jattn.engine.errors import InvalidRequest

MAX_TOP_LOGPROBS = 20  # the most alternatives a token's log-probabilities list


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. `temperature=0` is greedy (argmax); `top_k=0` and `top_p=1`
    disable those filters (a `top_k` past the vocabulary keeps it all; a `top_p` however
    small keeps at least the most likely token); `stop` strings end the generation (not
    included). `seed` is an integer in [0, 2**64): all 64 bits choose the random stream
    (see `seed_key_data`); None draws one from the clock. `logprobs` k in [0,
    `MAX_TOP_LOGPROBS`] returns each token's log-probability and the k most likely
    tokens' (`token_logprobs`); None returns none."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None

    def __post_init__(self):
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) \
                or self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be an integer >= 1, got "
                                 f"{self.max_tokens!r}")
        if not _finite_number(self.temperature) or self.temperature < 0:
            raise InvalidRequest(f"temperature must be a finite number >= 0, got "
                                 f"{self.temperature!r}")
        if not _finite_number(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequest(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or
                                      not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**64):
            raise InvalidRequest(f"seed must be an integer in [0, 2**64) or None, "
                                 f"got {self.seed!r}")
        if self.logprobs is not None and (
                isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise InvalidRequest(f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}] or "
                                 f"None, got {self.logprobs!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if any(not isinstance(s, str) or not s for s in stop):
            raise InvalidRequest(f"stop must be non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


KEY_IMPL = "threefry2x32"


def seed_key_data(seed: int) -> np.ndarray:
    """The raw PRNG key data `[2]` uint32 of a 64-bit `seed`: its high and low 32-bit
    halves, so every seed in [0, 2**64) is its own stream (`jax.random.key` would keep
    only the low 32 bits without x64). Equals `jax.random.key(seed)`'s data for seeds
    below 2**32."""
    return np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


def _finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _sample_row(logits, key, temperature, top_k, top_p):
    """One row: `logits [V]` float32 and its parameters (scalars) -> an int32 token."""
    greedy = jnp.argmax(logits).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    vocab = logits.shape[-1]
    ordered = jnp.sort(scaled)[::-1]
    kth = ordered[jnp.clip(top_k, 1, vocab) - 1]
    scaled = jnp.where((top_k > 0) & (scaled < kth), -jnp.inf, scaled)
    ordered = jnp.sort(scaled)[::-1]
    probs = jax.nn.softmax(ordered)
    before = jnp.cumsum(probs) - probs
    kept = jnp.maximum(jnp.sum(before < top_p), 1)  # a top_p that rounds to 0 keeps one
    scaled = jnp.where(scaled < ordered[kept - 1], -jnp.inf, scaled)
    drawn = jax.random.categorical(key, scaled).astype(jnp.int32)
    return jnp.where(temperature == 0, greedy, drawn)


@jax.jit
def sample_rows(logits, key_data, draws, temperature, top_k, top_p):
    """Next token of every row of `logits [R, V]` float32 -> int32 `[R]`, each row with
    its own parameters, all `[R]`: `key_data` (raw threefry key data, `[R, 2]` uint32, from
    `seed_key_data`), `draws` (the row's key is folded with it: the sequence's
    count of earlier draws), `temperature` float32, `top_k` int32, `top_p` float32.

    One call samples a whole decode batch (parameters are traced, so one compiled
    function serves every mix of settings). Temperature 0 is argmax. Top-k keeps the k
    largest logits (ties at the k-th kept); top-p keeps the smallest set of most likely
    tokens whose probability reaches p (the most likely token always stays). A batch
    with every row greedy skips the sorts the filters need.
    """

    def drawn():
        keys = jax.vmap(jax.random.fold_in)(
            jax.random.wrap_key_data(key_data, impl=KEY_IMPL), draws)
        return jax.vmap(_sample_row)(logits, keys, temperature, top_k, top_p)

    def greedy():
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return jax.lax.cond(jnp.all(temperature == 0), greedy, drawn)


def draw_arguments(draws, rows: int) -> tuple[np.ndarray, ...]:
    """The arrays `sample_rows` takes for `rows` rows: row i from `draws[i]` (a
    `jattn.model.step_plan.Draw`, or None), every other row greedy (the cheapest).
    Returns (key_data `[rows, 2]` uint32, numbers int32, temperature float32, top_k
    int32, top_p float32), each `[rows]`."""
    key_data = np.zeros((rows, 2), np.uint32)
    numbers = np.zeros(rows, np.int32)
    temperature = np.zeros(rows, np.float32)
    top_k = np.zeros(rows, np.int32)
    top_p = np.ones(rows, np.float32)
    for row, draw in enumerate(draws):
        if draw is not None:
            key_data[row] = draw.key
            numbers[row], temperature[row] = draw.number, draw.temperature
            top_k[row], top_p[row] = min(draw.top_k, 2**31 - 1), draw.top_p
    return key_data, numbers, temperature, top_k, top_p


@functools.partial(jax.jit, static_argnames=("width",))
def draw_tokens(logits, key_data, numbers, temperature, top_k, top_p, *, width: int):
    """`sample_rows` of `logits [R, V]` (R <= width), padded with zeros to `[width]`
    int32: the tokens of a step, as the next step reads them."""
    tokens = sample_rows(logits, key_data, numbers, temperature, top_k, top_p)
    return jnp.pad(tokens, (0, width - tokens.shape[0]))


@jax.jit
def token_logprobs(logits, rows, tokens):
    """The log-probabilities of drawn tokens under the model's own distribution.

    logits `[R, V]`: a step's logits; rows `[n]` int32: the rows wanted; tokens `[>= R]`
    int32: the token drawn from each row. Returns the log-softmax, in float32, at each
    wanted row's drawn token `[n]`, and the `MAX_TOP_LOGPROBS` largest of that row (or
    all V if fewer): their token ids `[n, k]` int32 and log-probabilities `[n, k]`,
    largest first."""
    logprobs = jax.nn.log_softmax(logits[rows].astype(jnp.float32), axis=-1)
    drawn = jnp.take_along_axis(logprobs, tokens[rows][:, None], axis=1)[:, 0]
    top, ids = jax.lax.top_k(logprobs, min(MAX_TOP_LOGPROBS, logprobs.shape[-1]))
    return drawn, ids, top
