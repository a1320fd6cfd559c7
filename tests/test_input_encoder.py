"""`InputEncoder`: a turn's input as the token ids it appends, and the bad input it
refuses by name (`InvalidRequest`) apart from a broken model (any other error)."""

import pytest
from jinja2.exceptions import TemplateSyntaxError

from jattn.engine import InvalidRequest
from jattn.engine.encoding import InputEncoder
from jattn.llm import EMBEDDED_MODEL
from jattn.tokenizer import Tokenizer

VOCAB = 512


def encoder(chat_template: str | None = None) -> InputEncoder:
    tokenizer = Tokenizer.from_dir(EMBEDDED_MODEL)
    tokenizer.chat_template = chat_template
    return InputEncoder(tokenizer, VOCAB)


def test_first_and_later_turns():
    plain = encoder()
    tokenizer = plain.tokenizer
    assert plain.encode((5, 6), "tokens", first_turn=True) == [5, 6]
    assert plain.encode("Once", "text", first_turn=True) == tokenizer.encode("Once")
    assert plain.encode("Once", "text", first_turn=False) == \
        tokenizer.encode("Once", add_special_tokens=False)
    chat = [{"role": "user", "content": "Hi"}]
    assert plain.encode("Hi", "message", first_turn=True) == tokenizer.encode_chat(chat)
    assert plain.encode((("user", "Hi"),), "messages", first_turn=False) == \
        tokenizer.encode("\nHi", add_special_tokens=False)


@pytest.mark.parametrize("make, value, kind, pattern", [
    (lambda: InputEncoder(None, VOCAB), "Once", "text", "this model has no tokenizer"),
    (lambda: InputEncoder(None, VOCAB), "Once", "message", "this model has no tokenizer"),
    (encoder, [1, VOCAB, -2], "tokens", r"token ids must be integers in \[0, 512\), got "
                                        r"\[512, -2\]"),
    (lambda: encoder("{{ raise_exception('roles must alternate') }}"), "Hi", "message",
     "the chat template refused the messages: roles must alternate"),
])
def test_bad_input_is_an_invalid_request(make, value, kind, pattern):
    with pytest.raises(InvalidRequest, match=pattern):
        make().encode(value, kind, first_turn=True)


def test_a_broken_chat_template_is_not_the_requests_fault():
    with pytest.raises(TemplateSyntaxError):
        encoder("{% if %}").encode("Hi", "message", first_turn=True)
