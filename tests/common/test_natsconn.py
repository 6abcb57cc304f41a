"""NATS auth and TLS keys: start-up checks, connect options, error descriptions."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import nats.errors
import pytest

import cnc_common.config
from cnc_common.errors import ConfigError
from cnc_common.natsconn import (
    NatsSecurity,
    check_security,
    connect_options,
    describe_nats_error,
    is_rejection,
)
from cnc_edge.config import load_config as load_edge_config
from tests.security import make_certificates, make_decentralized, new_nkey, write_secret

SECRET = "Pa55-never-shown-9f3c"
URL = "nats://127.0.0.1:4222"


def check(url: str = URL, **keys: Any) -> None:
    check_security(NatsSecurity(**keys), url, "edge.toml")


def rejected(url: str = URL, **keys: Any) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        check_security(NatsSecurity(**keys), url, "edge.toml")
    assert SECRET not in str(caught.value)
    assert "edge.toml" in str(caught.value)
    return caught.value


def test_no_auth_is_valid() -> None:
    check()


def test_password_and_password_file_rejected(tmp_path: Path) -> None:
    path = write_secret(tmp_path / "pw", SECRET)

    error = rejected(user="edge", password=SECRET, password_file=str(path))

    assert error.key == "nats.password_file"
    assert "not both" in error.reason


def test_token_and_token_file_rejected(tmp_path: Path) -> None:
    path = write_secret(tmp_path / "token", SECRET)

    error = rejected(token=SECRET, token_file=str(path))

    assert error.key == "nats.token_file"


def test_user_without_password_rejected() -> None:
    error = rejected(user="edge")

    assert error.key == "nats.password_file"
    assert "missing" in error.reason


def test_password_without_user_rejected() -> None:
    error = rejected(password=SECRET)

    assert error.key == "nats.user"


def test_two_auth_methods_rejected(tmp_path: Path) -> None:
    seed = write_secret(tmp_path / "seed", new_nkey().seed)

    error = rejected(token=SECRET, nkey_seed_file=str(seed))

    assert error.key == "nats"
    assert "token and nkey_seed_file" in error.reason


@pytest.mark.parametrize(
    "key", ["password_file", "token_file", "nkey_seed_file", "creds_file"]
)
def test_missing_secret_file_rejected(tmp_path: Path, key: str) -> None:
    keys: dict[str, Any] = {key: str(tmp_path / "absent")}
    if key == "password_file":
        keys["user"] = "edge"

    error = rejected(**keys)

    assert error.key == f"nats.{key}"
    assert error.reason == "file not found"
    assert str(tmp_path / "absent") in str(error)


@pytest.mark.parametrize("key", ["tls_ca_file", "tls_cert_file", "tls_key_file"])
def test_missing_tls_file_rejected(tmp_path: Path, key: str) -> None:
    certs = make_certificates(tmp_path / "certs")
    keys = {
        "tls_ca_file": str(certs.ca),
        "tls_cert_file": str(certs.client_cert),
        "tls_key_file": str(certs.client_key),
        key: str(tmp_path / "absent.pem"),
    }

    error = rejected(**keys)

    assert error.key == f"nats.{key}"
    assert error.reason == "file not found"


def test_directory_as_file_rejected(tmp_path: Path) -> None:
    error = rejected(token_file=str(tmp_path))

    assert error.key == "nats.token_file"
    assert "regular file" in error.reason


def test_unreadable_file_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_secret(tmp_path / "token", SECRET)

    # The tests run as root, which reads any file, so the open is made to fail
    # the way it fails for an unprivileged user.
    def denied(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cnc_common.config, "open", denied, raising=False)

    error = rejected(token_file=str(path))

    assert error.key == "nats.token_file"
    assert "permission denied" in error.reason


def test_empty_password_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    path.write_text("\n")

    error = rejected(user="edge", password_file=str(path))

    assert error.reason == "file is empty"


def test_seed_file_with_garbage_rejected(tmp_path: Path) -> None:
    path = write_secret(tmp_path / "seed", SECRET)

    error = rejected(nkey_seed_file=str(path))

    assert error.key == "nats.nkey_seed_file"
    assert "user seed" in error.reason


def test_account_seed_is_not_a_user_seed(tmp_path: Path) -> None:
    import nkeys

    path = write_secret(tmp_path / "seed", new_nkey(nkeys.PREFIX_BYTE_ACCOUNT).seed)

    error = rejected(nkey_seed_file=str(path))

    assert error.key == "nats.nkey_seed_file"


def test_creds_file_without_jwt_rejected(tmp_path: Path) -> None:
    # nats-py would search such a file for its JWT line forever.
    path = write_secret(tmp_path / "user.creds", f"just a secret {SECRET}")

    error = rejected(creds_file=str(path))

    assert error.key == "nats.creds_file"


def test_valid_creds_file_accepted(tmp_path: Path) -> None:
    path = write_secret(tmp_path / "user.creds", make_decentralized().creds())

    check(creds_file=str(path))


def test_cert_without_key_rejected(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path)

    error = rejected(tls_cert_file=str(certs.client_cert))

    assert error.key == "nats.tls_key_file"
    assert "missing" in error.reason


def test_key_without_cert_rejected(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path)

    error = rejected(tls_key_file=str(certs.client_key))

    assert error.key == "nats.tls_cert_file"


def test_mismatched_cert_and_key_rejected(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path)

    error = rejected(
        tls_cert_file=str(certs.client_cert), tls_key_file=str(certs.server_key)
    )

    assert error.key == "nats.tls_cert_file"
    assert "PEM pair" in error.reason


def test_ca_file_that_is_not_pem_rejected(tmp_path: Path) -> None:
    path = tmp_path / "ca.pem"
    path.write_text("not a certificate\n")

    error = rejected(tls_ca_file=str(path))

    assert error.key == "nats.tls_ca_file"


def test_tls_hostname_without_tls_rejected() -> None:
    error = rejected(tls_hostname="nats.cnc.test")

    assert error.key == "nats.tls_hostname"


def test_credentials_in_url_rejected_without_echo() -> None:
    error = rejected(url=f"nats://edge:{SECRET}@127.0.0.1:4222")

    assert error.key == "nats.url"


@pytest.mark.parametrize("prefix", ["", "_INBOX.>", "_INBOX..x", "a b"])
def test_invalid_inbox_prefix_rejected(tmp_path: Path, prefix: str) -> None:
    path = tmp_path / "edge.toml"
    path.write_text(
        '[machine]\nid = "m1"\n[serial]\nurl = "loop://"\n'
        f'[journal]\ndata_dir = "{tmp_path}"\n[nats]\ninbox_prefix = "{prefix}"\n'
    )

    with pytest.raises(ConfigError) as caught:
        load_edge_config(path)

    assert caught.value.key == "nats.inbox_prefix"


def test_password_file_option_strips_one_newline(tmp_path: Path) -> None:
    path = write_secret(tmp_path / "pw", SECRET)

    options = connect_options(NatsSecurity(user="edge", password_file=str(path)), URL)

    assert options["user"] == "edge"
    assert options["password"] == SECRET
    assert "tls" not in options


def test_token_file_option(tmp_path: Path) -> None:
    path = write_secret(tmp_path / "token", SECRET)

    options = connect_options(NatsSecurity(token_file=str(path)), URL)

    assert options["token"] == SECRET


def test_seed_and_creds_passed_as_paths(tmp_path: Path) -> None:
    seed = write_secret(tmp_path / "seed", new_nkey().seed)
    creds = write_secret(tmp_path / "u.creds", make_decentralized().creds())

    by_seed = connect_options(NatsSecurity(nkey_seed_file=str(seed)), URL)
    by_creds = connect_options(NatsSecurity(creds_file=str(creds)), URL)

    assert by_seed["nkeys_seed"] == str(seed)
    assert by_creds["user_credentials"] == str(creds)


def test_tls_options_carry_context_and_hostname(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path)
    section = NatsSecurity(
        tls_ca_file=str(certs.ca),
        tls_cert_file=str(certs.client_cert),
        tls_key_file=str(certs.client_key),
        tls_hostname="nats.cnc.test",
        inbox_prefix="_INBOX.edge-m1",
    )

    options = connect_options(section, URL)

    assert isinstance(options["tls"], ssl.SSLContext)
    assert options["tls"].verify_mode == ssl.CERT_REQUIRED
    assert options["tls_hostname"] == "nats.cnc.test"
    assert options["tls_handshake_first"] is False
    assert options["inbox_prefix"] == "_INBOX.edge-m1"


def test_tls_url_scheme_enables_tls() -> None:
    options = connect_options(NatsSecurity(), "tls://127.0.0.1:4222")

    assert isinstance(options["tls"], ssl.SSLContext)


def test_secret_not_in_repr() -> None:
    section = NatsSecurity(user="edge", password=SECRET)

    assert SECRET not in repr(section)


def test_env_override_sets_password_file(tmp_path: Path) -> None:
    secret = write_secret(tmp_path / "pw", SECRET)
    path = tmp_path / "edge.toml"
    path.write_text(
        '[machine]\nid = "m1"\n[serial]\nurl = "loop://"\n'
        f'[journal]\ndata_dir = "{tmp_path}"\n[nats]\nuser = "edge"\n'
    )

    config = load_edge_config(
        path, environ={"CNC_EDGE_NATS_PASSWORD_FILE": str(secret)}
    )

    assert connect_options(config.nats, config.nats.url)["password"] == SECRET


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (nats.errors.Error("nats: 'Authorization Violation'"), "authorization failed"),
        (nats.errors.AuthorizationError(), "authorization failed"),
        (
            nats.errors.Error("nats: 'Permissions Violation for Publish to \"x\"'"),
            "permission denied",
        ),
        (ssl.SSLCertVerificationError(1, "certificate verify failed"), "TLS"),
        (ConnectionRefusedError(111, "refused"), "connection refused"),
    ],
    ids=["auth-initial", "auth-later", "permissions", "tls", "refused"],
)
def test_describe_nats_error(error: BaseException, expected: str) -> None:
    assert describe_nats_error(error).startswith(expected)


def test_refused_connection_is_not_a_rejection() -> None:
    assert not is_rejection(ConnectionRefusedError(111, "refused"))
    assert is_rejection(nats.errors.Error("nats: 'Authorization Violation'"))
