"""The privacy ledger: entries, Flower records, Ed25519 signatures, the server's file, the audit, the report."""

import dataclasses
import json
import os
import stat

import matplotlib.image
import pytest
from flwr.app import ConfigRecord
from flwr.common.serde import config_record_from_proto, config_record_to_proto

from fedtower.privacy.accounting import ClientAccountant
from fedtower.privacy.ledger import (
    LEDGER_FILE,
    LedgerEntry,
    LedgerSignatureError,
    ServerLedger,
    epsilon_table,
    generate_signing_key,
    library_versions,
    load_public_key,
    load_signing_key,
    plot_epsilon,
    pseudonymous_node_id,
    public_key_fingerprint,
    save_public_key,
    save_signing_key,
    sign_entry,
    signed_from_config_record,
    signed_to_config_record,
    verify_entry,
)

RUN = "run-1"
DELTA = 1e-5
RATE = 1 / 7
VERSIONS = {"fedtower": "0.1.0", "opacus": "1.6.0", "torch": "2.13.0", "flwr": "1.41.0"}
CREATED_AT = "2025-01-31T12:00:00+00:00"
# Opacus RDP ε at δ=1e-5 after 70, 140 and 210 steps at noise 1.1 and rate 1/7.
EPSILONS = (8.037037576470452, 11.299501840878989, 14.003880133621793)


def round_entries(node, rounds, *, noise=1.1, steps=70, accountant=None, first_round=1):
    """Entries of `rounds` consecutive trained rounds of one node, as a client would write them."""
    accountant = accountant or ClientAccountant()
    entries = []
    for server_round in range(first_round, first_round + rounds):
        before = accountant.epsilon(delta=DELTA)
        accountant.step(noise_multiplier=noise, sample_rate=RATE, steps=steps)
        entries.append(
            LedgerEntry(
                run=RUN,
                round=server_round,
                node=node,
                unit="user",
                noise_multiplier=noise,
                sample_rate=RATE,
                steps=steps,
                max_grad_norm=1.0,
                delta=DELTA,
                accountant="rdp",
                epsilon_before=before,
                epsilon_after=accountant.epsilon(delta=DELTA),
                status="trained",
                weights="constant",
                history=accountant.history,
                versions=VERSIONS,
                created_at=CREATED_AT,
            )
        )
    return entries


@pytest.fixture(scope="module")
def entries():
    return round_entries("node-a", 3)


@pytest.fixture(scope="module")
def key():
    return generate_signing_key()


# ---------------------------------------------------------------- entries


def test_entries_carry_the_accountants_epsilons(entries):
    assert [e.epsilon_after for e in entries] == pytest.approx(EPSILONS, rel=1e-12)
    assert [e.epsilon_before for e in entries] == pytest.approx((0.0, *EPSILONS[:2]), rel=1e-12)
    assert entries[2].history == ((1.1, RATE, 210),)


def test_an_entry_round_trips_through_a_json_dict(entries):
    # Execute
    data = json.loads(json.dumps(entries[1].to_dict()))
    restored = LedgerEntry.from_dict(data)

    # Assert
    assert restored == entries[1]
    assert data["history"] == [[1.1, RATE, 140]]
    assert data["format"] == 2
    assert set(data) == {f.name for f in dataclasses.fields(LedgerEntry)} | {"format"}


def test_defaults_record_library_versions_and_the_time_in_utc(entries):
    # Prepare
    fields = {k: v for k, v in entries[0].to_dict().items() if k not in ("format", "versions", "created_at")}

    # Execute
    entry = LedgerEntry(**fields)

    # Assert
    assert set(entry.versions) == {"fedtower", "opacus", "torch", "flwr"}
    assert entry.versions["opacus"].startswith("1.6")
    assert entry.versions == library_versions()
    assert entry.created_at.endswith("+00:00")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("round", "1", "'round' must be a positive integer"),
        ("round", 0, "'round' must be a positive integer"),
        ("node", "", "'node' must be a non-empty string"),
        ("unit", "person", "'unit' must be one of user, interaction, client"),
        ("noise_multiplier", -1.0, "'noise_multiplier' must be a positive finite number"),
        ("sample_rate", 1.5, r"'sample_rate' must be a number in \(0, 1\]"),
        ("steps", True, "'steps' must be an integer of at least 0"),
        ("max_grad_norm", 0.0, "'max_grad_norm' must be a positive finite number"),
        ("delta", 0.0, r"'delta' must be a number in \(0, 1\)"),
        ("accountant", "prv", "'accountant' must be one of rdp"),
        ("epsilon_after", float("inf"), "'epsilon_after' must be a finite number"),
        ("epsilon_before", "0.5", "'epsilon_before' must be a finite number"),
        ("status", "done", "'status' must be one of trained, budget-exhausted"),
        ("weights", "noisy", "'weights' must be one of constant, examples"),
        ("history", [[1.1, RATE]], r"'history'\[0\] must be a"),
        ("history", [[1.1, 7.0, 70]], r"'history'\[0\] \(sample_rate\)"),
        ("versions", {"fedtower": "0.1.0"}, "'versions' has no version for opacus, torch, flwr"),
        ("versions", {**VERSIONS, "torch": 2}, "'versions' must map library names to version strings"),
        ("created_at", "2025-01-31T13:00:00+01:00", "'created_at' must be an ISO 8601 time in UTC"),
        ("created_at", "yesterday", "'created_at' must be an ISO 8601 time in UTC"),
    ],
)
def test_a_bad_field_is_named(entries, field, value, message):
    # Prepare
    data = entries[0].to_dict() | {field: value}

    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        LedgerEntry.from_dict(data)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("epsilon_after"), "has no 'epsilon_after' field"),
        (lambda d: d.pop("format"), "has no 'format' field"),
        (lambda d: d.update(format=3), "'format' is 3"),
        (lambda d: d.update(raw_node_id=5), r"unknown fields \['raw_node_id'\]"),
    ],
)
def test_missing_and_unknown_fields_are_refused(entries, change, message):
    # Prepare
    data = entries[0].to_dict()
    change(data)

    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        LedgerEntry.from_dict(data)


def test_status_and_steps_agree(entries):
    with pytest.raises(ValueError, match="'trained' must record at least one step"):
        dataclasses.replace(entries[0], steps=0)
    with pytest.raises(ValueError, match="'budget-exhausted' must record 0 steps; got 70"):
        dataclasses.replace(entries[0], status="budget-exhausted")


# ---------------------------------------------------------------- Flower records


def test_an_entry_round_trips_through_a_config_record_on_the_wire(entries):
    # Execute: through Flower's protobuf, as in a reply.
    record = entries[2].to_config_record()
    received = config_record_from_proto(config_record_to_proto(record))
    restored = LedgerEntry.from_config_record(received)

    # Assert
    assert isinstance(record, ConfigRecord)
    assert restored == entries[2]
    assert json.loads(record["history"]) == [[1.1, RATE, 210]]
    assert json.loads(record["versions"]) == VERSIONS
    assert all(isinstance(value, (str, int, float, bool)) for value in record.values())


def test_a_config_record_with_garbled_json_is_refused(entries):
    record = entries[0].to_config_record()
    record["history"] = "[[1.1, 0.14"
    with pytest.raises(ValueError, match="'history' field is not valid JSON"):
        LedgerEntry.from_config_record(record)


def test_a_signed_entry_round_trips_through_a_config_record_and_still_verifies(entries, key):
    # Prepare
    signed = sign_entry(entries[1], key)

    # Execute
    record = signed_to_config_record(signed)
    received = signed_from_config_record(config_record_from_proto(config_record_to_proto(record)))

    # Assert
    assert received == signed
    assert verify_entry(received, key.public_key()) == entries[1]


def test_an_unsigned_record_is_not_taken_for_a_signed_one(entries):
    with pytest.raises(ValueError, match="is not signed: it has no 'algorithm', 'key_id', 'signature' field"):
        signed_from_config_record(entries[0].to_config_record())


# ---------------------------------------------------------------- signatures


def test_a_signed_entry_verifies_with_its_key(entries, key):
    # Execute
    signed = sign_entry(entries[0], key)

    # Assert
    assert set(signed) == {"entry", "signature", "key_id", "algorithm"}
    assert signed["algorithm"] == "ed25519"
    assert signed["key_id"] == public_key_fingerprint(key.public_key())
    assert verify_entry(signed, key.public_key()) == entries[0]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epsilon_after", 1.0),
        ("epsilon_before", 0.1),
        ("delta", 1e-3),
        ("noise_multiplier", 2.2),
        ("sample_rate", 0.5),
        ("steps", 7),
        ("round", 9),
        ("node", "node-b"),
        ("run", "run-2"),
        ("unit", "interaction"),
        ("status", "budget-exhausted"),
        ("weights", "examples"),
        ("history", [[1.1, RATE, 7]]),
        ("versions", {**VERSIONS, "opacus": "1.5.0"}),
        ("created_at", "2025-02-01T12:00:00+00:00"),
        ("max_grad_norm", 10.0),
    ],
)
def test_changing_any_field_breaks_the_signature(entries, key, field, value):
    # Prepare
    signed = sign_entry(entries[0], key)
    signed["entry"] = signed["entry"] | {field: value}

    # Execute / Assert
    with pytest.raises(LedgerSignatureError, match="does not match its signature: it was changed after"):
        verify_entry(signed, key.public_key())


def test_a_different_key_is_named(entries, key):
    # Prepare
    signed = sign_entry(entries[0], key)
    other = generate_signing_key().public_key()

    # Execute / Assert
    with pytest.raises(LedgerSignatureError, match=f"signed by key '{signed['key_id']}', not by key"):
        verify_entry(signed, other)
    signed["key_id"] = public_key_fingerprint(other)  # a forger claims the other key
    with pytest.raises(LedgerSignatureError, match="does not match its signature"):
        verify_entry(signed, other)


def test_a_garbled_signature_is_refused(entries, key):
    signed = sign_entry(entries[0], key)
    with pytest.raises(LedgerSignatureError, match="not base64"):
        verify_entry(signed | {"signature": "not base64!"}, key.public_key())
    flipped = signed["signature"][:-4] + ("AAAA" if signed["signature"][-4:] != "AAAA" else "BBBB")
    with pytest.raises(LedgerSignatureError, match="does not match its signature"):
        verify_entry(signed | {"signature": flipped}, key.public_key())


def test_keys_are_saved_as_pem_and_the_private_one_is_private(tmp_path, entries):
    # Prepare
    key = generate_signing_key()

    # Execute
    save_signing_key(key, tmp_path / "node.key")
    save_public_key(key.public_key(), tmp_path / "node.pub")
    loaded, public = load_signing_key(tmp_path / "node.key"), load_public_key(tmp_path / "node.pub")

    # Assert
    assert stat.S_IMODE(os.stat(tmp_path / "node.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "node.pub").st_mode) == 0o644
    assert (tmp_path / "node.key").read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert (tmp_path / "node.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert verify_entry(sign_entry(entries[0], loaded), public) == entries[0]
    assert verify_entry(sign_entry(entries[0], key), public) == entries[0]


def test_a_private_key_others_can_read_is_refused(tmp_path):
    path = tmp_path / "node.key"
    save_signing_key(generate_signing_key(), path)
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError, match="can be read by other users \\(mode 0644\\); run `chmod 600"):
        load_signing_key(path)


# ---------------------------------------------------------------- node pseudonyms


def test_node_pseudonyms_are_keyed_hashes():
    # Execute
    plain = pseudonymous_node_id(5, RUN)

    # Assert: golden values; stable, different per run and per secret.
    assert plain == "node-4d2e1b146822b992"
    assert pseudonymous_node_id(5, RUN) == plain
    assert pseudonymous_node_id(5, "run-2") == "node-9494afc23d09aedd"
    assert pseudonymous_node_id(5, RUN, b"secret") == "node-95adc1a6b37721c1"
    assert pseudonymous_node_id(6, RUN) != plain


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((-1, RUN), "node_id must be a non-negative integer"),
        (("5", RUN), "node_id must be a non-negative integer"),
        ((5, ""), "run must be a non-empty string"),
        ((5, RUN, b""), "secret must be non-empty bytes"),
    ],
)
def test_node_pseudonyms_check_their_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        pseudonymous_node_id(*arguments)


# ---------------------------------------------------------------- the server's ledger


def test_appended_entries_read_back_in_order(tmp_path, entries, key):
    # Prepare
    ledger = ServerLedger(tmp_path)
    signed = [sign_entry(entry, key) for entry in entries]

    # Execute
    ledger.append(signed[0])
    ledger.append(entries[1].to_dict())
    ServerLedger(tmp_path).append(signed[2])

    # Assert
    assert ledger.path == tmp_path / LEDGER_FILE
    assert ledger.entries() == [signed[0], entries[1].to_dict(), signed[2]]
    assert ledger.latest_epsilon_by_node() == {"node-a": entries[2].epsilon_after}
    lines = ledger.path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 4
    assert json.loads(lines[1]) == entries[1].to_dict()


def test_a_jsonl_path_is_the_ledger_file_itself(tmp_path, entries):
    ledger = ServerLedger(tmp_path / "audit" / "copy.jsonl")
    ledger.append(entries[0])
    assert ledger.entries() == [entries[0].to_dict()]
    assert ServerLedger(tmp_path / "nothing-here").entries() == []


def test_the_latest_epsilon_is_per_node(tmp_path, entries):
    # Prepare
    ledger = ServerLedger(tmp_path)
    other = round_entries("node-b", 1, noise=5.1171875)

    # Execute
    for entry in [entries[0], other[0], entries[1]]:
        ledger.append(entry)

    # Assert
    assert ledger.latest_epsilon_by_node() == {
        "node-a": pytest.approx(EPSILONS[1], rel=1e-12),
        "node-b": pytest.approx(0.9918889811825784, rel=1e-12),
    }


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"round": 1}, "has no 'format' field"),
        ({"entry": {}, "signature": "x"}, "exactly the fields"),
    ],
)
def test_append_refuses_malformed_records(tmp_path, record, message):
    ledger = ServerLedger(tmp_path)
    with pytest.raises(ValueError, match=message):
        ledger.append(record)
    assert not ledger.path.exists()


def test_an_unfinished_last_line_is_skipped_then_cut(tmp_path, entries):
    # Prepare: an append that died half-way.
    ledger = ServerLedger(tmp_path)
    ledger.append(entries[0])
    with open(ledger.path, "ab") as handle:
        handle.write(b'{"format": 1, "ru')

    # Execute
    before = ledger.entries()
    ledger.append(entries[1])

    # Assert
    assert before == [entries[0].to_dict()]
    assert ledger.entries() == [entries[0].to_dict(), entries[1].to_dict()]


def test_a_corrupt_middle_line_is_an_error(tmp_path, entries):
    ledger = ServerLedger(tmp_path)
    ledger.path.write_text(json.dumps(entries[0].to_dict()) + "\nnot json\n")
    with pytest.raises(ValueError, match="is corrupt: line 2 is not a JSON object"):
        ledger.entries()


# ---------------------------------------------------------------- the audit


def test_a_clean_signed_ledger_verifies(tmp_path, entries, key):
    # Prepare
    ledger = ServerLedger(tmp_path)
    other_key = generate_signing_key()
    for entry in entries:
        ledger.append(sign_entry(entry, key))
    for entry in round_entries("node-b", 2, noise=2.0):
        ledger.append(sign_entry(entry, other_key))

    # Execute
    audit = ledger.verify_all({"node-a": key.public_key(), "node-b": other_key.public_key()})

    # Assert
    assert audit.ok, audit.summary()
    assert audit.entries == 5 and audit.signatures_checked
    assert audit.epsilon_by_node["node-a"] == pytest.approx(EPSILONS[2], rel=1e-6)
    assert "signatures verified" in audit.summary() and "No problems found." in audit.summary()
    unchecked = ledger.verify_all()
    assert unchecked.ok and not unchecked.signatures_checked
    assert "signatures NOT checked" in unchecked.summary()


def test_verification_catches_a_wrong_epsilon(tmp_path, entries):
    # Prepare: a client that under-reports its ε in round 2.
    ledger = ServerLedger(tmp_path)
    ledger.append(entries[0])
    ledger.append(dataclasses.replace(entries[1], epsilon_after=entries[1].epsilon_after * (1 - 1e-5)))
    ledger.append(entries[2])

    # Execute
    audit = ledger.verify_all()

    # Assert
    assert not audit.ok
    assert [(f.line, f.node, f.round) for f in audit.findings] == [(2, "node-a", 2)]
    assert "epsilon_after is" in audit.findings[0].problem
    assert "(independent RDP accountant)" in audit.findings[0].problem
    assert "line 2 (node node-a, round 2): epsilon_after is" in audit.summary()


def test_verification_tolerates_a_tiny_rounding_difference(tmp_path, entries):
    ledger = ServerLedger(tmp_path)
    ledger.append(dataclasses.replace(entries[0], epsilon_after=entries[0].epsilon_after * (1 + 1e-9)))
    assert ledger.verify_all().ok


def test_verification_catches_a_line_edited_on_disk(tmp_path, entries, key):
    # Prepare: someone lowers ε in the stored file, keeping it consistent with a shorter history.
    ledger = ServerLedger(tmp_path)
    for entry in entries[:2]:
        ledger.append(sign_entry(entry, key))
    lines = ledger.path.read_text().splitlines()
    edited = json.loads(lines[1])
    edited["entry"] |= {"epsilon_after": entries[0].epsilon_after, "history": [[1.1, RATE, 70]], "steps": 70}
    ledger.path.write_text("\n".join([lines[0], json.dumps(edited)]) + "\n")

    # Execute
    audit = ledger.verify_all({"node-a": key.public_key()})

    # Assert: the signature catches it, and so do ε before and the history chain.
    assert [f.line for f in audit.findings] == [2, 2, 2]
    assert "does not match its signature" in audit.findings[0].problem
    assert "epsilon_before is" in audit.findings[1].problem
    assert "does not continue this node's previous entry" in audit.findings[2].problem


def test_verification_reports_unsigned_entries_and_unknown_nodes(tmp_path, entries, key):
    ledger = ServerLedger(tmp_path)
    ledger.append(entries[0])
    ledger.append(sign_entry(round_entries("node-b", 1)[0], key))

    audit = ledger.verify_all({"node-a": key.public_key()})

    assert [(f.node, f.problem) for f in audit.findings] == [
        ("node-a", "the entry is not signed."),
        ("node-b", "no public key is known for this node, so its signature cannot be checked."),
    ]


def test_verification_catches_a_reset_accountant(tmp_path, entries):
    # Prepare: after round 2 the client's accountant restarts from zero.
    ledger = ServerLedger(tmp_path)
    for entry in [*entries[:2], *round_entries("node-a", 1, first_round=3)]:
        ledger.append(entry)

    # Execute
    audit = ledger.verify_all()

    # Assert: its own numbers are consistent, but it does not continue the chain.
    assert [(f.line, f.round) for f in audit.findings] == [(3, 3)]
    assert "does not continue this node's previous entry (line 2)" in audit.findings[0].problem


def test_verification_catches_a_round_missing_from_the_ledger(tmp_path, entries):
    ledger = ServerLedger(tmp_path)
    ledger.append(entries[0])
    ledger.append(entries[2])
    audit = ledger.verify_all()
    assert [(f.line, f.round) for f in audit.findings] == [(2, 3)]
    assert "a round is missing from the ledger" in audit.findings[0].problem


def test_verification_catches_a_history_without_this_rounds_steps(tmp_path, entries):
    ledger = ServerLedger(tmp_path)
    ledger.append(dataclasses.replace(entries[0], noise_multiplier=2.0))
    audit = ledger.verify_all()
    assert "70 steps at noise multiplier 2.0" in audit.findings[0].problem


def test_a_refused_round_and_a_redone_round_verify(tmp_path, entries):
    # Prepare: round 2 is re-done after a server restart (the client spent twice), round 3 refused.
    accountant = ClientAccountant()
    first = round_entries("node-a", 2, accountant=accountant)
    redone = round_entries("node-a", 1, accountant=accountant, first_round=2)[0]
    epsilon = accountant.epsilon(delta=DELTA)
    refused = dataclasses.replace(
        redone, round=3, steps=0, status="budget-exhausted", epsilon_before=epsilon, epsilon_after=epsilon
    )
    ledger = ServerLedger(tmp_path)
    for entry in [*first, redone, refused]:
        ledger.append(entry)

    # Execute
    audit = ledger.verify_all()

    # Assert
    assert audit.ok, audit.summary()
    assert ledger.latest_epsilon_by_node() == {"node-a": pytest.approx(EPSILONS[2], rel=1e-12)}


def test_an_unreadable_line_is_a_finding(tmp_path, entries):
    ledger = ServerLedger(tmp_path)
    ledger.append(entries[0])
    with open(ledger.path, "a") as handle:
        handle.write(json.dumps({"format": 1, "round": 2}) + "\n")
    audit = ledger.verify_all()
    assert [(f.line, f.node) for f in audit.findings] == [(2, None)]
    assert audit.findings[0].problem.startswith("unreadable entry: The ledger entry has no 'run'")


# ---------------------------------------------------------------- report


def test_epsilon_table_lists_the_final_epsilon_per_node(entries):
    # Prepare
    other = round_entries("node-b", 1, noise=5.1171875)
    refused = dataclasses.replace(
        other[0], round=2, steps=0, status="budget-exhausted", epsilon_before=other[0].epsilon_after
    )

    # Execute
    table = epsilon_table([*entries, other[0], refused])

    # Assert
    assert table == (
        "Privacy spent per node (ε after its last round, at its δ)\n"
        "node    unit  rounds trained  epsilon  delta            status\n"
        "------  ----  --------------  -------  -----  ----------------\n"
        "node-a  user               3  14.0039  1e-05           trained\n"
        "node-b  user               1   0.9919  1e-05  budget-exhausted"
    )
    assert epsilon_table([]) == "The privacy ledger has no entries, so there is nothing to list."


def test_plot_epsilon_writes_one_png(tmp_path, entries, key):
    # Prepare: signed and plain records mixed, as entries() returns them.
    records = [sign_entry(entries[0], key), *(e.to_dict() for e in entries[1:])]
    records += [e.to_dict() for e in round_entries("node-b", 3, noise=2.0)]

    # Execute
    path = plot_epsilon(records, tmp_path / "plots" / "epsilon.png")

    # Assert
    assert path == tmp_path / "plots" / "epsilon.png"
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert matplotlib.image.imread(path).shape[:2] == (450, 700)
    assert not list((tmp_path / "plots").glob("*.tmp"))


def test_plot_epsilon_needs_entries(tmp_path):
    with pytest.raises(ValueError, match="no entries, so there is no ε to plot"):
        plot_epsilon([], tmp_path / "epsilon.png")
