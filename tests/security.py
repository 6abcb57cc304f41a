"""Credentials for the security tests: certificates, NKeys, JWTs and server configs.

Everything is generated per test, so no key or certificate lives in the
repository. NATS JWTs are built here from the nkeys package because the
``nsc`` tool is not available: a JWT is ``header.claims.signature`` in
unpadded base64url, signed with the issuer's Ed25519 NKey
(``alg: ed25519-nkey``), as nats-io/jwt v2 encodes it.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cnc_common.embedded import NatsServer

# Certificates ---------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    """PEM files of a test CA, a server certificate and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    #: A CA that signed nothing here, for "unknown CA" cases.
    other_ca: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    # libpq refuses a client key that others can read.
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _self_signed_ca(common_name: str) -> tuple[x509.Certificate, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    ca: x509.Certificate,
    ca_key: Any,
    common_name: str,
    usage: x509.ObjectIdentifier,
    names: list[x509.GeneralName],
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(x509.ExtendedKeyUsage([usage]), False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
    return builder.sign(ca_key, hashes.SHA256()), key


def make_certificates(directory: Path, client_name: str = "writer") -> Certificates:
    """Write a CA, a server certificate for 127.0.0.1/localhost and a client one.

    ``client_name`` is the client certificate's common name, which PostgreSQL
    compares with the user name under ``clientcert=verify-full``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _self_signed_ca("cnc-monitor test CA")
    other, _ = _self_signed_ca("unrelated CA")
    server, server_key = _leaf(
        ca,
        ca_key,
        "localhost",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [
            x509.DNSName("localhost"),
            x509.DNSName("nats.cnc.test"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ],
    )
    client, client_key = _leaf(
        ca, ca_key, client_name, ExtendedKeyUsageOID.CLIENT_AUTH, []
    )
    certs = Certificates(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        other_ca=directory / "other-ca.pem",
    )
    _write_cert(certs.ca, ca)
    _write_cert(certs.other_ca, other)
    _write_cert(certs.server_cert, server)
    _write_key(certs.server_key, server_key)
    _write_cert(certs.client_cert, client)
    _write_key(certs.client_key, client_key)
    return certs


# NKeys and JWTs -------------------------------------------------------


@dataclass(frozen=True)
class NKey:
    seed: str
    public: str

    def sign(self, data: bytes) -> bytes:
        key_pair = nkeys.from_seed(bytearray(self.seed.encode()))
        try:
            return key_pair.sign(data)
        finally:
            key_pair.wipe()


def new_nkey(prefix: int = nkeys.PREFIX_BYTE_USER) -> NKey:
    """Return a fresh NKey of the given kind (user, account, operator)."""
    seed = nkeys.encode_seed(os.urandom(32), prefix)
    key_pair = nkeys.from_seed(bytearray(seed))
    try:
        return NKey(seed.decode(), key_pair.public_key.decode())
    finally:
        key_pair.wipe()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def encode_jwt(issuer: NKey, subject: str, name: str, nats: dict[str, Any]) -> str:
    """Sign a NATS v2 JWT; ``jti`` is the base32 SHA-512/256 of the claims without it."""
    claims: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": issuer.public,
        "name": name,
        "sub": subject,
    }
    compact = json.dumps(claims, separators=(",", ":")).encode()
    digest = hashlib.new("sha512_256", compact).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    claims["nats"] = {**nats, "version": 2}
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims).encode())
    signature = _b64(issuer.sign(f"{header}.{body}".encode()))
    return f"{header}.{body}.{signature}"


@dataclass(frozen=True)
class Decentralized:
    """An operator and one account with JetStream, whose users log in with .creds."""

    operator_jwt: str
    account: NKey
    account_jwt: str
    #: nats-server needs a system account before JetStream starts in operator mode.
    system_public: str
    system_jwt: str

    def creds(
        self, user: NKey | None = None, permissions: dict[str, Any] | None = None
    ) -> str:
        """Return a user's ``.creds`` file text in the layout nsc writes.

        ``permissions`` are user JWT claims such as ``{"pub": {"allow": [...]}}``.
        """
        user = user or new_nkey()
        claims = {"type": "user", "subs": -1, "data": -1, "payload": -1}
        jwt = encode_jwt(
            self.account, user.public, "cnc-user", {**claims, **(permissions or {})}
        )
        return (
            "-----BEGIN NATS USER JWT-----\n"
            f"{jwt}\n"
            "------END NATS USER JWT------\n\n"
            "************************* IMPORTANT *************************\n"
            "NKEY Seed printed below can be used to sign and prove identity.\n\n"
            "-----BEGIN USER NKEY SEED-----\n"
            f"{user.seed}\n"
            "------END USER NKEY SEED------\n"
        )

    def server_config(self) -> str:
        return (
            f'operator: "{self.operator_jwt}"\n'
            f"system_account: {self.system_public}\n"
            "resolver: MEMORY\n"
            "resolver_preload: {\n"
            f'  {self.account.public}: "{self.account_jwt}"\n'
            f'  {self.system_public}: "{self.system_jwt}"\n'
            "}\n"
        )


def make_decentralized() -> Decentralized:
    """Return a fresh operator, a JetStream account and a system account."""
    operator = new_nkey(nkeys.PREFIX_BYTE_OPERATOR)
    account = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
    system = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
    operator_jwt = encode_jwt(
        operator, operator.public, "cnc-test-operator", {"type": "operator"}
    )
    unlimited = {
        "subs": -1,
        "data": -1,
        "payload": -1,
        "imports": -1,
        "exports": -1,
        "wildcards": True,
        "conn": -1,
        "leaf": -1,
        # JetStream is enabled for an account by non-zero storage limits.
        "mem_storage": -1,
        "disk_storage": -1,
        "streams": -1,
        "consumer": -1,
    }
    account_jwt = encode_jwt(
        operator, account.public, "CNC", {"type": "account", "limits": unlimited}
    )
    system_jwt = encode_jwt(operator, system.public, "SYS", {"type": "account"})
    return Decentralized(operator_jwt, account, account_jwt, system.public, system_jwt)


# Servers --------------------------------------------------------------


def start_nats(directory: Path, config: str) -> NatsServer:
    """Start a nats-server with JetStream on a free port and ``config`` as its file."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "server.conf"
    path.write_text(config)
    return NatsServer(directory / "store", extra_args=["-c", str(path)]).start()


def tls_block(certs: Certificates, verify: bool = False) -> str:
    return (
        "tls {\n"
        f'  cert_file: "{certs.server_cert}"\n'
        f'  key_file: "{certs.server_key}"\n'
        f'  ca_file: "{certs.ca}"\n'
        f"  verify: {'true' if verify else 'false'}\n"
        "}\n"
    )


def write_secret(path: Path, value: str) -> Path:
    """Write a secret file readable by its owner only, with a trailing newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path
