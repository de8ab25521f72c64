"""Keys for a Flower deployment with TLS and SuperNode authentication.

The coordinator creates a CA and a server certificate for the SuperLink; each
site creates an EC key pair in OpenSSH format (Flower 1.41 rejects Ed25519) and
sends only the public half to the coordinator, who registers it with
`flwr supernode register`. Private keys are created with mode 0600 and never
exist on disk with wider permissions, not even briefly.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import secrets
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
CURVE = ec.SECP384R1  # NIST P-384, as `ssh-keygen -t ecdsa -b 384` in Flower's docs
_SITE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DNS = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?")
_CLOCK_SKEW = dt.timedelta(minutes=5)  # valid a little before "now", for peers whose clocks lag


class KeyFileError(ValueError):
    """A key or certificate file is missing, unreadable, or does not fit."""


def validate_site(site: str) -> str:
    if not isinstance(site, str) or not _SITE.fullmatch(site):
        raise ValueError(
            f"The site name {site!r} is not valid: use 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit."
        )
    return site


def validate_host(host: str) -> x509.GeneralName:
    """The SAN entry for `host`: an IP address when it parses as one, a DNS name otherwise."""
    if not isinstance(host, str) or not host.strip() or host != host.strip() or " " in host:
        raise ValueError(f"The host {host!r} is not valid: give an IP address or a DNS name without spaces.")
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if len(host) > 253 or not _DNS.fullmatch(host):
        raise ValueError(
            f"The host {host!r} is neither an IP address nor a DNS name (letters, digits, '-' and '.')."
        )
    return x509.DNSName(host.rstrip("."))


def _check_days(days: int) -> None:
    if not isinstance(days, int) or days < 1:
        raise ValueError(f"The validity must be a whole number of days of at least 1, not {days!r}.")


def _prepare(out_dir: Path, names: Sequence[str], overwrite: bool) -> list[Path]:
    """Create out_dir (0700) if missing; refuse before writing anything if a target exists."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise KeyFileError(f"{out_dir} exists and is not a directory.")
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths = [out_dir / name for name in names]
    if not overwrite:
        for path in paths:
            if path.exists() or path.is_symlink():
                raise FileExistsError(
                    f"{path} already exists and was left as it is. Pass --force (overwrite=True) to "
                    "replace it; anything that used the old key or certificate must then be updated."
                )
    return paths


def _write(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    """Write via a temporary file created with `mode`, then move it in: never partial, never wider."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)  # the umask may only narrow `mode`; make it exact
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if the file appeared since _prepare checked: never clobbered
    except FileExistsError:
        raise FileExistsError(f"{path} already exists and was left as it is. Pass --force (overwrite=True) "
                              "to replace it.") from None
    finally:
        tmp.unlink(missing_ok=True)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # fmt: skip


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def create_ca(
    out_dir: Path, *, name: str = "fedtower CA", days: int = 3650, overwrite: bool = False
) -> tuple[Path, Path]:
    """A self-signed CA: `ca.crt` (send to every site) and `ca.key` (0600, stays with the coordinator)."""
    _check_days(days)
    if not name or not name.strip():
        raise ValueError("The CA name must not be empty.")
    cert_path, key_path = _prepare(out_dir, [CA_CERT, CA_KEY], overwrite)
    key = ec.generate_private_key(CURVE())
    now = dt.datetime.now(dt.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False),
                       critical=True)  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write(key_path, _pem_key(key), 0o600, overwrite)  # key first: a certificate without its key is useless
    _write(cert_path, _pem_cert(cert), 0o644, overwrite)
    return cert_path, key_path


def load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Read `ca.crt` and `ca.key` from ca_dir and check that they belong together."""
    cert_path, key_path = Path(ca_dir) / CA_CERT, Path(ca_dir) / CA_KEY
    for path in (cert_path, key_path):
        if not path.is_file():
            raise KeyFileError(f"{path} does not exist: create the CA first with `fedtower keys ca --out {ca_dir}`.")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as err:
        raise KeyFileError(f"{cert_path} is not a readable PEM certificate ({err}).") from None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise KeyFileError(f"{key_path} is not a readable, unencrypted PEM private key ({err}).") from None
    if key.public_key().public_numbers() != cert.public_key().public_numbers():
        raise KeyFileError(f"{key_path} is not the private key of {cert_path}: they do not belong together.")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise KeyFileError(f"{cert_path} is not a CA certificate (no basicConstraints CA:TRUE).")
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"{key_path} is not an EC key; create the CA with `fedtower keys ca`.")
    return cert, key


def create_server_certificate(
    out_dir: Path, *, ca_dir: Path, hosts: Sequence[str], days: int = 825, overwrite: bool = False
) -> tuple[Path, Path]:
    """`server.crt` and `server.key` (0600) for the SuperLink, signed by ca_dir's CA.

    Every host becomes a subject alternative name: sites must dial the
    SuperLink by one of them, or TLS verification fails.
    """
    _check_days(days)
    if isinstance(hosts, str):
        hosts = [hosts]
    if not hosts:
        raise ValueError("Give at least one host (IP address or DNS name) the sites will dial the SuperLink by.")
    sans = list(dict.fromkeys(validate_host(host) for host in hosts))
    ca_cert, ca_key = load_ca(ca_dir)
    now = dt.datetime.now(dt.UTC)
    not_after = now + dt.timedelta(days=days)
    if not_after > ca_cert.not_valid_after_utc:
        raise ValueError(
            f"The server certificate would outlive the CA in {Path(ca_dir) / CA_CERT} "
            f"(valid until {ca_cert.not_valid_after_utc:%Y-%m-%d}); pass fewer --days or create a new CA."
        )
    cert_path, key_path = _prepare(out_dir, [SERVER_CERT, SERVER_KEY], overwrite)
    key = ec.generate_private_key(CURVE())
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False),
                       critical=True)  # fmt: skip
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write(key_path, _pem_key(key), 0o600, overwrite)
    _write(cert_path, _pem_cert(cert), 0o644, overwrite)
    return cert_path, key_path


def create_ledger_keys(out_dir: Path, *, site: str, overwrite: bool = False) -> tuple[Path, Path]:
    """`<site>.ledger.key` (0600, PKCS#8 PEM) and `<site>.ledger.pub` (PEM): the Ed25519 pair that signs
    the site's privacy ledger (node config `ledger-key`); the .pub goes to the coordinator and auditors."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    validate_site(site)
    key_path, pub_path = _prepare(out_dir, [f"{site}.ledger.key", f"{site}.ledger.pub"], overwrite)
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())  # fmt: skip
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    _write(key_path, private, 0o600, overwrite)
    _write(pub_path, public, 0o644, overwrite)
    return key_path, pub_path


def create_node_keys(out_dir: Path, *, site: str, overwrite: bool = False) -> tuple[Path, Path]:
    """`<site>.key` (0600, OpenSSH private format) and `<site>.pub` (OpenSSH line, comment = site).

    The site keeps the private key for `flower-supernode --auth-supernode-private-key`
    and sends only the .pub to the coordinator.
    """
    validate_site(site)
    key_path, pub_path = _prepare(out_dir, [f"{site}.key", f"{site}.pub"], overwrite)
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())  # fmt: skip
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(key_path, private, 0o600, overwrite)
    _write(pub_path, public + b" " + site.encode() + b"\n", 0o644, overwrite)
    return key_path, pub_path
