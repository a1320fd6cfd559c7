"""The errors a client of the engine may see. `InvalidRequest` (a `ValueError`) is bad
input and nothing else: any other exception out of the engine is an internal error.
`SessionLost` and `RecordUnavailable` come from the session records of a store shared by
replicas (`jattn.store.records`)."""

from jattn.store.records import RecordUnavailable, SessionLost  # noqa: F401


class InvalidRequest(ValueError):
    """The request can never run as given; the message names what is wrong. Raising it
    changes nothing."""


class PromptTooLong(InvalidRequest):
    """The input does not fit: longer than a turn's limit, or than the context window
    (after truncating the history) with room for one new token."""


class QueueFull(Exception):
    """The engine's queue is at its limit; try again later."""


class TooManySessions(Exception):
    """A new session would pass the engine's session limit."""


class SessionNotFound(KeyError):
    """No session has this id."""


class EngineStopped(Exception):
    """The engine no longer accepts work (it is shutting down)."""
