"""Certificates and keys for a secure Flower deployment: TLS for the SuperLink, one auth key pair per SuperNode.

`generate(out, ...)` writes, with the `cryptography` package that Flower already installs:

    ca.crt / ca.key                  a self-signed CA (copy ca.crt to every SuperNode and to the `flwr` machine)
    server.crt / server.key          the SuperLink's certificate, signed by the CA, for the given hosts and IPs
    supernode-<i>.key / .pub         per SuperNode an ECDSA P-384 key pair in OpenSSH format: the private key goes
                                     to device i only (`--auth-supernode-private-key`), the public key is
                                     registered on the SuperLink (`flwr supernode register`)

Private keys are written with mode 0600. `check(...)` verifies given files before any process starts, so a
missing or unreadable file is one clear error instead of an exit code from a Flower process minutes later.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# flower-superlink starts its own flower-superexec, which connects back to 127.0.0.1 (a bind-all --host is
# rewritten to loopback) through the same certificate: these names are always in it.
LOOPBACK_HOSTS = ("localhost",)
LOOPBACK_IPS = ("127.0.0.1",)
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
HINT = "run `fedfar certs --out DIR` first (or pass the folder it wrote)"


@dataclass(frozen=True)
class CertPaths:
    """Where `generate` puts each file in a folder (the same names are expected by `check` and the demo)."""

    folder: Path

    @property
    def ca_cert(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.folder / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"

    def node_key(self, i: int) -> Path:
        return self.folder / f"supernode-{i}.key"

    def node_pub(self, i: int) -> Path:
        return self.folder / f"supernode-{i}.pub"


class CertError(ValueError):
    """A certificate or key file is missing, unreadable or not what Flower expects."""


# ------------------------------------------------------------------------------------------------ generation


def _write(path: Path, data: bytes, private: bool) -> None:
    # Create private files as 0600 from the start (no window where another user can read them), and fix the mode
    # of a file that existed before with a looser one.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        if private:
            os.fchmod(f.fileno(), 0o600)
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def split_names(hosts: Sequence[str], ips: Sequence[str]) -> tuple[list[str], list[IPAddress]]:
    """(DNS names, IP addresses) for the server certificate: the given ones plus loopback, without repeats.
    An IP given as a host counts as an IP; a non-IP given as an IP is an error."""
    names: list[str] = []
    addresses: list[IPAddress] = []
    for ip in ips:
        try:
            addresses.append(ipaddress.ip_address(ip.strip()))
        except ValueError:
            raise CertError(f"--ips: {ip!r} is not an IP address (put host names in --hosts)") from None
    for host in hosts:
        host = host.strip()
        try:
            addresses.append(ipaddress.ip_address(host))
        except ValueError:
            if not host or any(c.isspace() or c in "/:" for c in host):
                raise CertError(f"--hosts: {host!r} is not a host name") from None
            names.append(host.lower())
    names += LOOPBACK_HOSTS
    addresses += [ipaddress.ip_address(ip) for ip in LOOPBACK_IPS]
    return list(dict.fromkeys(names)), list(dict.fromkeys(addresses))


def _node_key_pair() -> tuple[bytes, bytes]:
    """An ECDSA P-384 key pair as Flower 1.41 reads it: the private key in OpenSSH format (flower-supernode uses
    `load_ssh_private_key`), the public key as an OpenSSH line (`flwr supernode register` uses
    `load_ssh_public_key`)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def generate(out: str | Path, hosts: Sequence[str] = (), ips: Sequence[str] = (), supernodes: int = 2,
             days: int = 730, overwrite: bool = False) -> CertPaths:
    """Write a CA, a server certificate for `hosts` and `ips` (plus localhost and 127.0.0.1) and `supernodes`
    node key pairs into `out`. A non-empty `out` is refused unless `overwrite` (then the old files are replaced
    and stale supernode-* files removed)."""
    if supernodes < 0:
        raise CertError(f"supernodes must be >= 0, got {supernodes}")
    if days < 1:
        raise CertError(f"days must be >= 1, got {days}")
    names, addresses = split_names(hosts, ips)  # validate before writing anything
    folder = Path(out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise CertError(f"{folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{folder} is not empty: refusing to overwrite keys that may already be deployed "
                                  "(choose another folder, or pass --force to replace them)")
        for stale in folder.glob("supernode-*"):
            stale.unlink()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths = CertPaths(folder)

    now = datetime.datetime.now(datetime.timezone.utc)
    start = now - datetime.timedelta(minutes=5)  # a device whose clock is a little behind still accepts it

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedfar deployment CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start)
        .not_valid_after(now + datetime.timedelta(days=max(days, 3650)))  # outlives server certs it signs
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    san = [x509.DNSName(n) for n in names] + [x509.IPAddress(a) for a in addresses]
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)  # clients check names here, not the CN
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    _write(paths.ca_key, _pem_key(ca_key), private=True)
    _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(paths.server_key, _pem_key(server_key), private=True)
    _write(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    for i in range(supernodes):
        private, public = _node_key_pair()
        _write(paths.node_key(i), private, private=True)
        _write(paths.node_pub(i), public, private=False)
    return paths


# ------------------------------------------------------------------------------------------------ checks


def _read(path: Path, role: str, hint: str) -> bytes:
    path = Path(path).expanduser()
    if not path.exists():
        raise CertError(f"{role} {path} does not exist: {hint}")
    if not path.is_file():
        raise CertError(f"{role} {path} is not a file: {hint}")
    try:
        return path.read_bytes()
    except OSError as err:
        raise CertError(f"{role} {path} cannot be read ({err.strerror}): fix its permissions "
                        f"(e.g. `chmod 600 {path}` as its owner)") from None


def _load_cert(path: Path, role: str, hint: str) -> x509.Certificate:
    data = _read(path, role, hint)  # outside the try: CertError is a ValueError too
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise CertError(f"{role} {path} is not a PEM certificate: {hint}") from None


def check(ca_cert: Path | None = None, server_cert: Path | None = None, server_key: Path | None = None,
          node_keys: Sequence[Path] = (), node_pubs: Sequence[Path] = (), hint: str = HINT) -> None:
    """Raise CertError naming the first file that is missing, unreadable, does not parse, or does not fit: the
    server certificate must be issued by the CA and match its key; node keys must be EC keys in OpenSSH format
    (as flower-supernode and `flwr supernode register` read them). Files given as None are not checked."""
    ca = _load_cert(ca_cert, "CA certificate", hint) if ca_cert is not None else None
    if server_cert is not None:
        cert = _load_cert(server_cert, "server certificate", hint)
        if ca is not None:
            try:
                cert.verify_directly_issued_by(ca)
            except (InvalidSignature, ValueError, TypeError) as err:
                raise CertError(f"server certificate {server_cert} was not issued by the CA {ca_cert} "
                                f"({type(err).__name__}): use the ca.crt and server.crt of one `fedfar certs` "
                                "folder") from None
    if server_key is not None:
        data = _read(server_key, "server key", hint)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise CertError(f"server key {server_key} is not an unencrypted PEM private key: {hint}") from None
        if server_cert is not None and key.public_key() != cert.public_key():
            raise CertError(f"server key {server_key} does not belong to the certificate {server_cert}: use the "
                            "server.key and server.crt of one `fedfar certs` folder")
    for path in node_keys:
        data = _read(path, "SuperNode private key", hint)
        try:
            key = serialization.load_ssh_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            key = None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertError(f"SuperNode private key {path} is not an unencrypted OpenSSH EC key "
                            f"(-----BEGIN OPENSSH PRIVATE KEY-----): {hint}")
    for path in node_pubs:
        data = _read(path, "SuperNode public key", hint)
        try:
            pub = serialization.load_ssh_public_key(data)
        except (ValueError, UnsupportedAlgorithm):
            pub = None
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            raise CertError(f"SuperNode public key {path} is not an OpenSSH EC public key "
                            f"(ecdsa-sha2-nistp384 ...): {hint}")
