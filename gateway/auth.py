"""API keys: who may call, which models they may use, and their limits.

Keys come from a YAML file (reloaded when it changes) and, in a cluster, from Secrets labelled
`modelfleet.dev/api-key=true`. Only SHA-256 digests are kept in memory, and a presented key is
compared against every digest with `hmac.compare_digest`, so neither the key nor a timing
difference leaks. With no keys configured at all, the gateway is open.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from modelfleet.protocol import OpenAIError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str  # hex digest of the key
    models: frozenset[str] | None = None  # None: every model
    rpm: int | None = None
    tpm: int | None = None

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyFileError(ValueError):
    pass


def _limit(value: Any, field: str, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise KeyFileError(f"key {name!r}: {field} must be a whole number, got {value!r}") from None
    if number < 1:
        raise KeyFileError(f"key {name!r}: {field} must be at least 1")
    return number


def parse_entry(entry: Mapping[str, Any], where: str) -> ApiKey:
    """One key from the file's `keys:` list or from a Secret's data (docs/keys.md)."""
    name = str(entry.get("name") or "").strip()
    if not name:
        raise KeyFileError(f"{where}: every key needs a name")
    key, hashed = entry.get("key"), entry.get("key_sha256")
    if (key is None) == (hashed is None):
        raise KeyFileError(f"key {name!r}: give exactly one of key or key_sha256")
    if hashed is not None and not isinstance(hashed, str):
        # YAML reads an all-digit digest as a number (and "12e45" as a float).
        raise KeyFileError(f"key {name!r}: key_sha256 must be a string; put it in quotes")
    if key is not None and not str(key):
        raise KeyFileError(f"key {name!r}: key must not be empty")
    sha = digest(str(key)) if key else str(hashed).strip().lower()
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise KeyFileError(f"key {name!r}: key_sha256 must be 64 hex characters")
    models = entry.get("models")
    if isinstance(models, str):
        models = [m.strip() for m in models.split(",") if m.strip()]
    if models is not None and not isinstance(models, list):
        raise KeyFileError(f"key {name!r}: models must be a list of model names")
    return ApiKey(name=name, sha256=sha, models=frozenset(map(str, models)) if models is not None else None,
                  rpm=_limit(entry.get("rpm"), "rpm", name), tpm=_limit(entry.get("tpm"), "tpm", name))


def parse_key_file(text: str, where: str = "keys file") -> list[ApiKey]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        # PyYAML's message quotes the broken line, which may hold a key: say only where.
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise KeyFileError(f"{where}: not valid YAML{at}: {getattr(exc, 'problem', None) or 'syntax error'}") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys", []), list):
        raise KeyFileError(f"{where}: expected a mapping with a `keys:` list")
    keys = [parse_entry(e if isinstance(e, dict) else {}, where) for e in data.get("keys") or []]
    names = [k.name for k in keys]
    if len(set(names)) != len(names):
        raise KeyFileError(f"{where}: key names must be unique")
    return keys


class KeyStore:
    """The union of every key source; each source replaces its own keys as a whole."""

    def __init__(self) -> None:
        self.sources: dict[str, list[ApiKey]] = {}

    def replace(self, source: str, keys: Iterable[ApiKey]) -> None:
        self.sources[source] = list(keys)

    @property
    def enabled(self) -> bool:
        return any(self.sources.values())

    def lookup(self, presented: str) -> ApiKey | None:
        wanted = digest(presented)
        found = None
        for keys in self.sources.values():
            for key in keys:
                if hmac.compare_digest(key.sha256, wanted) and found is None:
                    found = key  # keep looping: the time taken does not depend on the match
        return found

    def authenticate(self, headers: Mapping[str, str]) -> ApiKey | None:
        """The caller's key, None when the gateway is open; raises a 401 otherwise."""
        if not self.enabled:
            return None
        raw = headers.get("authorization", "")
        scheme, _, token = raw.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            token = headers.get("api-key", "")  # Azure-style clients
            if not token:
                raise OpenAIError("You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                                  status=401, code="missing_api_key")
        key = self.lookup(token.strip())
        if key is None:
            raise OpenAIError("Incorrect API key provided.", status=401, code="invalid_api_key")
        return key


class KeyFileWatcher:
    """Reloads the keys file when its modification time or size changes. A broken edit is
    logged and the previous keys stay in force, so a typo never opens or locks the gateway."""

    def __init__(self, path: Path, store: KeyStore) -> None:
        self.path = path
        self.store = store
        self.stamp: tuple[float, int] | None = None

    def load(self) -> None:
        """First load: errors are fatal (the command reports them)."""
        self.store.replace("file", parse_key_file(self.path.read_text(), str(self.path)))
        st = os.stat(self.path)
        self.stamp = (st.st_mtime, st.st_size)

    def poll(self) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        if (st.st_mtime, st.st_size) == self.stamp:
            return False
        self.stamp = (st.st_mtime, st.st_size)
        try:
            self.store.replace("file", parse_key_file(self.path.read_text(), str(self.path)))
        except (OSError, KeyFileError, yaml.YAMLError) as exc:
            log.error("keeping the previous keys: %s", exc)
            return False
        log.info("reloaded %s", self.path)
        return True


def keys_from_secrets(items: Iterable[Mapping[str, Any]]) -> list[ApiKey]:
    """Secrets labelled modelfleet.dev/api-key=true -> keys (docs/keys.md): data keys
    `key` or `key_sha256`, `models` comma-separated, `rpm`, `tpm`; the key's name is `name` or
    the Secret's name. A malformed Secret is logged and skipped, never fatal."""
    import base64

    keys = []
    for secret in items:
        meta = secret.get("metadata", {})
        where = f"Secret {meta.get('namespace')}/{meta.get('name')}"
        try:
            data = {k: base64.b64decode(v).decode().strip() for k, v in (secret.get("data") or {}).items()}
            data.update(secret.get("stringData") or {})
            data.setdefault("name", meta.get("name", ""))
            keys.append(parse_entry(data, where))
        except (KeyFileError, ValueError) as exc:
            log.error("ignoring %s: %s", where, exc)
    return keys
