"""The token ids a turn's input stands for, with a model's tokenizer: what `LLM` and the
engine append to a conversation."""

from __future__ import annotations

from jinja2.exceptions import TemplateError

from jattn.engine.errors import InvalidRequest
from jattn.engine.requests import check_token_ids, require_tokenizer
from jattn.tokenizer import Tokenizer


class InputEncoder:
    """Encodes turns' inputs for a model of `vocab_size` tokens whose tokenizer is
    `tokenizer` (None: the model takes token ids only)."""

    def __init__(self, tokenizer: Tokenizer | None, vocab_size: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size

    def encode(self, value, kind: str = "message", *, first_turn: bool) -> list[int]:
        """The token ids `value` appends to a conversation (`first_turn`: to an empty
        one): token ids as they are (`value` not a string, `kind` not "messages"), raw
        text (`kind` "text": the tokenizer's beginning-of-sequence token on a first
        turn only), a user message (`kind` "message") or `(role, content)` pairs
        (`kind` "messages") through the chat template: the whole template on a first
        turn, the messages' part of it (no beginning-of-sequence token) later.

        InvalidRequest for a token id outside the vocabulary, text for a model without
        a tokenizer, or messages the chat template refuses."""
        if not isinstance(value, str) and kind != "messages":
            ids = list(value)
            check_token_ids(ids, self.vocab_size)
            return ids
        tokenizer = require_tokenizer(self.tokenizer)
        if kind == "text":
            return tokenizer.encode(value, add_special_tokens=first_turn)
        chat = ([{"role": "user", "content": value}] if kind == "message"
                else [{"role": role, "content": content} for role, content in value])
        try:
            return self._encode_chat(tokenizer, chat, first_turn)
        except TemplateError as error:
            if type(error) is not TemplateError:  # a broken template: not the request's fault
                raise
            # The template's `raise_exception`: its own check of the messages.
            raise InvalidRequest(f"the chat template refused the messages: {error}") from None

    @staticmethod
    def _encode_chat(tokenizer: Tokenizer, chat: list[dict], first_turn: bool) -> list[int]:
        if first_turn:
            return tokenizer.encode_chat(chat)
        if tokenizer.chat_template:
            ids = tokenizer.encode_chat(chat)
            bos = tokenizer.token_id(tokenizer.bos_token)
            return ids[1:] if ids and ids[0] == bos else ids
        return tokenizer.encode("\n" + tokenizer.render_chat(chat), add_special_tokens=False)
