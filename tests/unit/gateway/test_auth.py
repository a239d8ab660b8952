import pytest

from modelfleet.gateway.auth import KeyFileError, KeyStore, digest, parse_key_file
from modelfleet.protocol import OpenAIError

FILE = """
keys:
  - name: alice
    key: sk-alice-0123456789
    models: [tiny-chat]
    rpm: 60
    tpm: 100000
  - name: bob
    key_sha256: {bob}
"""


def store() -> KeyStore:
    s = KeyStore()
    s.replace("file", parse_key_file(FILE.format(bob=digest("sk-bob"))))
    return s


def test_open_without_keys():
    assert KeyStore().authenticate({}) is None


def test_keys_by_value_and_by_hash():
    s = store()
    assert s.authenticate({"authorization": "Bearer sk-alice-0123456789"}).name == "alice"
    bob = s.authenticate({"authorization": "Bearer sk-bob"})
    assert bob.name == "bob" and bob.allows("anything")


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer nope"}, {"authorization": "Basic abc"}])
def test_missing_or_wrong_key_is_401(headers):
    with pytest.raises(OpenAIError) as info:
        store().authenticate(headers)
    assert info.value.status == 401


def test_allowlist():
    alice = store().authenticate({"authorization": "Bearer sk-alice-0123456789"})
    assert alice.allows("tiny-chat") and not alice.allows("all-MiniLM-L6-v2")


def test_keys_are_only_kept_hashed():
    assert "sk-alice" not in repr(store().sources)


@pytest.mark.parametrize("bad", [
    "keys: [{key: x}]",
    "keys: [{name: a}]",
    "keys: [{name: a, key: x, key_sha256: " + "0" * 64 + "}]",
    "keys: [{name: a, key_sha256: xyz}]",
    "keys: [{name: a, key: x, rpm: 0}]",
    "keys: [{name: a, key: x}, {name: a, key: y}]",
    "just a string",
])
def test_bad_files_say_what_is_wrong(bad):
    with pytest.raises(KeyFileError):
        parse_key_file(bad)
