"""Authenticated encryption of the client's private state at rest (AES-256-GCM).

The site owns one 32-byte key. It comes from, in this order:

1. node config `state-key-file` (a file the site controls),
2. environment variable FEDTOWER_STATE_KEY (base64 or hex of 32 bytes),
3. environment variable FEDTOWER_STATE_KEY_FILE (path of a key file).

A key file holds the same text (base64 or hex, one line) and must not be
readable by group or others. From the key, HKDF derives separate sub-keys for
encryption and for the manifest's MAC, and a short public key id that lets
the store tell "wrong key" apart from "tampered file".

Every ciphertext carries associated data that names what it is (store id,
component name, generation, log name, previous log line), so a file cannot be
swapped for another component, another generation or another store's file
without failing authentication.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

ENV_KEY = "FEDTOWER_STATE_KEY"
ENV_KEY_FILE = "FEDTOWER_STATE_KEY_FILE"
NODE_CONFIG_KEY_FILE = "state-key-file"
SCHEME = "aes-256-gcm"
KEY_BYTES = 32
NONCE_BYTES = 12
BLOB_MAGIC = b"FTSE1\0"  # marks an encrypted component file


class StateKeyError(ValueError):
    """A state key is missing, malformed, or stored insecurely."""


class AuthenticationFailed(Exception):
    """A ciphertext or MAC did not verify: wrong key, tampering, or a swapped file."""


def _derive(key: bytes, purpose: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=f"fedtower-state/{purpose}".encode()).derive(
        key
    )


def parse_key_text(text: str, source: str) -> bytes:
    """32 key bytes from base64 or hex text; `source` names where the text came from."""
    text = text.strip()
    candidates = []
    if len(text) == 2 * KEY_BYTES:
        with contextlib.suppress(ValueError):  # not hex: try base64
            candidates.append(bytes.fromhex(text))
    with contextlib.suppress(binascii.Error, ValueError):  # neither: reported below
        candidates.append(base64.b64decode(text, validate=True))
    for key in candidates:
        if len(key) == KEY_BYTES:
            return key
    raise StateKeyError(
        f"The state key in {source} is not {KEY_BYTES} bytes written as base64 or hex "
        "(create one with `fedtower state keygen KEYFILE`)."
    )


def read_key_file(path: str | Path) -> bytes:
    """A key from a file the site controls; refused if group or others may read it."""
    path = Path(path).expanduser()
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as err:
        raise StateKeyError(f"The state key file {path} cannot be read: {err.strerror or err}.") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise StateKeyError(
            f"The state key file {path} is accessible to group or others (mode {stat.S_IMODE(mode):o}); "
            f"run `chmod 600 {path}`."
        )
    return parse_key_text(text, f"key file {path}")


def resolve_state_key(
    node_config: Mapping[str, object] | None = None, environ: Mapping[str, str] | None = None
) -> StateKey | None:
    """The site's key from node config or the environment, or None when none is configured."""
    environ = os.environ if environ is None else environ
    if node_config and node_config.get(NODE_CONFIG_KEY_FILE):
        path = str(node_config[NODE_CONFIG_KEY_FILE])
        return StateKey(read_key_file(path), f"node config {NODE_CONFIG_KEY_FILE}={path}")
    if environ.get(ENV_KEY):
        return StateKey(parse_key_text(environ[ENV_KEY], f"${ENV_KEY}"), f"${ENV_KEY}")
    if environ.get(ENV_KEY_FILE):
        path = environ[ENV_KEY_FILE]
        return StateKey(read_key_file(path), f"${ENV_KEY_FILE}={path}")
    return None


def new_key_text() -> str:
    return base64.b64encode(os.urandom(KEY_BYTES)).decode()


def write_new_key_file(path: str | Path) -> StateKey:
    """Create a fresh key file with mode 600; never overwrites an existing file."""
    path = Path(path).expanduser()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise StateKeyError(f"{path} already exists; a key file is never overwritten.") from None
    except OSError as err:
        raise StateKeyError(f"Cannot create the key file {path}: {err.strerror or err}.") from None
    text = new_key_text()
    with os.fdopen(fd, "w") as handle:
        handle.write(text + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return StateKey(parse_key_text(text, str(path)), f"key file {path}")


@dataclass(frozen=True, repr=False)
class StateKey:
    """A site's state key; `source` says where it came from (for error messages), never the key."""

    key: bytes
    source: str = "the given key"

    def __post_init__(self) -> None:
        if len(self.key) != KEY_BYTES:
            raise StateKeyError(f"A state key must be {KEY_BYTES} bytes, {self.source} has {len(self.key)}.")

    def __repr__(self) -> str:  # never print key material
        return f"StateKey(id={self.key_id}, source={self.source!r})"

    @property
    def key_id(self) -> str:
        """Public fingerprint: recorded in the manifest to recognise a wrong key."""
        return _derive(self.key, "key-id")[:8].hex()

    def cipher(self) -> StateCipher:
        return StateCipher(self)


def _aad(fields: Mapping[str, object]) -> bytes:
    return json.dumps(dict(fields), sort_keys=True, separators=(",", ":")).encode()


class StateCipher:
    """AES-GCM for component files and log lines, HMAC-SHA256 for the manifest."""

    def __init__(self, key: StateKey):
        self.key_id = key.key_id
        self._aead = AESGCM(_derive(key.key, "aes-gcm"))
        self._mac_key = _derive(key.key, "manifest-mac")

    def seal(self, data: bytes, aad: Mapping[str, object]) -> bytes:
        nonce = os.urandom(NONCE_BYTES)  # random 96-bit nonces: far below 2**32 messages per key
        return BLOB_MAGIC + nonce + self._aead.encrypt(nonce, data, _aad(aad))

    def open(self, blob: bytes, aad: Mapping[str, object]) -> bytes:
        if not blob.startswith(BLOB_MAGIC) or len(blob) < len(BLOB_MAGIC) + NONCE_BYTES + 16:
            raise AuthenticationFailed("not an encrypted fedtower state blob")
        nonce = blob[len(BLOB_MAGIC) : len(BLOB_MAGIC) + NONCE_BYTES]
        try:
            return self._aead.decrypt(nonce, blob[len(BLOB_MAGIC) + NONCE_BYTES :], _aad(aad))
        except InvalidTag:
            raise AuthenticationFailed("authentication tag mismatch") from None

    def seal_line(self, line: bytes, aad: Mapping[str, object]) -> bytes:
        """One log line as base64 text (no newline inside)."""
        return base64.b64encode(self.seal(line, aad))

    def open_line(self, text: bytes, aad: Mapping[str, object]) -> bytes:
        try:
            blob = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise AuthenticationFailed("not base64") from None
        return self.open(blob, aad)

    def mac(self, body: bytes) -> str:
        return hmac.new(self._mac_key, body, hashlib.sha256).hexdigest()

    def verify_mac(self, body: bytes, tag: object) -> bool:
        return isinstance(tag, str) and hmac.compare_digest(self.mac(body), tag)
