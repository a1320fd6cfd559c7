"""Text to token ids and back, and chat templates, from a Hugging Face model directory.

`tokenizer.json` is read with the `tokenizers` library; `tokenizer_config.json` gives the
special tokens and, when the model has one, the jinja2 chat template.
"""

from __future__ import annotations

import json
import os

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Encodes, decodes and renders chats for one model."""

    def __init__(self, tokenizer: HFTokenizer, config: dict):
        self._tokenizer = tokenizer
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.chat_template: str | None = config.get("chat_template")

    @classmethod
    def from_dir(cls, path: str) -> "Tokenizer | None":
        """The tokenizer of a model directory, or None when it has no `tokenizer.json`."""
        tokenizer_path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_path):
            return None
        config_path = os.path.join(path, "tokenizer_config.json")
        config = {}
        if os.path.isfile(config_path):
            with open(config_path) as f:
                config = json.load(f)
        return cls(HFTokenizer.from_file(tokenizer_path), config)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, as the model expects a prompt
        (e.g. with BOS)."""
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tokenizer.token_to_id(token)

    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation: `messages` are `{"role", "content"}` dicts.

        With a chat template it is rendered (sandboxed jinja2, as transformers does);
        without one the contents are joined by newlines, as plain text.
        """
        if not self.chat_template:
            return "\n".join(m["content"] for m in messages)

        def raise_exception(message):
            raise TemplateError(message)

        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = raise_exception
        template = environment.from_string(self.chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def encode_chat(self, messages: list[dict], *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a rendered conversation. A template writes its own special
        tokens; plain text gets the tokenizer's (BOS)."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=not self.chat_template)
