"""The SecAgg core (fedtower.secure_aggregation): exact sums under dropouts, aborts, refusals, what the
coordinator sees, the AES-CTR mask PRG against Flower's 32-bit one, and state round trips."""

from __future__ import annotations

import os

import numpy as np
import pytest
from cryptography.fernet import InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.supercore.primitives.asymmetric import bytes_to_public_key, generate_key_pairs
from scipy.stats import chisquare

from fedtower.secure_aggregation.masks import PAIRWISE_MASK_LABEL, SELF_MASK_LABEL, expand_mask
from fedtower.secure_aggregation.protocol import (
    SecAggAbort,
    SecAggConfig,
    SecAggRefusal,
    SecAggServer,
    SecAggSite,
    decode_signed,
    encode_signed,
    run_in_memory,
)

NODES = [101, 2**63 + 7, 57, 9_000_000_001, 3]  # Flower node ids (uint64), deliberately unsorted
SORTED = sorted(NODES)


def signed_vectors(seed: int, length: int = 257, nodes=NODES, bound: int = 2**28) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.integers(-bound, bound, size=length, dtype=np.int64) for n in nodes}


def encoded(vectors: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    return {n: encode_signed(v) for n, v in vectors.items()}


def masked_round(nodes=SORTED, length: int = 64, threshold: int = 3):
    """Sites that have all sent their masked inputs, and the coordinator that holds them."""
    config = SecAggConfig(participants=tuple(nodes), threshold=threshold, vector_length=length)
    sites = {n: SecAggSite(config, n) for n in nodes}
    server = SecAggServer(config)
    keys = server.receive_public_keys({n: tuple(s.setup().values()) for n, s in sites.items()})
    routed = server.route_shares({n: s.share_keys(keys) for n, s in sites.items()})
    vectors = {n: encode_signed(np.arange(length) * (i + 1)) for i, n in enumerate(nodes)}
    masked = {n: sites[n].masked_input(vectors[n], routed[n]) for n in nodes}
    return config, sites, server, routed, vectors, masked


# ---------------------------------------------------------------- exact sums


def test_five_sites_sum_exactly_to_the_plain_sum():
    # Prepare: signed vectors whose sum fits in int32, plus one coordinate that wraps modulo 2^32.
    vectors = signed_vectors(seed=1)
    # Execute
    result = run_in_memory(encoded(vectors), threshold=3)
    # Assert
    assert result.aggregate.dtype == np.uint32
    assert result.survivors == SORTED and result.dropped == []
    np.testing.assert_array_equal(decode_signed(result.aggregate), sum(vectors.values()))
    wrapped = sum(encode_signed(v).astype(np.uint64) for v in vectors.values()) % 2**32
    np.testing.assert_array_equal(result.aggregate.astype(np.uint64), wrapped)


@pytest.mark.parametrize("early", ["setup", "share_keys"])
def test_dropouts_leave_exactly_the_sum_of_the_sites_whose_masked_input_arrived(early):
    # Prepare: n = 5, t = 3; one site vanishes before sending its masked input, one after (it never
    # answers unmask but its input arrived, so it is in the sum).
    vectors = signed_vectors(seed=2)
    gone_early, gone_late = SORTED[1], SORTED[3]
    # Execute
    result = run_in_memory(encoded(vectors), threshold=3, drop_after={gone_early: early, gone_late: "masked_input"})
    # Assert
    in_sum = [n for n in SORTED if n != gone_early]
    assert result.survivors == in_sum
    assert result.dropped == ([gone_early] if early == "share_keys" else [])  # after setup: never shared
    assert result.server.dropouts.unmask == (gone_late,)
    np.testing.assert_array_equal(decode_signed(result.aggregate), sum(vectors[n] for n in in_sum))


@pytest.mark.parametrize(
    "drops",
    [
        {SORTED[0]: "share_keys", SORTED[2]: "share_keys", SORTED[4]: "share_keys"},  # at receive_masked_inputs
        {SORTED[0]: "setup", SORTED[1]: "share_keys", SORTED[2]: "share_keys"},
        {SORTED[1]: "setup", SORTED[2]: "setup", SORTED[3]: "setup"},  # at route_shares
        {SORTED[0]: "start", SORTED[1]: "start", SORTED[2]: "start"},  # at receive_public_keys
    ],
)
def test_one_dropout_more_than_n_minus_t_aborts_before_anyone_is_asked_to_unmask(drops, monkeypatch):
    # Prepare: n = 5, t = 3 tolerates 2 dropouts; 3 drop. Record every unmask call a site gets.
    asked = []
    unmask = SecAggSite.unmask
    monkeypatch.setattr(SecAggSite, "unmask", lambda self, *a: asked.append(self.node_id) or unmask(self, *a))
    # Execute / Assert
    with pytest.raises(SecAggAbort, match="fewer than the threshold t = 3"):
        run_in_memory(encoded(signed_vectors(seed=3)), threshold=3, drop_after=drops)
    assert asked == []


def test_fewer_than_t_unmask_answers_abort_without_a_sum():
    # Prepare: all masked inputs arrive, then 3 of 5 sites vanish before answering unmask.
    drops = {n: "masked_input" for n in SORTED[:3]}
    # Execute / Assert: only 2 < t sites' shares reached the coordinator; no aggregate.
    with pytest.raises(SecAggAbort, match="answered the unmask stage"):
        run_in_memory(encoded(signed_vectors(seed=4)), threshold=3, drop_after=drops)


def test_the_coordinator_checks_before_unmasking():
    # Prepare: a round where every site sent its masked input.
    config, sites, server, _, _, masked = masked_round()
    # Execute / Assert: the pre-unmask check refuses too few survivors and sites it never routed.
    with pytest.raises(SecAggAbort):
        server.check_can_unmask(SORTED[:2])
    with pytest.raises(SecAggAbort, match="did not send their shares"):
        server.check_can_unmask([*SORTED[:3], 12345])
    assert server.check_can_unmask(SORTED[:3]) == (SORTED[:3], SORTED[3:])


def test_a_reconstructed_mask_key_is_checked_against_the_published_key():
    # Prepare: one dropped site; the coordinator's record of its mask public key is swapped for another.
    config, sites, server, _, _, masked = masked_round()
    gone = SORTED[2]
    survivors, dropped = server.receive_masked_inputs({n: v for n, v in masked.items() if n != gone})
    replies = {n: sites[n].unmask(survivors, dropped) for n in survivors}
    server.public_keys[gone] = (server.public_keys[gone][0], server.public_keys[SORTED[0]][1])
    # Execute / Assert
    with pytest.raises(SecAggAbort, match="does not match the public key"):
        server.aggregate(replies)


# ---------------------------------------------------------------- a site's refusals


def test_a_site_refuses_unmask_requests_that_would_break_the_guarantee():
    # Prepare: every site has sent its masked input; look at one of them.
    config, sites, server, _, _, _ = masked_round()
    me = sites[SORTED[1]]
    others = [n for n in SORTED if n != me.node_id]
    # Execute / Assert: named as dropped; overlapping split; fewer than t survivors; not a survivor;
    # strangers named.
    with pytest.raises(SecAggRefusal, match="names this site as dropped"):
        me.unmask(others, [me.node_id])
    with pytest.raises(SecAggRefusal, match="both as survivors and as dropped"):
        me.unmask(SORTED, [others[0]])
    with pytest.raises(SecAggRefusal, match="fewer than the threshold"):
        me.unmask([me.node_id, others[0]], others[1:])
    with pytest.raises(SecAggRefusal, match="not name this site as a survivor"):
        me.unmask(others, [])
    with pytest.raises(SecAggRefusal, match="did not exchange shares"):
        me.unmask([*SORTED, 424242], [])
    # Assert: refusals changed nothing; a valid split is answered, the same one again gets the same
    # answer, another split is refused.
    assert me.stage == "masked"
    first = me.unmask(SORTED[:4], SORTED[4:])
    assert not set(first["seed-owners"]) & set(first["key-owners"])
    assert first["seed-owners"] == SORTED[:4] and first["key-owners"] == SORTED[4:]
    assert me.unmask(list(reversed(SORTED[:4])), SORTED[4:]) == first
    with pytest.raises(SecAggRefusal, match="already unmasked"):
        me.unmask(SORTED[:3], SORTED[3:])
    rebuilt = SecAggSite.from_state_dict(me.state_dict())
    with pytest.raises(SecAggRefusal, match="already unmasked"):
        rebuilt.unmask(SORTED, [])


def test_a_site_refuses_bad_key_sets_and_a_second_masked_input():
    # Prepare
    config = SecAggConfig(participants=tuple(SORTED), threshold=3, vector_length=8)
    sites = {n: SecAggSite(config, n) for n in SORTED}
    keys = {n: tuple(s.setup().values()) for n, s in sites.items()}
    me = sites[SORTED[0]]
    # Execute / Assert: own keys replaced; a non-participant; too few sites; a repeated key.
    with pytest.raises(SecAggRefusal, match="own public keys"):
        me.share_keys({**keys, me.node_id: keys[SORTED[1]]})
    with pytest.raises(SecAggRefusal, match="not participants"):
        me.share_keys({**keys, 777: keys[SORTED[1]]})
    with pytest.raises(SecAggRefusal, match="fewer than the"):
        me.share_keys({n: keys[n] for n in SORTED[:2]})
    with pytest.raises(SecAggRefusal, match="repeated"):
        me.share_keys({**keys, SORTED[2]: keys[SORTED[1]]})
    routed = SecAggServer(config)
    routed.receive_public_keys(keys)
    to = routed.route_shares({n: s.share_keys(keys) for n, s in sites.items()})
    with pytest.raises(SecAggRefusal, match="fewer than t - 1"):
        me.masked_input(np.zeros(8, np.uint32), dict(list(to[me.node_id].items())[:1]))
    me.masked_input(np.zeros(8, np.uint32), to[me.node_id])
    with pytest.raises(SecAggRefusal, match="stage 'masked'"):
        me.masked_input(np.zeros(8, np.uint32), to[me.node_id])


# ---------------------------------------------------------------- what the coordinator sees


def test_a_masked_input_looks_uniform_and_uncorrelated_with_the_input():
    # Prepare: a strongly structured input (small signed values: the encoded top bytes are 0x00 or 0xFF).
    length = 1 << 17
    nodes = SORTED[:3]
    rng = np.random.default_rng(5)
    x = rng.integers(-(2**20), 2**20, size=length)
    vectors = {n: encode_signed(x if n == nodes[0] else rng.integers(-(2**20), 2**20, size=length)) for n in nodes}
    # Execute
    config = SecAggConfig(participants=tuple(nodes), threshold=2, vector_length=length)
    sites = {n: SecAggSite(config, n) for n in nodes}
    server = SecAggServer(config)
    keys = server.receive_public_keys({n: tuple(s.setup().values()) for n, s in sites.items()})
    routed = server.route_shares({n: s.share_keys(keys) for n, s in sites.items()})
    y = sites[nodes[0]].masked_input(vectors[nodes[0]], routed[nodes[0]])
    # Assert: byte frequencies pass a chi-square test (the raw input fails it), and no correlation.
    assert chisquare(np.bincount(y.view(np.uint8), minlength=256)).pvalue > 1e-6
    assert chisquare(np.bincount(vectors[nodes[0]].view(np.uint8), minlength=256)).pvalue < 1e-6
    assert abs(np.corrcoef(vectors[nodes[0]].astype(np.float64), y.astype(np.float64))[0, 1]) < 0.02
    assert abs(np.corrcoef(x.astype(np.float64), y.astype(np.float64))[0, 1]) < 0.02
    bits = np.unpackbits(y.view(np.uint8)).mean()
    assert abs(bits - 0.5) < 0.005


def test_the_coordinator_cannot_read_or_redirect_shares():
    # Prepare: the stage-2 ciphertexts of a round, as the coordinator routes them.
    config = SecAggConfig(participants=tuple(SORTED[:3]), threshold=2, vector_length=4)
    a, b, c = SORTED[:3]
    sites = {n: SecAggSite(config, n) for n in SORTED[:3]}
    keys = {n: tuple(s.setup().values()) for n, s in sites.items()}
    sent = {n: s.share_keys(keys) for n, s in sites.items()}
    ciphertext = sent[a][b]
    # Execute / Assert: the coordinator's own ECDH keys with either endpoint do not open it (Fernet
    # raises), and neither does the receiver's key with another sender.
    own_sk, _ = generate_key_pairs()
    for endpoint in (a, b):
        with pytest.raises(InvalidToken):
            decrypt(generate_shared_key(own_sk, bytes_to_public_key(keys[endpoint][0])), ciphertext)
    # Redirected to c (as from a), or relabelled as from c to b: the site refuses.
    with pytest.raises(SecAggRefusal, match="does not authenticate"):
        sites[c].masked_input(np.zeros(4, np.uint32), {a: ciphertext, b: sent[b][c]})
    with pytest.raises(SecAggRefusal, match="does not authenticate"):
        sites[b].masked_input(np.zeros(4, np.uint32), {c: ciphertext, a: sent[a][b]})
    # The right receiver accepts it.
    sites[b].masked_input(np.zeros(4, np.uint32), {a: ciphertext, c: sent[c][b]})


# ---------------------------------------------------------------- the mask PRG


def test_flowers_prg_collides_on_seeds_with_equal_xor_fold_and_expand_mask_does_not():
    # Prepare: two different 32-byte seeds; the same bits flipped in words 0 and 1 keep the XOR fold.
    seed = bytearray(os.urandom(32))
    other = bytearray(seed)
    flip = (0xDEADBEEF).to_bytes(4, "little")
    for word in (0, 1):
        for k in range(4):
            other[4 * word + k] ^= flip[k]
    seed, other = bytes(seed), bytes(other)
    assert seed != other
    # Execute
    flower = [pseudo_rand_gen(s, 2**32, [(1000,)])[0] for s in (seed, other)]
    ours = [expand_mask(s, 1000) for s in (seed, other)]
    # Assert
    np.testing.assert_array_equal(flower[0], flower[1])
    assert np.count_nonzero(ours[0] != ours[1]) > 990


def test_expand_mask_is_aes_ctr_under_an_hkdf_key_deterministic_and_prefix_consistent():
    seed = bytes(range(32))
    # A known answer (pins the format: a change would break mixed-version rounds).
    assert expand_mask(seed, 4).tolist() == [4159314830, 1919941758, 1310490704, 2744814690]
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=SELF_MASK_LABEL).derive(seed)
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(4 * 1000))
    np.testing.assert_array_equal(expand_mask(seed, 1000), np.frombuffer(stream, "<u4"))
    # Deterministic, prefix-consistent, label-separated, 32-byte seeds only.
    long = expand_mask(seed, 10_001)
    assert long.dtype == np.uint32 and long.shape == (10_001,)
    np.testing.assert_array_equal(expand_mask(seed, 10_001), long)
    np.testing.assert_array_equal(expand_mask(seed, 37), long[:37])
    assert np.count_nonzero(expand_mask(seed, 1000, PAIRWISE_MASK_LABEL) != long[:1000]) > 990
    assert expand_mask(seed, 0).shape == (0,)
    with pytest.raises(ValueError, match="32 bytes"):
        expand_mask(seed[:31], 10)


# ---------------------------------------------------------------- state, config, encoding


def test_sites_rebuilt_from_their_state_between_every_stage_complete_the_round():
    # Prepare
    vectors = signed_vectors(seed=6, length=100)
    # Execute
    result = run_in_memory(encoded(vectors), threshold=3, drop_after={SORTED[0]: "share_keys"}, persist_state=True)
    # Assert: exact sum; the state is bytes only, and after the masked input it holds no private key
    # or self-mask seed.
    np.testing.assert_array_equal(decode_signed(result.aggregate), sum(vectors[n] for n in SORTED[1:]))
    state = result.sites[SORTED[1]].state_dict()
    assert tuple(state) == SecAggSite.STATE_FIELDS and all(isinstance(v, bytes) for v in state.values())
    assert state["stage"] == b"unmasked"
    assert state["encryption-private-key"] == state["mask-private-key"] == state["self-mask-seed"] == b""
    other = SecAggConfig(participants=tuple(SORTED), threshold=4, vector_length=100)
    with pytest.raises(ValueError, match="another round configuration"):
        SecAggSite.from_state_dict(state, other)


@pytest.mark.parametrize(
    ("participants", "threshold", "length", "message"),
    [
        ((5,), 1, 4, "at least 2 participants"),
        ((1, 2, 3, 4), 2, 4, "majority of the 4 participants, between 3 and 4"),
        ((1, 2, 3), 4, 4, "between 2 and 3"),
        ((1, 2, 3), 2, 0, "positive integer"),
        ((1, 2, 2), 2, 4, "distinct"),
        ((1, -2, 3), 2, 4, "unsigned 64-bit"),
    ],
)
def test_config_rejects_what_the_protocol_cannot_run(participants, threshold, length, message):
    with pytest.raises(ValueError, match=message):
        SecAggConfig(participants=participants, threshold=threshold, vector_length=length)


def test_config_sorts_participants_into_shamir_indices():
    config = SecAggConfig(participants=tuple(NODES), threshold=3, vector_length=1)
    assert config.participants == tuple(SORTED)
    assert [config.share_index(n) for n in SORTED] == [1, 2, 3, 4, 5]
    assert SecAggConfig.with_majority(range(10), 1).threshold == 6


def test_signed_encoding_is_twos_complement_modulo_2_to_the_32():
    values = np.array([-(2**31), -1, 0, 1, 2**31 - 1])
    assert encode_signed(values).tolist() == [2**31, 2**32 - 1, 0, 1, 2**31 - 1]
    np.testing.assert_array_equal(decode_signed(encode_signed(values)), values)
    with pytest.raises(ValueError, match=r"\[-2\^31, 2\^31\)"):
        encode_signed(np.array([2**31]))
    with pytest.raises(ValueError, match="integer"):
        encode_signed(np.array([0.5]))
    with pytest.raises(ValueError, match="uint32"):
        decode_signed(np.array([1], dtype=np.int64))
