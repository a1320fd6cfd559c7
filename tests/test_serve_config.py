"""jattn-serve configuration: the shipped YAML lists every key at its default; flags
override the file; bad values are refused by name."""

import argparse
import dataclasses
import os

import pytest
import yaml

from jattn import StoreConfig
from serve.config import ServeConfig, add_arguments, from_arguments, parse_bytes

DEFAULT_YAML = os.path.join(os.path.dirname(__file__), "..", "configs", "serve", "default.yaml")


def test_default_yaml_is_every_key_at_its_default():
    with open(DEFAULT_YAML) as f:
        values = yaml.safe_load(f)
    assert set(values) == {f.name for f in dataclasses.fields(ServeConfig)}
    assert ServeConfig.from_yaml(DEFAULT_YAML) == ServeConfig()


def parse(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_arguments(parser.parse_args(argv))


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("port: 6000\nmax_queue: 7\nhost_bytes: 2GiB\nstore: true\n")
    config = parse(["--config", str(path), "--port", "7000", "--no-store",
                    "--auth-token", "aaaaaaaa", "--auth-token", "bbbbbbbb",
                    "--disk-bytes", "1.5GB", "--disk-path", str(tmp_path)])
    assert config.port == 7000 and config.max_queue == 7 and config.store is False
    assert config.host_bytes == 2 * 2**30 and config.disk_bytes == 1_500_000_000
    assert config.auth_tokens == ["aaaaaaaa", "bbbbbbbb"]


@pytest.mark.parametrize("values, pattern", [
    ({"prot": 1}, "unknown keys in configuration: prot"),
    ({"host_bytes": "lots"}, "not a byte size: 'lots'"),
    ({"tls_cert": "c.pem"}, "tls_cert and tls_key go together"),
    ({"disk_bytes": "1GiB"}, "disk_bytes > 0 needs a disk_path"),
    ({"auth_tokens": ["short"]}, "at least 8 characters"),
    ({"default_max_tokens": 0}, "default_max_tokens must be in"),
    ({"auth_tokens": ["aaaaaaaa"], "metrics_port": 9100}, "metrics_open"),
])
def test_bad_configuration_is_refused_by_name(values, pattern):
    with pytest.raises(ValueError, match=pattern):
        ServeConfig.from_dict(values)


def test_unauthenticated_metrics_beside_tokens_must_be_asked_for():
    config = ServeConfig.from_dict({"auth_tokens": ["aaaaaaaa"], "metrics_port": 9100,
                                    "metrics_open": True})
    assert config.metrics_open and config.metrics_port == 9100
    assert ServeConfig.from_dict({"metrics_port": 9100}).metrics_port == 9100  # no tokens


def test_parse_bytes():
    assert parse_bytes(4096) == 4096
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes(" 2 kb ") == 2000


def test_a_store_key_file_is_read_at_start_and_must_hold_a_key(tmp_path):
    short, missing, good = tmp_path / "short.key", tmp_path / "missing.key", tmp_path / "k"
    short.write_text("too short\n")
    good.write_text(" " + "ab" * 16 + "\n")
    with pytest.raises(ValueError, match="short.key.*9 bytes"):
        ServeConfig(store_key_file=str(short))
    with pytest.raises(ValueError, match="cannot read the store key file.*missing.key"):
        ServeConfig(store_key_file=str(missing))
    assert ServeConfig(store_key_file=str(good)).store_key_file == str(good)
    same, other = tmp_path / "same", tmp_path / "other"
    same.write_text("ab" * 16)  # whitespace around the key does not change it
    other.write_text("ab" * 15 + "ac")
    keys = [StoreConfig(key_file=str(path)).store_key() for path in (good, same, other)]
    assert keys[0] == keys[1] != keys[2] and len(keys[0]) == 32
