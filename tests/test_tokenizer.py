"""Tokenizer round trips and chat templates."""

import json
import os
import shutil

from jattn.tokenizer import Tokenizer
from model_references import model_dir

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_round_trip_and_bos():
    tokenizer = Tokenizer.from_dir(model_dir("stories260K"))
    ids = tokenizer.encode("Tom and Sue went to the park.")
    assert ids[0] == 1
    assert tokenizer.decode(ids) == "Tom and Sue went to the park."


def test_plain_text_chat_without_template():
    tokenizer = Tokenizer.from_dir(model_dir("stories260K"))
    messages = [{"role": "user", "content": "Once upon a time"},
                {"role": "assistant", "content": "there was a cat."}]
    assert tokenizer.render_chat(messages) == "Once upon a time\nthere was a cat."
    assert tokenizer.encode_chat(messages) == tokenizer.encode(
        "Once upon a time\nthere was a cat.")


def test_chat_template_from_tokenizer_config(tmp_path):
    target = tmp_path / "model"
    shutil.copytree(model_dir("stories260K"), target)
    config = json.loads((target / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATE
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer.from_dir(str(target))
    messages = [{"role": "user", "content": "Hi"}]
    rendered = tokenizer.render_chat(messages)
    assert rendered == "<s><|user|>Hi</s><|assistant|>"
    assert tokenizer.render_chat(messages, add_generation_prompt=False) == "<s><|user|>Hi</s>"
    ids = tokenizer.encode_chat(messages)
    assert ids[0] == 1 and ids[1] != 1  # the template's BOS, not a second one


def test_model_without_tokenizer():
    assert Tokenizer.from_dir(model_dir("tiny-qwen2-random")) is None
    assert not os.path.exists(os.path.join(model_dir("tiny-qwen2-random"), "tokenizer.json"))
