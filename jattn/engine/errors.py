"""The errors a client of the engine may see, besides ValueError for bad input."""


class QueueFull(Exception):
    """The engine's queue is at its limit; try again later."""


class TooManySessions(Exception):
    """A new session would pass the engine's session limit."""


class SessionNotFound(KeyError):
    """No session has this id."""


class EngineStopped(Exception):
    """The engine no longer accepts work (it is shutting down)."""


class PromptTooLong(ValueError):
    """The input does not fit: longer than a turn's limit, or than the context window
    (after truncating the history) with room for one new token."""

