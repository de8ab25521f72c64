"""Secure aggregation (SecAgg, Bonawitz et al., CCS 2017, complete graph), transport-agnostic.

The coordinator learns the sum, modulo 2^32, of the integer vectors of at
least t sites, and nothing else about any site's vector. This module is the
pure protocol: every stage takes and returns bytes, ints, dicts and lists of
them, or one uint32 vector, which a driver carries in Flower messages
(`fedtower.client.secure_round`, `fedtower.strategies.secure_dp`); each site's
secrets between stages serialise to a dict of bytes (`SecAggSite.state_dict`)
so that every stage can run in a fresh process.

The protocol (n participants, Shamir index of a site = its 1-based position
among the sorted participant ids, threshold t, vectors of L words in Z_2^32)
--------------------------------------------------------------------------
1. setup. Each site i makes two EC key pairs (Flower's `generate_key_pairs`,
   SECP384R1): (c_i, C_i) to encrypt shares, (s_i, S_i) to agree masks, and
   sends C_i, S_i. The coordinator keeps the set U1 of sites that answered.
2. share-keys. The coordinator sends every site in U1 all of U1's public
   keys. Site i checks them (only participants, its own keys unchanged, no
   key repeated, at least t sites), draws its self-mask seed b_i (32 bytes,
   os.urandom), Shamir-shares b_i and its mask private key s_i (threshold t,
   n shares, Flower's `create_shares`), and for every other j in U1 encrypts
   (i, j, share_j(b_i), share_j(s_i)) with Fernet under the ECDH+HKDF key of
   c_i and C_j (Flower's `generate_shared_key`, `encrypt`). The ids inside
   the ciphertext bind it to sender and receiver: the coordinator, which
   routes the ciphertexts, can neither read nor redirect them. U2 = the
   sites whose ciphertexts arrived.
3. masked-input. Site i receives the ciphertexts addressed to it by the
   others in U2, decrypts and checks them (it needs at least t - 1), and
   sends

       y_i = x_i + PRG(b_i) + Sum_{j in U2, j > i} PRG(k_ij) - Sum_{j in U2, j < i} PRG(k_ij)  (mod 2^32)

   where k_ij = HKDF-SHA256(ECDH(s_i, S_j), info = "fedtower/secagg/v1/mask-agreement")
   = k_ji (another label than the encryption keys' derivation). U3 = the sites
   whose masked input arrived: the sum will be exactly theirs. If |U3| < t,
   the coordinator aborts here, before it asks anyone to unmask.
4. unmask. The coordinator tells each site in U3 the split (survivors U3,
   dropped U2 \\ U3). A site answers with its shares of b_j for every
   survivor j and of s_j for every dropped j, never both kinds for one site,
   and only for one split per round (a second request with another split is
   refused). With t shares of each, the coordinator reconstructs (Flower's
   `combine_shares`) every survivor's b_j and removes PRG(b_j), and every
   dropped site's s_j (checked against the S_j published at setup) and
   removes the pairwise masks between it and the survivors. The pairwise
   masks among survivors cancel in the sum. It needs t sites to answer.

Threat model and guarantee
--------------------------
* The coordinator is honest but curious: it runs the protocol as written
  (it forwards the public keys it received and routes ciphertexts
  faithfully) but may try to learn more from everything it sees. The sites
  do not collude with it (nor with each other). Out of scope: a coordinator
  that substitutes public keys (there is no PKI or signature binding a
  site's key to its node; a site checks only its own), sites that send
  malformed shares or inputs (they can spoil the sum, not reveal an input),
  and proofs that inputs are bounded.
* The coordinator learns only the sum of the inputs of U3, and |U3| >= t:
  each y_i alone is uniform on Z_2^32^L (masked by PRG(b_i), whose seed needs
  t shares), the ciphertexts are authenticated encryption to other sites,
  and for each site it gets the shares of b_i or of s_i, never both. Because
  t is a majority (t > n / 2), two disjoint groups of sites cannot each hand
  over t shares of a different secret of the same site, so even a
  coordinator that sent different splits to different sites could not
  recover both secrets of one site.
* Up to n - t dropouts in total are tolerated, at any stage (after setup,
  after share-keys, after masked-input, or during unmask); with more, the
  round aborts (`SecAggAbort`) and nothing is unmasked.

Why the mask PRG is replaced
----------------------------
Flower's SecAgg+ expands seeds with `secaggplus_utils.pseudo_rand_gen`, which
XOR-folds the 32-byte seed into a 32-bit seed for numpy's MT19937: a masked
vector can be unmasked by trying 2^32 seeds, and seeds whose 4-byte words
XOR to the same value give the same mask. Here masks are AES-256-CTR
keystreams keyed by HKDF-SHA256 of the whole seed with a domain-separation
label (`fedtower.secure_aggregation.masks.expand_mask`), so the masks are as
strong as the 256-bit seeds. Everything else (ECDH+HKDF key agreement,
Fernet, Shamir sharing, key serialisation) is Flower's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.fernet import InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from fedtower.secure_aggregation.masks import PAIRWISE_MASK_LABEL, SEED_BYTES, SELF_MASK_LABEL, expand_mask

__all__ = [
    "DROP_POINTS",
    "MASK_AGREEMENT_LABEL",
    "InMemoryResult",
    "SecAggAbort",
    "SecAggConfig",
    "SecAggError",
    "SecAggRefusal",
    "SecAggServer",
    "SecAggSite",
    "decode_signed",
    "encode_signed",
    "payload_nbytes",
    "run_in_memory",
]

MASK_AGREEMENT_LABEL = b"fedtower/secagg/v1/mask-agreement"
MAX_NODE_ID = 2**64 - 1  # Flower node ids are uint64
CURVE = ec.SECP384R1  # the curve of Flower's generate_key_pairs
SCALAR_BYTES = 48  # a SECP384R1 private scalar
STATE_FORMAT = b"fedtower-secagg-site/1"
INT32_MIN, INT32_END = -(2**31), 2**31

# The keys of an unmask reply (lists, ready for a Flower ConfigRecord).
SEED_OWNERS, SEED_SHARES = "seed-owners", "seed-shares"
KEY_OWNERS, KEY_SHARES = "key-owners", "key-shares"


class SecAggError(Exception):
    """Base class of the protocol's errors."""


class SecAggAbort(SecAggError):
    """The coordinator cannot complete this round (too few sites, or a reply that breaks the protocol).

    Raised before anything is unmasked whenever fewer than t sites remain.
    """


class SecAggRefusal(SecAggError):
    """A site refuses a request that would break the protocol's guarantee (or is out of order)."""


# ---------------------------------------------------------------- Z_2^32 encoding


def encode_signed(values) -> np.ndarray:
    """Signed integers in [-2^31, 2^31) to uint32 (two's complement, i.e. modulo 2^32)."""
    array = np.asarray(values)
    if array.dtype.kind not in "iub":
        raise ValueError(f"Only integer vectors can be encoded for secure aggregation, got dtype {array.dtype}.")
    if array.size and (int(array.min()) < INT32_MIN or int(array.max()) >= INT32_END):
        raise ValueError(
            f"Secure aggregation encodes values in [-2^31, 2^31); this vector spans [{int(array.min())}, "
            f"{int(array.max())}]."
        )
    return array.astype(np.int64).astype(np.uint32)


def decode_signed(total) -> np.ndarray:
    """A uint32 sum back to signed int64, reading it as two's complement (values in [-2^31, 2^31))."""
    array = np.asarray(total)
    if array.dtype != np.uint32:
        raise ValueError(f"A secure-aggregation sum is a uint32 vector, got dtype {array.dtype}.")
    return array.view(np.int32).astype(np.int64)


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class SecAggConfig:
    """One round's public parameters: participants (Flower node ids), threshold t, vector length L.

    The participants are kept sorted; a site's Shamir index is its 1-based position among them.
    """

    participants: tuple[int, ...]
    threshold: int
    vector_length: int

    def __post_init__(self) -> None:
        ids = []
        for node in self.participants:
            if isinstance(node, bool) or not isinstance(node, int | np.integer):
                raise ValueError(f"Participants must be integer Flower node ids, got {node!r}.")
            if not 0 <= int(node) <= MAX_NODE_ID:
                raise ValueError(f"Participant id {int(node)} is not a Flower node id (an unsigned 64-bit integer).")
            ids.append(int(node))
        if len(set(ids)) != len(ids):
            raise ValueError(f"The participants of a secure-aggregation round must be distinct, got {ids}.")
        object.__setattr__(self, "participants", tuple(sorted(ids)))
        n = len(ids)
        if n < 2:
            raise ValueError(f"Secure aggregation needs at least 2 participants, got {n}.")
        threshold = self.threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int | np.integer):
            raise ValueError(f"The secure-aggregation threshold must be an integer, got {threshold!r}.")
        majority = n // 2 + 1
        if not majority <= int(threshold) <= n:
            raise ValueError(
                f"The secure-aggregation threshold must be a majority of the {n} participants, between "
                f"{majority} and {n}, got {int(threshold)}: with t <= n/2, two disjoint groups of sites could each "
                "hand over the shares of a different secret of the same site (its self-mask seed and its mask "
                "key), which together unmask its input."
            )
        object.__setattr__(self, "threshold", int(threshold))
        length = self.vector_length
        if isinstance(length, bool) or not isinstance(length, int | np.integer) or int(length) < 1:
            raise ValueError(f"The secure-aggregation vector length must be a positive integer, got {length!r}.")
        object.__setattr__(self, "vector_length", int(length))

    @classmethod
    def with_majority(cls, participants: Iterable[int], vector_length: int) -> SecAggConfig:
        """The smallest allowed threshold, floor(n / 2) + 1 (tolerates the most dropouts)."""
        ids = tuple(participants)
        return cls(participants=ids, threshold=len(ids) // 2 + 1, vector_length=vector_length)

    @property
    def num_participants(self) -> int:
        return len(self.participants)

    @property
    def max_dropouts(self) -> int:
        """How many sites may drop out (at any stage, in total) before the round aborts: n - t."""
        return len(self.participants) - self.threshold

    def share_index(self, node_id: int) -> int:
        """The Shamir index (1..n) of a participant: its position among the sorted participant ids."""
        try:
            return self.participants.index(int(node_id)) + 1
        except ValueError:
            raise ValueError(f"Node {node_id} is not a participant of this secure-aggregation round.") from None

    def to_bytes(self) -> bytes:
        return json.dumps({"participants": list(self.participants), "threshold": self.threshold,
                           "vector_length": self.vector_length}, sort_keys=True).encode()  # fmt: skip

    @classmethod
    def from_bytes(cls, data: bytes) -> SecAggConfig:
        raw = json.loads(bytes(data).decode())
        return cls(participants=tuple(raw["participants"]), threshold=raw["threshold"],
                   vector_length=raw["vector_length"])  # fmt: skip


# ---------------------------------------------------------------- the site


class SecAggSite:
    """One site's side of a round: call `setup`, `share_keys`, `masked_input`, `unmask` in order.

    Between calls the site's secrets can be kept with `state_dict()` (a dict of bytes, private to the
    site: it holds its private keys until the masked input is sent, then only the shares it holds) and
    restored with `SecAggSite.from_state_dict(state)`.
    """

    STAGES = ("new", "setup", "shared", "masked", "unmasked")
    STATE_FIELDS = (
        "format", "config", "node-id", "stage", "encryption-private-key", "mask-private-key",
        "encryption-public-key", "mask-public-key", "public-keys-encryption", "public-keys-mask",
        "self-mask-seed", "seed-shares", "key-shares", "neighbours", "unmask-survivors", "unmask-dropped",
    )  # fmt: skip

    def __init__(self, config: SecAggConfig, node_id: int) -> None:
        if not isinstance(config, SecAggConfig):
            raise TypeError(f"config must be a SecAggConfig, got {type(config).__name__}.")
        self.config = config
        self.node_id = int(node_id)
        self.index = config.share_index(self.node_id)  # raises ValueError when not a participant
        self._stage = "new"
        self._enc_sk = b""  # PEM (Flower's private_key_to_bytes); erased once the masked input is sent
        self._mask_sk = b""
        self._enc_pk = b""  # PEM (Flower's public_key_to_bytes)
        self._mask_pk = b""
        self._public_keys: dict[int, tuple[bytes, bytes]] = {}  # node -> (encryption, mask), as received
        self._seed = b""  # b_i; erased once the masked input is sent
        self._seed_shares: dict[int, bytes] = {}  # owner -> this site's share of the owner's b
        self._key_shares: dict[int, bytes] = {}  # owner -> this site's share of the owner's mask key
        self._neighbours: tuple[int, ...] = ()  # the other sites whose shares this site received
        self._unmask_split: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    @property
    def stage(self) -> str:
        """Where the site is: new, setup, shared (sent its shares), masked (sent its input), unmasked."""
        return self._stage

    @property
    def neighbours(self) -> tuple[int, ...]:
        """The other sites that sent this site their shares (and whose pairwise masks it added)."""
        return self._neighbours

    def _require(self, stage: str, *allowed: str) -> None:
        if self._stage not in allowed:
            raise SecAggRefusal(
                f"Node {self.node_id}: the {stage} stage arrived while this site is at stage {self._stage!r} "
                f"(it expects it at {' or '.join(repr(a) for a in allowed)}); refusing it."
            )

    # ------------------------------------------------------------- stage 1
    def setup(self) -> dict[str, bytes]:
        """Make the round's two key pairs; returns {"encryption": public key, "mask": public key} (PEM)."""
        self._require("setup", "new")
        enc_sk, enc_pk = generate_key_pairs()
        mask_sk, mask_pk = generate_key_pairs()
        self._enc_sk, self._enc_pk = private_key_to_bytes(enc_sk), public_key_to_bytes(enc_pk)
        self._mask_sk, self._mask_pk = private_key_to_bytes(mask_sk), public_key_to_bytes(mask_pk)
        self._stage = "setup"
        return {"encryption": self._enc_pk, "mask": self._mask_pk}

    # ------------------------------------------------------------- stage 2
    def share_keys(self, public_keys: Mapping[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        """Shamir-share b and the mask key; returns {other node: Fernet ciphertext of its shares}.

        `public_keys` maps every site that answered setup (this one included, at least t of the
        participants) to its (encryption, mask) public keys.
        """
        self._require("share-keys", "setup")
        keys: dict[int, tuple[bytes, bytes]] = {}
        for node, pair in public_keys.items():
            if len(pair) != 2 or not all(isinstance(k, bytes | bytearray) for k in pair):
                raise SecAggRefusal(f"Node {self.node_id}: the public keys of node {node} are not two byte strings.")
            keys[int(node)] = (bytes(pair[0]), bytes(pair[1]))
        strangers = sorted(set(keys) - set(self.config.participants))
        if strangers:
            raise SecAggRefusal(f"Node {self.node_id}: public keys arrived for nodes {strangers}, which are not "
                                "participants of this round; refusing to share keys with them.")  # fmt: skip
        if keys.get(self.node_id) != (self._enc_pk, self._mask_pk):
            raise SecAggRefusal(f"Node {self.node_id}: the key set does not hold this site's own public keys "
                                "unchanged; refusing to share keys.")  # fmt: skip
        if len(keys) < self.config.threshold:
            raise SecAggRefusal(f"Node {self.node_id}: only {len(keys)} sites published keys, fewer than the "
                                f"threshold {self.config.threshold}; refusing to share keys.")  # fmt: skip
        flat = [k for pair in keys.values() for k in pair]
        if len(set(flat)) != len(flat):
            raise SecAggRefusal(f"Node {self.node_id}: some public keys in the key set are repeated; refusing to "
                                "share keys.")  # fmt: skip
        parsed = {node: (_load_public_key(enc, node, self.node_id), _load_public_key(mask, node, self.node_id))
                  for node, (enc, mask) in keys.items()}  # fmt: skip
        del parsed  # parsed only to check that every key is a key on the curve

        seed = os.urandom(SEED_BYTES)
        n, t = self.config.num_participants, self.config.threshold
        mask_sk = bytes_to_private_key(self._mask_sk)
        seed_shares = create_shares(seed, t, n)
        key_shares = create_shares(_scalar_bytes(mask_sk), t, n)
        enc_sk = bytes_to_private_key(self._enc_sk)
        ciphertexts = {}
        for node in sorted(keys):
            position = self.config.share_index(node) - 1
            if node == self.node_id:
                continue
            shared = generate_shared_key(enc_sk, bytes_to_public_key(keys[node][0]))
            plaintext = share_keys_plaintext_concat(self.node_id, node, seed_shares[position], key_shares[position])
            ciphertexts[node] = encrypt(shared, plaintext)
        self._public_keys = keys
        self._seed = seed
        self._seed_shares = {self.node_id: seed_shares[self.index - 1]}
        self._key_shares = {self.node_id: key_shares[self.index - 1]}
        self._stage = "shared"
        return ciphertexts

    # ------------------------------------------------------------- stage 3
    def masked_input(self, vector: np.ndarray, ciphertexts_for_me: Mapping[int, bytes]) -> np.ndarray:
        """y = x + PRG(b) + Sum_{j > i} PRG(k_ij) - Sum_{j < i} PRG(k_ij) mod 2^32, over the senders j.

        `vector` is x as uint32 of length L (see `encode_signed`); `ciphertexts_for_me` maps each other
        site that sent this site its shares to its ciphertext (at least t - 1 of them). Only once.
        """
        self._require("masked-input", "shared")
        x = np.asarray(vector)
        if x.dtype != np.uint32 or x.shape != (self.config.vector_length,):
            raise ValueError(f"Node {self.node_id}: a masked input is a uint32 vector of length "
                             f"{self.config.vector_length}, got {x.dtype} of shape {x.shape}.")  # fmt: skip
        received = {int(node): bytes(ct) for node, ct in ciphertexts_for_me.items()}
        unknown = sorted(node for node in received if node not in self._public_keys or node == self.node_id)
        if unknown:
            raise SecAggRefusal(f"Node {self.node_id}: shares arrived from nodes {unknown}, which did not take part "
                                "in the key exchange; refusing.")  # fmt: skip
        if len(received) < self.config.threshold - 1:
            raise SecAggRefusal(f"Node {self.node_id}: shares arrived from only {len(received)} other sites, "
                                f"fewer than t - 1 = {self.config.threshold - 1}; refusing to send a masked "
                                "input.")  # fmt: skip
        enc_sk = bytes_to_private_key(self._enc_sk)
        seed_shares, key_shares = dict(self._seed_shares), dict(self._key_shares)
        for node in sorted(received):
            shared = generate_shared_key(enc_sk, bytes_to_public_key(self._public_keys[node][0]))
            try:
                plaintext = decrypt(shared, received[node])
            except InvalidToken:
                why = (f"Node {self.node_id}: the ciphertext said to come from node {node} does not authenticate "
                       "under the key this site shares with it; refusing.")  # fmt: skip
                raise SecAggRefusal(why) from None
            src, dst, seed_share, key_share = share_keys_plaintext_separate(plaintext)
            if src != node or dst != self.node_id:
                raise SecAggRefusal(f"Node {self.node_id}: the shares routed as from node {node} to this site were "
                                    f"sealed from node {src} to node {dst}; refusing.")  # fmt: skip
            mine_b, mine_k = self._seed_shares[self.node_id], self._key_shares[self.node_id]
            for share, mine in ((seed_share, mine_b), (key_share, mine_k)):
                if len(share) != len(mine) or _share_index(share) != self.index:
                    raise SecAggRefusal(f"Node {self.node_id}: the shares from node {node} are not this site's "
                                        f"(index {self.index}); refusing.")  # fmt: skip
            seed_shares[node], key_shares[node] = seed_share, key_share

        length = self.config.vector_length
        masked = x.astype(np.uint32, copy=True)
        masked += expand_mask(self._seed, length, SELF_MASK_LABEL)
        mask_sk = bytes_to_private_key(self._mask_sk)
        for node in sorted(received):
            pairwise = expand_mask(_pairwise_seed(mask_sk, bytes_to_public_key(self._public_keys[node][1])), length,
                                   PAIRWISE_MASK_LABEL)  # fmt: skip
            if node > self.node_id:
                masked += pairwise
            else:
                masked -= pairwise
        self._seed_shares, self._key_shares = seed_shares, key_shares
        self._neighbours = tuple(sorted(received))
        # Nothing needs b or the private keys any more: the coordinator rebuilds them from the shares.
        self._seed, self._enc_sk, self._mask_sk = b"", b"", b""
        self._stage = "masked"
        return masked

    # ------------------------------------------------------------- stage 4
    def unmask(self, survivors: Iterable[int], dropped: Iterable[int]) -> dict[str, list]:
        """This site's shares of the survivors' b and of the dropped sites' mask keys.

        Returns {"seed-owners": [ids], "seed-shares": [bytes], "key-owners": [ids], "key-shares": [bytes]}
        (parallel lists, sorted by id; ready for a Flower ConfigRecord). Refuses (SecAggRefusal) an
        overlapping split, one naming this site as dropped or not as a survivor, one naming sites that
        did not exchange shares with this site, one with fewer than t survivors, and any second request
        with another split (the same split again gets the same answer).
        """
        self._require("unmask", "masked", "unmasked")
        alive, gone = [int(n) for n in survivors], [int(n) for n in dropped]
        if len(set(alive)) != len(alive) or len(set(gone)) != len(gone):
            raise SecAggRefusal(f"Node {self.node_id}: the unmask request repeats a node; refusing.")
        both = sorted(set(alive) & set(gone))
        if both:
            raise SecAggRefusal(f"Node {self.node_id}: the unmask request names nodes {both} both as survivors and "
                                "as dropped, which would reveal their inputs; refusing.")  # fmt: skip
        if self.node_id in gone:
            raise SecAggRefusal(f"Node {self.node_id}: the unmask request names this site as dropped, but it sent "
                                "its masked input; refusing (its mask key must stay secret).")  # fmt: skip
        if self.node_id not in alive:
            raise SecAggRefusal(f"Node {self.node_id}: the unmask request does not name this site as a survivor; "
                                "refusing.")  # fmt: skip
        exchanged = set(self._neighbours) | {self.node_id}
        outside = sorted((set(alive) | set(gone)) - exchanged)
        if outside:
            raise SecAggRefusal(f"Node {self.node_id}: the unmask request names nodes {outside}, which did not "
                                "exchange shares with this site; refusing.")  # fmt: skip
        if len(alive) < self.config.threshold:
            raise SecAggRefusal(f"Node {self.node_id}: the unmask request names {len(alive)} survivors, fewer than "
                                f"the threshold {self.config.threshold}; refusing (the sum would hold too few "
                                "sites).")  # fmt: skip
        split = (tuple(sorted(alive)), tuple(sorted(gone)))
        if self._unmask_split is not None and split != self._unmask_split:
            raise SecAggRefusal(f"Node {self.node_id}: this round was already unmasked with survivors "
                                f"{list(self._unmask_split[0])} and dropped {list(self._unmask_split[1])}; refusing "
                                "a second request with another split.")  # fmt: skip
        self._unmask_split = split
        self._stage = "unmasked"
        return {SEED_OWNERS: list(split[0]), SEED_SHARES: [self._seed_shares[n] for n in split[0]],
                KEY_OWNERS: list(split[1]), KEY_SHARES: [self._key_shares[n] for n in split[1]]}  # fmt: skip

    # ------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, bytes]:
        """The site's whole state as {field: bytes} (fields in STATE_FIELDS, b"" when unset). Keep it private."""
        split = self._unmask_split or ((), ())
        return {
            "format": STATE_FORMAT,
            "config": self.config.to_bytes(),
            "node-id": str(self.node_id).encode(),
            "stage": self._stage.encode(),
            "encryption-private-key": self._enc_sk,
            "mask-private-key": self._mask_sk,
            "encryption-public-key": self._enc_pk,
            "mask-public-key": self._mask_pk,
            "public-keys-encryption": _pack_map({n: k[0] for n, k in self._public_keys.items()}),
            "public-keys-mask": _pack_map({n: k[1] for n, k in self._public_keys.items()}),
            "self-mask-seed": self._seed,
            "seed-shares": _pack_map(self._seed_shares),
            "key-shares": _pack_map(self._key_shares),
            "neighbours": _pack_ids(self._neighbours),
            "unmask-survivors": _pack_ids(split[0]) if self._unmask_split else b"",
            "unmask-dropped": _pack_ids(split[1]) if self._unmask_split else b"",
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, bytes], config: SecAggConfig | None = None) -> SecAggSite:
        """Rebuild a site from `state_dict()`; with `config`, also check it is that round's configuration."""
        missing = [k for k in cls.STATE_FIELDS if k not in state]
        if missing:
            raise ValueError(f"A secure-aggregation site state lacks the fields {missing}.")
        raw = {k: bytes(state[k]) for k in cls.STATE_FIELDS}
        if raw["format"] != STATE_FORMAT:
            raise ValueError(f"Unknown secure-aggregation site state format {raw['format']!r}.")
        saved = SecAggConfig.from_bytes(raw["config"])
        if config is not None and config != saved:
            raise ValueError("The saved secure-aggregation state belongs to another round configuration.")
        site = cls(saved, int(raw["node-id"].decode()))
        stage = raw["stage"].decode()
        if stage not in cls.STAGES:
            raise ValueError(f"Unknown secure-aggregation site stage {stage!r}.")
        site._stage = stage
        site._enc_sk, site._mask_sk = raw["encryption-private-key"], raw["mask-private-key"]
        site._enc_pk, site._mask_pk = raw["encryption-public-key"], raw["mask-public-key"]
        enc, mask = _unpack_map(raw["public-keys-encryption"]), _unpack_map(raw["public-keys-mask"])
        if set(enc) != set(mask):
            raise ValueError("The saved secure-aggregation state holds incomplete public keys.")
        site._public_keys = {n: (enc[n], mask[n]) for n in sorted(enc)}
        site._seed = raw["self-mask-seed"]
        site._seed_shares, site._key_shares = _unpack_map(raw["seed-shares"]), _unpack_map(raw["key-shares"])
        site._neighbours = _unpack_ids(raw["neighbours"])
        if stage == "unmasked":
            site._unmask_split = (_unpack_ids(raw["unmask-survivors"]), _unpack_ids(raw["unmask-dropped"]))
        return site


# ---------------------------------------------------------------- the coordinator


@dataclass
class _Dropouts:
    setup: tuple[int, ...] = ()
    share_keys: tuple[int, ...] = ()
    masked_input: tuple[int, ...] = ()
    unmask: tuple[int, ...] = ()


class SecAggServer:
    """The coordinator's side of a round: it routes, tracks dropouts, and unmasks the sum.

    Call `receive_public_keys` (stage 1 replies), `route_shares` (stage 2 replies, returns what each
    site gets at stage 3), `receive_masked_inputs` (stage 3 replies, returns the unmask split or
    raises SecAggAbort before any unmask request), then `aggregate` (stage 4 replies). Every
    SecAggAbort leaves nothing unmasked, except one from `aggregate` when fewer than t sites answered
    the unmask stage: the coordinator then holds fewer than t shares of any secret.
    """

    def __init__(self, config: SecAggConfig) -> None:
        if not isinstance(config, SecAggConfig):
            raise TypeError(f"config must be a SecAggConfig, got {type(config).__name__}.")
        self.config = config
        self.stage = "new"
        self.public_keys: dict[int, tuple[bytes, bytes]] = {}
        self.key_holders: tuple[int, ...] = ()  # U1
        self.share_senders: tuple[int, ...] = ()  # U2
        self.survivors: tuple[int, ...] = ()  # U3: their inputs are in the sum
        self.dropped: tuple[int, ...] = ()  # U2 \ U3
        self.unmask_responders: tuple[int, ...] = ()  # U4
        self.dropouts = _Dropouts()
        self._masked: dict[int, np.ndarray] = {}

    def _require(self, stage: str, allowed: str) -> None:
        if self.stage != allowed:
            raise SecAggError(f"The coordinator is at stage {self.stage!r}; {stage} needs stage {allowed!r}.")

    def _enough(self, count: int, what: str) -> None:
        if count < self.config.threshold:
            raise SecAggAbort(f"Only {count} of the {self.config.num_participants} sites {what}, fewer than the "
                              f"threshold t = {self.config.threshold} (at most {self.config.max_dropouts} may drop "
                              "out): the round is aborted and nothing is unmasked.")  # fmt: skip

    def receive_public_keys(self, public_keys: Mapping[int, tuple[bytes, bytes]]) -> dict[int, tuple[bytes, bytes]]:
        """Stage 1 replies {node: (encryption, mask) public keys}; returns the key set every site gets at stage 2."""
        self._require("receive_public_keys", "new")
        keys = {}
        for node, pair in public_keys.items():
            node = int(node)
            if node not in self.config.participants:
                raise SecAggAbort(f"Public keys arrived from node {node}, which is not a participant of this round.")
            if len(pair) != 2 or not all(isinstance(k, bytes | bytearray) for k in pair):
                raise SecAggAbort(f"Node {node} sent public keys that are not two byte strings.")
            keys[node] = (bytes(pair[0]), bytes(pair[1]))
            for key in keys[node]:
                _load_public_key(key, node, None, error=SecAggAbort)
        flat = [k for pair in keys.values() for k in pair]
        if len(set(flat)) != len(flat):
            raise SecAggAbort("Some sites sent the same public key; the round is aborted.")
        self.key_holders = tuple(sorted(keys))
        self.dropouts.setup = tuple(n for n in self.config.participants if n not in keys)
        self._enough(len(keys), "sent public keys at setup")
        self.public_keys = {n: keys[n] for n in self.key_holders}
        self.stage = "keys"
        return dict(self.public_keys)

    def route_shares(self, ciphertexts: Mapping[int, Mapping[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Stage 2 replies {sender: {receiver: ciphertext}}; returns {receiver: {sender: ciphertext}} for stage 3."""
        self._require("route_shares", "keys")
        replies = {int(i): {int(j): bytes(c) for j, c in cts.items()} for i, cts in ciphertexts.items()}
        strangers = sorted(set(replies) - set(self.key_holders))
        if strangers:
            raise SecAggAbort(f"Shares arrived from nodes {strangers}, which did not publish keys at setup.")
        senders = tuple(sorted(replies))
        self.dropouts.share_keys = tuple(n for n in self.key_holders if n not in replies)
        self._enough(len(senders), "sent their shares")
        for i in senders:
            missing = sorted(set(senders) - {i} - set(replies[i]))
            if missing:
                raise SecAggAbort(f"Node {i} sent no shares for nodes {missing}, which published keys; the round "
                                  "is aborted.")  # fmt: skip
        self.share_senders = senders
        self.stage = "routed"
        return {j: {i: replies[i][j] for i in senders if i != j} for j in senders}

    def check_can_unmask(self, survivors: Iterable[int]) -> tuple[list[int], list[int]]:
        """(survivors, dropped) for the unmask stage, or SecAggAbort when fewer than t masked inputs arrived."""
        alive = sorted({int(n) for n in survivors})
        strangers = sorted(set(alive) - set(self.share_senders))
        if strangers:
            raise SecAggAbort(f"Masked inputs arrived from nodes {strangers}, which did not send their shares.")
        self._enough(len(alive), "sent a masked input")
        return alive, [n for n in self.share_senders if n not in alive]

    def receive_masked_inputs(self, masked_inputs: Mapping[int, np.ndarray]) -> tuple[list[int], list[int]]:
        """Stage 3 replies {node: uint32 vector}; returns (survivors, dropped) to send in the unmask stage."""
        self._require("receive_masked_inputs", "routed")
        vectors = {}
        for node, vector in masked_inputs.items():
            array = np.asarray(vector)
            if array.dtype != np.uint32 or array.shape != (self.config.vector_length,):
                raise SecAggAbort(f"Node {int(node)} sent a masked input of {array.dtype} and shape {array.shape}, "
                                  f"not uint32 of length {self.config.vector_length}.")  # fmt: skip
            vectors[int(node)] = array
        alive, gone = self.check_can_unmask(vectors)
        self.dropouts.masked_input = tuple(gone)
        self._masked = {n: vectors[n] for n in alive}
        self.survivors, self.dropped = tuple(alive), tuple(gone)
        self.stage = "masked"
        return alive, gone

    def unmask_request(self) -> dict[str, list[int]]:
        """What every survivor is asked at the unmask stage: {"survivors": [...], "dropped": [...]}."""
        self._require("unmask_request", "masked")
        return {"survivors": list(self.survivors), "dropped": list(self.dropped)}

    def aggregate(self, unmask_replies: Mapping[int, Mapping[str, list]]) -> np.ndarray:
        """Stage 4 replies {node: unmask reply}; returns Sum_{survivors} x_i mod 2^32 (uint32)."""
        self._require("aggregate", "masked")
        t, length = self.config.threshold, self.config.vector_length
        replies = {int(n): r for n, r in unmask_replies.items()}
        strangers = sorted(set(replies) - set(self.survivors))
        if strangers:
            raise SecAggAbort(f"Unmask replies arrived from nodes {strangers}, which were not asked.")
        self.unmask_responders = tuple(sorted(replies))
        self.dropouts.unmask = tuple(n for n in self.survivors if n not in replies)
        self._enough(len(replies), "answered the unmask stage")
        seed_shares: dict[int, list[bytes]] = {n: [] for n in self.survivors}
        key_shares: dict[int, list[bytes]] = {n: [] for n in self.dropped}
        for responder in self.unmask_responders:
            reply = replies[responder]
            try:
                parts = [[int(n) for n in reply[SEED_OWNERS]], [bytes(s) for s in reply[SEED_SHARES]],
                         [int(n) for n in reply[KEY_OWNERS]], [bytes(s) for s in reply[KEY_SHARES]]]  # fmt: skip
            except (KeyError, TypeError, ValueError):
                raise SecAggAbort(f"Node {responder} sent a malformed unmask reply.") from None
            owners_b, shares_b, owners_k, shares_k = parts
            if (owners_b != list(self.survivors) or owners_k != list(self.dropped)
                    or len(shares_b) != len(owners_b) or len(shares_k) != len(owners_k)):  # fmt: skip
                raise SecAggAbort(f"Node {responder} sent shares for another split than the one it was asked.")
            index = self.config.share_index(responder)
            if any(_share_index(s) != index for s in shares_b + shares_k):
                raise SecAggAbort(f"Node {responder} sent shares that are not its own (index {index}).")
            for owner, share in zip(owners_b, shares_b, strict=True):
                seed_shares[owner].append(share)
            for owner, share in zip(owners_k, shares_k, strict=True):
                key_shares[owner].append(share)

        total = np.zeros(length, dtype=np.uint32)
        for node in self.survivors:
            total += self._masked[node]
        for owner, shares in seed_shares.items():
            seed = _combine(shares[:t], owner, "self-mask seed")
            if len(seed) != SEED_BYTES:
                raise SecAggAbort(f"The self-mask seed rebuilt for node {owner} is not {SEED_BYTES} bytes.")
            total -= expand_mask(seed, length, SELF_MASK_LABEL)
        for owner, shares in key_shares.items():
            scalar = _combine(shares[:t], owner, "mask key")
            try:
                private_key = ec.derive_private_key(int.from_bytes(scalar, "big"), CURVE())
            except ValueError:
                raise SecAggAbort(f"The mask key rebuilt for node {owner} is not a valid private key.") from None
            if public_key_to_bytes(private_key.public_key()) != self.public_keys[owner][1]:
                raise SecAggAbort(f"The mask key rebuilt for dropped node {owner} does not match the public key it "
                                  "published at setup; the round is aborted.")  # fmt: skip
            for node in self.survivors:
                pairwise = expand_mask(_pairwise_seed(private_key, bytes_to_public_key(self.public_keys[node][1])),
                                       length, PAIRWISE_MASK_LABEL)  # fmt: skip
                # Survivor `node` added +PRG(k) when owner > node, -PRG(k) when owner < node.
                if owner > node:
                    total -= pairwise
                else:
                    total += pairwise
        self._masked = {}
        self.stage = "done"
        return total


# ---------------------------------------------------------------- an in-memory driver (tests, benchmarks)

DROP_POINTS = ("start", "setup", "share_keys", "masked_input")  # a site drops out after this stage


@dataclass
class InMemoryResult:
    aggregate: np.ndarray  # uint32 sum of the survivors' inputs
    survivors: list[int]
    dropped: list[int]
    server: SecAggServer
    sites: dict[int, SecAggSite]
    # Payload bytes per stage and site: "<stage>-in" what it received, "<stage>" what it sent.
    message_bytes: dict[str, dict[int, int]] = field(default_factory=dict)


def run_in_memory(
    vectors: Mapping[int, np.ndarray],
    threshold: int | None = None,
    drop_after: Mapping[int, str] | None = None,
    *,
    persist_state: bool = False,
) -> InMemoryResult:
    """All four stages in this process: {node: uint32 vector} to their secure sum (SecAggAbort if too few).

    `drop_after` {node: stage} makes a site vanish after that stage (one of DROP_POINTS: "start" is
    before setup). `threshold` defaults to a majority. With `persist_state`, every site is rebuilt from
    its `state_dict()` between stages.
    """
    drop_after = dict(drop_after or {})
    bad = {n: s for n, s in drop_after.items() if s not in DROP_POINTS}
    if bad:
        raise ValueError(f"drop_after stages must be in {DROP_POINTS}, got {bad}.")
    nodes = sorted(int(n) for n in vectors)
    first = np.asarray(vectors[nodes[0]])
    config = (SecAggConfig.with_majority(nodes, first.size) if threshold is None
              else SecAggConfig(participants=tuple(nodes), threshold=threshold, vector_length=first.size))  # fmt: skip
    sites = {n: SecAggSite(config, n) for n in nodes}
    server = SecAggServer(config)
    sizes: dict[str, dict[int, int]] = {}
    last = {n: DROP_POINTS.index(drop_after[n]) if n in drop_after else len(DROP_POINTS) for n in nodes}

    def answers(node: int, stage: int) -> bool:  # stages 1..4
        return last[node] >= stage

    def persist() -> None:
        if persist_state:
            for n in nodes:
                sites[n] = SecAggSite.from_state_dict(sites[n].state_dict(), config)

    setup = {n: sites[n].setup() for n in nodes if answers(n, 1)}
    sizes["setup"] = {n: payload_nbytes(r) for n, r in setup.items()}
    persist()
    broadcast = server.receive_public_keys({n: (r["encryption"], r["mask"]) for n, r in setup.items()})
    sizes["share_keys-in"] = {n: payload_nbytes(broadcast) for n in broadcast}
    shared = {n: sites[n].share_keys(broadcast) for n in broadcast if answers(n, 2)}
    sizes["share_keys"] = {n: payload_nbytes(r) for n, r in shared.items()}
    persist()
    routed = server.route_shares(shared)
    sizes["masked_input-in"] = {n: payload_nbytes(r) for n, r in routed.items()}
    masked = {n: sites[n].masked_input(np.asarray(vectors[n]), routed[n]) for n in routed if answers(n, 3)}
    sizes["masked_input"] = {n: payload_nbytes(v) for n, v in masked.items()}
    persist()
    survivors, dropped = server.receive_masked_inputs(masked)  # SecAggAbort here: nobody was asked to unmask
    request = server.unmask_request()
    sizes["unmask-in"] = {n: payload_nbytes(request) for n in survivors}
    replies = {n: sites[n].unmask(survivors, dropped) for n in survivors if answers(n, 4)}
    sizes["unmask"] = {n: payload_nbytes(r) for n, r in replies.items()}
    persist()
    total = server.aggregate(replies)
    return InMemoryResult(total, survivors, dropped, server, sites, sizes)


def payload_nbytes(obj) -> int:
    """Protocol payload bytes of a message: bytes and arrays as they are, 8 per node id (field names not counted)."""
    if isinstance(obj, bytes | bytearray):
        return len(obj)
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, bool):
        return 1
    if isinstance(obj, int | np.integer):
        return 8
    if isinstance(obj, str):
        return 0
    if isinstance(obj, Mapping):
        return sum(payload_nbytes(k) + payload_nbytes(v) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return sum(payload_nbytes(v) for v in obj)
    raise TypeError(f"Cannot size a {type(obj).__name__}.")


# ---------------------------------------------------------------- helpers


def _pairwise_seed(private_key: ec.EllipticCurvePrivateKey, public_key: ec.EllipticCurvePublicKey) -> bytes:
    """k_ij = HKDF-SHA256(ECDH(s_i, S_j)) under the mask-agreement label (symmetric in i and j)."""
    secret = private_key.exchange(ec.ECDH(), public_key)
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=MASK_AGREEMENT_LABEL).derive(secret)


def _scalar_bytes(private_key: ec.EllipticCurvePrivateKey) -> bytes:
    """The private scalar, big-endian (48 bytes): what is Shamir-shared (smaller than the PEM Flower shares)."""
    return private_key.private_numbers().private_value.to_bytes(SCALAR_BYTES, "big")


def _load_public_key(data: bytes, node: int, me: int | None, error: type[Exception] = SecAggRefusal):
    try:
        key = bytes_to_public_key(data)
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, CURVE):
        prefix = f"Node {me}: " if me is not None else ""
        raise error(f"{prefix}the public key of node {node} is not a {CURVE.name} key in PEM.")
    return key


def _share_index(share: bytes) -> int:
    return int.from_bytes(share[:4], "little", signed=False)


def _combine(shares: list[bytes], owner: int, what: str) -> bytes:
    if len({len(s) for s in shares}) != 1:
        raise SecAggAbort(f"The shares of node {owner}'s {what} have different lengths.")
    try:
        return combine_shares(shares)
    except ValueError:
        raise SecAggAbort(f"The shares of node {owner}'s {what} do not combine into a secret.") from None


def _pack_ids(ids: Iterable[int]) -> bytes:
    return b"".join(int(n).to_bytes(8, "little", signed=False) for n in ids)


def _unpack_ids(data: bytes) -> tuple[int, ...]:
    if len(data) % 8:
        raise ValueError("A packed id list must be a multiple of 8 bytes long.")
    return tuple(int.from_bytes(data[i : i + 8], "little", signed=False) for i in range(0, len(data), 8))


def _pack_map(entries: Mapping[int, bytes]) -> bytes:
    """{id: bytes} as (8-byte id, 4-byte length, bytes)*, sorted by id."""
    return b"".join(int(n).to_bytes(8, "little", signed=False) + len(v).to_bytes(4, "little") + bytes(v)
                    for n, v in sorted(entries.items()))  # fmt: skip


def _unpack_map(data: bytes) -> dict[int, bytes]:
    out, offset = {}, 0
    while offset < len(data):
        if offset + 12 > len(data):
            raise ValueError("A packed map is truncated.")
        node = int.from_bytes(data[offset : offset + 8], "little", signed=False)
        size = int.from_bytes(data[offset + 8 : offset + 12], "little")
        offset += 12
        if offset + size > len(data):
            raise ValueError("A packed map is truncated.")
        out[node] = bytes(data[offset : offset + size])
        offset += size
    return out
