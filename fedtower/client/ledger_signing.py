"""The node's ledger signing key (Ed25519), and the chain each signed entry extends.

Where the key comes from:

1. node config `ledger-key`: a PEM file the site keeps beside its SuperNode key
   (`fedtower keys node` writes `<site>.ledger.key` and `<site>.ledger.pub`),
   mode 0600; its `.pub` is what the site registers with the coordinator and
   gives its auditors. Rotating it: write a new pair, register the new `.pub`
   under the same site name, point `ledger-key` at it. The chain carries on.
2. otherwise a key the node creates at its first DP release and keeps in its
   state dir (encrypted with the state when the state is); `fedtower site
   ledger --public-key` prints its public half.

Every entry carries its node-level `sequence`, the digest of the node's
previous signed record (`previous`) and of its previous record in the same run
(`previous_in_run`), so a deleted, reordered, replayed or rolled-back entry
breaks a chain an auditor can check.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtower.client.node_settings import NodeSettings
from fedtower.client.state import ClientStateStore, StateError
from fedtower.privacy.ledger import (
    LedgerEntry,
    entry_of,
    generate_signing_key,
    load_signing_key,
    public_key_text,
    record_digest,
    sign_entry,
)

KEY_COMPONENT = "ledger_key"  # {"pem": "..."}: the key the node made itself (no node config ledger-key)


class LedgerSigner:
    def __init__(self, key: Ed25519PrivateKey, source: str, new_component: dict | None = None):
        self.key, self.source = key, source
        self.new_component = new_component  # to save with the first release, when the key was just made
        self.public_key = public_key_text(key.public_key())

    @classmethod
    def for_node(cls, node: NodeSettings, store: ClientStateStore) -> LedgerSigner:
        if node.ledger_key is not None:
            try:
                return cls(load_signing_key(node.ledger_key), f"node config ledger-key={node.ledger_key}")
            except (OSError, ValueError) as err:
                raise StateError(f"The node's ledger signing key {node.ledger_key} cannot be used: {err}") from None
        saved = store.load(KEY_COMPONENT, default=None)
        if saved is not None:
            try:
                key = serialization.load_pem_private_key(saved["pem"].encode(), password=None)
            except (KeyError, TypeError, ValueError) as err:
                raise StateError(f"The ledger signing key in {store.state_dir} is unreadable ({err}).") from None
            if not isinstance(key, Ed25519PrivateKey):
                raise StateError(f"The ledger signing key in {store.state_dir} is not an Ed25519 key.")
            return cls(key, f"state dir {store.state_dir}")
        key = generate_signing_key()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()  # fmt: skip
        return cls(key, f"state dir {store.state_dir} (new)", {KEY_COMPONENT: {"pem": pem}})

    def sign(self, entry: LedgerEntry, previous_records: list[dict]) -> dict:
        """`entry`, chained to the node's previous records and signed: the line the ledgers keep."""
        in_run = [r for r in previous_records if entry_of(r).run == entry.run]
        chained = replace(
            entry,
            sequence=len(previous_records) + 1,
            previous=record_digest(previous_records[-1]) if previous_records else "",
            previous_in_run=record_digest(in_run[-1]) if in_run else "",
            signer=self.public_key,
        )
        return sign_entry(chained, self.key)


def public_key_of_state(store: ClientStateStore, node: NodeSettings | None = None) -> str:
    """The public key this node signs with (base64 raw), without making one."""
    if node is not None and node.ledger_key is not None:
        return public_key_text(load_signing_key(Path(node.ledger_key)).public_key())
    saved = store.load(KEY_COMPONENT, default=None)
    if saved is None:
        raise StateError(f"The state in {store.state_dir} has no ledger signing key yet (no DP release so far).")
    key = serialization.load_pem_private_key(saved["pem"].encode(), password=None)
    return public_key_text(key.public_key())
