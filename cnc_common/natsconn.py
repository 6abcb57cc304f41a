"""NATS authentication and TLS settings shared by the edge agent and the backend.

Both programs describe their ``[nats]`` section as a dataclass that inherits
``NatsSecurity``, so the keys, their checks and their meaning are the same in
``edge.toml`` and ``backend.toml``. ``check_security`` runs when a config is
loaded and stops start-up on a missing file or a contradiction.
``connect_options`` turns the section into keyword arguments of
``nats.connect`` / ``Client.connect``.

One authentication method at most is used per connection:

- ``user`` with ``password`` or ``password_file``;
- ``token`` or ``token_file``;
- ``nkey_seed_file``: a file holding an NKey user seed (``SU...``);
- ``creds_file``: a ``.creds`` file with a user JWT and its NKey seed
  (decentralized JWT authentication).

Any of them can be combined with TLS: ``tls_ca_file`` replaces the system
trust store for checking the server certificate, and ``tls_cert_file`` with
``tls_key_file`` present a client certificate (mutual TLS).
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from cnc_common.config import CHECK, SECRET, read_config_file, read_secret_file
from cnc_common.errors import ConfigError

#: nats-py's own inbox prefix, used when the config names none.
DEFAULT_INBOX_PREFIX = "_INBOX"

_CREDS_JWT_MARKER = "BEGIN NATS USER JWT"
_CREDS_SEED_MARKER = "BEGIN USER NKEY SEED"


def _inbox_prefix(value: str) -> str | None:
    tokens = value.split(".")
    valid = all(token and token not in ("*", ">") for token in tokens)
    if valid and not any(char.isspace() for char in value):
        return None
    return (
        "expected dot-separated subject tokens without wildcards, e.g. _INBOX.edge-m1"
    )


@dataclass(frozen=True)
class NatsSecurity:
    """Authentication and TLS keys of a ``[nats]`` section.

    Secret values are left out of ``repr()``, so that a logged config or a
    traceback cannot show them.
    """

    user: str | None = None
    password: str | None = field(default=None, repr=False, metadata={SECRET: True})
    #: File whose content (one trailing newline removed) is the password.
    password_file: str | None = None
    token: str | None = field(default=None, repr=False, metadata={SECRET: True})
    token_file: str | None = None
    #: File containing an NKey user seed. The client sends only the public key
    #: and a signature of the server's nonce.
    nkey_seed_file: str | None = None
    #: ``.creds`` file: user JWT plus NKey seed, as written by ``nsc``.
    creds_file: str | None = None
    #: PEM file of the CA certificates trusted for the server certificate.
    tls_ca_file: str | None = None
    #: PEM client certificate (chain) and its private key, for mutual TLS.
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    #: Name checked against the server certificate instead of the URL's host.
    tls_hostname: str | None = None
    #: Start TLS before the NATS protocol (server: ``tls { handshake_first: true }``).
    tls_handshake_first: bool = False
    #: Prefix of the reply subjects this client subscribes to. Per-client
    #: server permissions grant ``<inbox_prefix>.>`` to one client only.
    inbox_prefix: str = field(
        default=DEFAULT_INBOX_PREFIX, metadata={CHECK: _inbox_prefix}
    )


def uses_tls(section: NatsSecurity, url: str) -> bool:
    """Return whether the client is configured to encrypt the connection.

    NOTE: nats-py 2.16 upgrades to TLS only when the server's INFO asks for
    it, so a man in the middle that answers in plaintext receives a password
    or token in the clear. ``tls_handshake_first`` starts TLS before any
    protocol byte and closes that gap. NKey and .creds logins send only a
    signature of the server's nonce.
    """
    schemes = {urlsplit(part.strip()).scheme for part in url.split(",")}
    return bool(
        "tls" in schemes
        or "wss" in schemes
        or section.tls_ca_file
        or section.tls_cert_file
        or section.tls_handshake_first
    )


def check_security(section: NatsSecurity, url: str, source: str) -> None:
    """Check the auth and TLS keys of ``[nats]``; raise ConfigError.

    Files are opened here, so that a wrong path or mode stops start-up
    instead of failing every connection attempt later. No message contains
    a password, token or seed.
    """
    _check_url_has_no_credentials(url, source)
    _check_exclusive(section, source)
    _check_pairs(section, source)
    if section.password_file:
        read_secret_file(section.password_file, "nats.password_file", source)
    if section.token_file:
        read_secret_file(section.token_file, "nats.token_file", source)
    if section.nkey_seed_file:
        _check_seed_file(section.nkey_seed_file, source)
    if section.creds_file:
        _check_creds_file(section.creds_file, source)
    for key in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
        path = getattr(section, key)
        if path:
            read_config_file(path, f"nats.{key}", source)
    if section.tls_hostname and not uses_tls(section, url):
        raise ConfigError(
            source,
            "nats.tls_hostname",
            "TLS is not enabled; use a tls:// URL or set nats.tls_ca_file",
            section.tls_hostname,
        )
    if uses_tls(section, url):
        build_ssl_context(section, source)


def _check_url_has_no_credentials(url: str, source: str) -> None:
    for part in url.split(","):
        if "@" in urlsplit(part.strip()).netloc:
            raise ConfigError(
                source,
                "nats.url",
                "credentials in the URL are not allowed, because URLs appear "
                "in logs; use nats.user with nats.password_file, or "
                "nats.token_file",
                show_value=False,
            )


def _check_exclusive(section: NatsSecurity, source: str) -> None:
    for secret, secret_file in (("password", "password_file"), ("token", "token_file")):
        if getattr(section, secret) is not None and getattr(section, secret_file):
            raise ConfigError(
                source,
                f"nats.{secret_file}",
                f"set either nats.{secret} or nats.{secret_file}, not both",
            )
    methods = [
        name
        for name, used in (
            ("user/password", section.user is not None),
            ("token", section.token is not None or bool(section.token_file)),
            ("nkey_seed_file", bool(section.nkey_seed_file)),
            ("creds_file", bool(section.creds_file)),
        )
        if used
    ]
    if len(methods) > 1:
        raise ConfigError(
            source,
            "nats",
            "expected one authentication method, got " + " and ".join(methods),
        )


def _check_pairs(section: NatsSecurity, source: str) -> None:
    has_password = section.password is not None or bool(section.password_file)
    if section.user is not None and not has_password:
        raise ConfigError(
            source,
            "nats.password_file",
            "missing: nats.user is set, so nats.password or nats.password_file is needed",
        )
    if has_password and section.user is None:
        raise ConfigError(
            source, "nats.user", "missing: a password is set, so a user name is needed"
        )
    if section.tls_cert_file and not section.tls_key_file:
        raise ConfigError(
            source,
            "nats.tls_key_file",
            "missing: nats.tls_cert_file is set, so its private key is needed",
        )
    if section.tls_key_file and not section.tls_cert_file:
        raise ConfigError(
            source,
            "nats.tls_cert_file",
            "missing: nats.tls_key_file is set, so its certificate is needed",
        )


def _is_user_seed(seed: bytes) -> bool:
    import nkeys

    try:
        key_pair = nkeys.from_seed(bytearray(seed))
    except Exception:  # noqa: BLE001 - nkeys raises several unrelated types
        return False
    try:
        return key_pair.public_key.startswith(b"U")
    finally:
        key_pair.wipe()


def _check_seed_file(path: str, source: str) -> None:
    seed = read_config_file(path, "nats.nkey_seed_file", source).strip()
    if not _is_user_seed(seed):
        raise ConfigError(
            source,
            "nats.nkey_seed_file",
            "expected an NKey user seed (one line starting with SU)",
            path,
        )


def _check_creds_file(path: str, source: str) -> None:
    text = read_config_file(path, "nats.creds_file", source).decode("utf-8", "replace")
    lines = [line.strip() for line in text.splitlines()]
    # nats-py 2.16 searches the file for the JWT line without stopping at the
    # end of the file, so a file without it would hang the connect forever.
    jwt = _line_after(lines, _CREDS_JWT_MARKER)
    seed = _line_after(lines, _CREDS_SEED_MARKER)
    if not jwt or jwt.count(".") != 2 or not seed or not _is_user_seed(seed.encode()):
        raise ConfigError(
            source,
            "nats.creds_file",
            "expected a .creds file with a user JWT block and an NKey user seed block",
            path,
        )


def _line_after(lines: list[str], marker: str) -> str | None:
    for index, line in enumerate(lines[:-1]):
        if marker in line:
            return lines[index + 1]
    return None


def build_ssl_context(section: NatsSecurity, source: str = "config") -> ssl.SSLContext:
    """Build the client TLS context: server check against the CA, client certificate."""
    try:
        context = ssl.create_default_context(cafile=section.tls_ca_file)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            source,
            "nats.tls_ca_file",
            f"not a PEM CA certificate file ({_ssl_reason(exc)})",
            section.tls_ca_file,
        ) from None
    if section.tls_cert_file and section.tls_key_file:
        try:
            context.load_cert_chain(section.tls_cert_file, section.tls_key_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                source,
                "nats.tls_cert_file",
                "the certificate and nats.tls_key_file do not load as a PEM "
                f"pair ({_ssl_reason(exc)}); an encrypted key is not supported",
                section.tls_cert_file,
            ) from None
    return context


def _ssl_reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    if isinstance(exc, ssl.SSLError) and reason:
        return str(reason)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


def connect_options(section: NatsSecurity, url: str) -> dict[str, Any]:
    """Return the ``nats.connect`` keyword arguments for auth, TLS and inbox.

    The config must have passed ``check_security``. Password and token files
    are read here, once per call. The seed and ``.creds`` files are passed as
    paths, and nats-py reads them again each time it signs a server nonce.
    """
    options: dict[str, Any] = {"inbox_prefix": section.inbox_prefix}
    if section.user is not None:
        options["user"] = section.user
        options["password"] = section.password
        if section.password_file:
            options["password"] = read_secret_file(
                section.password_file, "nats.password_file", "config"
            )
    if section.token is not None:
        options["token"] = section.token
    if section.token_file:
        options["token"] = read_secret_file(
            section.token_file, "nats.token_file", "config"
        )
    if section.nkey_seed_file:
        options["nkeys_seed"] = section.nkey_seed_file
    if section.creds_file:
        options["user_credentials"] = section.creds_file
    if uses_tls(section, url):
        options["tls"] = build_ssl_context(section)
        options["tls_handshake_first"] = section.tls_handshake_first
        if section.tls_hostname:
            options["tls_hostname"] = section.tls_hostname
    return options


def is_rejection(exc: BaseException) -> bool:
    """Return whether retrying cannot fix ``exc``: bad credentials, permissions, TLS."""
    reason = describe_nats_error(exc)
    return reason.startswith(("authorization failed", "permission denied", "TLS"))


def describe_nats_error(exc: BaseException) -> str:
    """Return a short operator-facing reason for a failed NATS connection.

    nats-py reports a rejected login as ``Error("nats: 'Authorization
    Violation'")`` during the first connection and as AuthorizationError
    afterwards. nats-server 2.15 sends no credentials back in either.
    """
    import nats.errors

    text = str(exc).strip()
    lowered = text.lower()
    if isinstance(exc, nats.errors.AuthorizationError) or (
        "authorization violation" in lowered
    ):
        return "authorization failed: the server rejected the credentials"
    if "authentication expired" in lowered or "authentication revoked" in lowered:
        return f"authorization failed: {text.removeprefix('nats: ')}"
    if "permissions violation" in lowered:
        return f"permission denied: {text.removeprefix('nats: ')}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = getattr(exc, "verify_message", None) or _ssl_reason(exc)
        return f"TLS certificate verification failed ({detail})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({_ssl_reason(exc)})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timed out"
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__
