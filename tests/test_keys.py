"""TLS certificates and SuperNode key pairs for a partner-site deployment (fedtower/deployment/keys.py)."""

import ipaddress
import os
import ssl
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from flwr.cli.supernode.register import try_load_public_key
from typer.testing import CliRunner

from fedtower.cli import app
from fedtower.deployment.keys import KeyFileError, create_ca, create_node_keys, create_server_certificate

runner = CliRunner()


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load_cert(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture()
def ca_dir(tmp_path):
    create_ca(tmp_path / "ca")
    return tmp_path / "ca"


def tls_handshake(cert, key, ca, server_hostname: str) -> None:
    """A real TLS 1.3 handshake in memory: server with cert/key, client trusting only `ca`."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(ca))  # verifies the chain and the host name
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, end in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("The TLS handshake did not complete.")


def test_server_certificate_chains_to_the_ca_with_the_requested_sans(ca_dir, tmp_path):
    # Execute
    cert_path, key_path = create_server_certificate(tmp_path / "server", ca_dir=ca_dir,
                                                    hosts=["127.0.0.1", "coord.example.org"])  # fmt: skip
    # Assert: signed by the CA, a CA that may sign, and a leaf for TLS servers only.
    ca, cert = load_cert(ca_dir / "ca.crt"), load_cert(cert_path)
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.SERVER_AUTH]
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert sans.get_values_for_type(x509.DNSName) == ["coord.example.org"]
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    assert (mode(key_path), mode(ca_dir / "ca.key")) == (0o600, 0o600)
    assert (mode(cert_path), mode(ca_dir / "ca.crt")) == (0o644, 0o644)
    assert mode(ca_dir) == 0o700


def test_a_tls_client_trusting_the_ca_accepts_the_listed_hosts_only(ca_dir, tmp_path):
    # Prepare
    cert, key = create_server_certificate(tmp_path / "server", ca_dir=ca_dir, hosts=["127.0.0.1", "localhost"])
    # Execute / Assert: the names the certificate lists verify; any other name fails verification.
    tls_handshake(cert, key, ca_dir / "ca.crt", "127.0.0.1")
    tls_handshake(cert, key, ca_dir / "ca.crt", "localhost")
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch|doesn't match"):
        tls_handshake(cert, key, ca_dir / "ca.crt", "10.0.0.1")
    # A client trusting another CA refuses the certificate.
    other = create_ca(tmp_path / "other-ca")[0]
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        tls_handshake(cert, key, other, "127.0.0.1")


def test_node_keys_are_p384_openssh_that_flower_accepts(tmp_path):
    # Execute
    key_path, pub_path = create_node_keys(tmp_path / "keys", site="site-a")
    # Assert: names, OpenSSH formats, the pair matches, the comment names the site.
    assert (key_path.name, pub_path.name) == ("site-a.key", "site-a.pub")
    assert key_path.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    private = serialization.load_ssh_private_key(key_path.read_bytes(), password=None)
    public = serialization.load_ssh_public_key(pub_path.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()
    algorithm, _, comment = pub_path.read_text().split()
    assert (algorithm, comment) == ("ecdsa-sha2-nistp384", "site-a")
    assert try_load_public_key(pub_path)  # Flower's own check behind `flwr supernode register`
    assert (mode(key_path), mode(pub_path), mode(tmp_path / "keys")) == (0o600, 0o644, 0o700)


def test_private_keys_stay_0600_whatever_the_umask_and_leave_no_temporary_files(tmp_path):
    # Prepare: the loosest umask there is.
    old = os.umask(0)
    try:
        # Execute
        key_path, _ = create_node_keys(tmp_path, site="site-a")
        _, ca_key = create_ca(tmp_path)
    finally:
        os.umask(old)
    # Assert
    assert (mode(key_path), mode(ca_key)) == (0o600, 0o600)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.crt", "ca.key", "site-a.key", "site-a.pub"]


def test_existing_files_are_never_overwritten_without_force(tmp_path):
    # Prepare
    key_path, pub_path = create_node_keys(tmp_path, site="site-a")
    before = key_path.read_bytes(), pub_path.read_bytes()
    # Execute / Assert: refused, naming the file and --force; nothing changed.
    with pytest.raises(FileExistsError, match=r"site-a\.key already exists.*--force"):
        create_node_keys(tmp_path, site="site-a")
    assert (key_path.read_bytes(), pub_path.read_bytes()) == before
    # With overwrite the pair is replaced, still 0600.
    create_node_keys(tmp_path, site="site-a", overwrite=True)
    assert key_path.read_bytes() != before[0] and pub_path.read_bytes() != before[1]
    assert mode(key_path) == 0o600


def test_a_refused_ca_leaves_the_old_ca_whole(ca_dir):
    # Prepare: only the certificate is missing; the key still exists.
    (ca_dir / "ca.crt").unlink()
    key_before = (ca_dir / "ca.key").read_bytes()
    # Execute / Assert: refused before anything is written (no new certificate without its key).
    with pytest.raises(FileExistsError, match=r"ca\.key"):
        create_ca(ca_dir)
    assert not (ca_dir / "ca.crt").exists()
    assert (ca_dir / "ca.key").read_bytes() == key_before


@pytest.mark.parametrize("site", ["", "-site", ".hidden", "a b", "a/b", "../etc", "s" * 65, "süd"])
def test_bad_site_names_are_refused_naming_the_value(tmp_path, site):
    with pytest.raises(ValueError, match="site name .* is not valid") as err:
        create_node_keys(tmp_path, site=site)
    assert repr(site) in str(err.value)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("host", ["", " ", "coord example.org", " 127.0.0.1", "coord/x", "a..b"])
def test_bad_hosts_are_refused_naming_the_value(ca_dir, tmp_path, host):
    with pytest.raises(ValueError, match="host") as err:
        create_server_certificate(tmp_path / "server", ca_dir=ca_dir, hosts=[host])
    assert repr(host) in str(err.value)
    assert not (tmp_path / "server").exists()


def test_a_server_certificate_needs_at_least_one_host(ca_dir, tmp_path):
    with pytest.raises(ValueError, match="at least one host"):
        create_server_certificate(tmp_path / "server", ca_dir=ca_dir, hosts=[])


def test_a_missing_or_mismatched_ca_is_a_clear_error_naming_the_file(ca_dir, tmp_path):
    # Missing
    with pytest.raises(KeyFileError, match=r"nowhere/ca\.crt does not exist"):
        create_server_certificate(tmp_path / "s", ca_dir=tmp_path / "nowhere", hosts=["127.0.0.1"])
    # Mismatched: another CA's key next to this CA's certificate.
    other = create_ca(tmp_path / "other")[1]
    (ca_dir / "ca.key").write_bytes(other.read_bytes())
    with pytest.raises(KeyFileError, match=r"ca\.key is not the private key of .*ca\.crt"):
        create_server_certificate(tmp_path / "s", ca_dir=ca_dir, hosts=["127.0.0.1"])
    # Unreadable: not PEM at all.
    (ca_dir / "ca.crt").write_text("not a certificate")
    with pytest.raises(KeyFileError, match=r"ca\.crt is not a readable PEM certificate"):
        create_server_certificate(tmp_path / "s", ca_dir=ca_dir, hosts=["127.0.0.1"])
    assert not (tmp_path / "s").exists()


def test_a_server_certificate_may_not_outlive_its_ca(tmp_path):
    create_ca(tmp_path / "ca", days=30)
    with pytest.raises(ValueError, match="outlive the CA"):
        create_server_certificate(tmp_path / "s", ca_dir=tmp_path / "ca", hosts=["127.0.0.1"], days=31)


def test_cli_writes_everything_and_says_what_to_send_to_whom(tmp_path):
    # Execute
    ca = runner.invoke(app, ["keys", "ca", "--out", str(tmp_path / "ca")])
    server = runner.invoke(app, ["keys", "server", "--ca-dir", str(tmp_path / "ca"), "--host", "127.0.0.1",
                                 "--host", "coord.example.org", "--out", str(tmp_path / "server")])  # fmt: skip
    node = runner.invoke(app, ["keys", "node", "--site", "site-a", "--out", str(tmp_path / "site")])
    # Assert
    assert (ca.exit_code, server.exit_code, node.exit_code) == (0, 0, 0), ca.output + server.output + node.output
    assert "Send only" in ca.output and "ca.crt" in ca.output
    assert "--enable-supernode-auth" in server.output and "127.0.0.1, coord.example.org" in server.output
    assert "Send " in node.output
    assert "site-a.pub" in node.output and "flwr supernode register" in node.output
    # ...and the ledger signing pair, private 0600, with the node config that uses it.
    assert "site-a.ledger.pub" in node.output and "ledger-key=" in node.output
    assert oct((tmp_path / "site" / "site-a.ledger.key").stat().st_mode & 0o777) == "0o600"
    sans = load_cert(tmp_path / "server" / "server.crt").extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value  # fmt: skip
    assert sans.get_values_for_type(x509.DNSName) == ["coord.example.org"]


def test_cli_refuses_to_overwrite_unless_forced_and_rejects_bad_names(tmp_path):
    # Prepare
    out = str(tmp_path / "site")
    assert runner.invoke(app, ["keys", "node", "--site", "site-a", "--out", out]).exit_code == 0
    before = (tmp_path / "site" / "site-a.key").read_bytes()
    # Execute
    again = runner.invoke(app, ["keys", "node", "--site", "site-a", "--out", out])
    forced = runner.invoke(app, ["keys", "node", "--site", "site-a", "--out", out, "--force"])
    bad = runner.invoke(app, ["keys", "node", "--site", "bad name", "--out", out])
    # Assert
    assert again.exit_code == 2 and "already exists" in again.output and "--force" in again.output
    assert forced.exit_code == 0 and (tmp_path / "site" / "site-a.key").read_bytes() != before
    assert bad.exit_code == 2 and "'bad name' is not valid" in bad.output
