"""The HTTP endpoints listen on loopback unless the config sets another address."""

from __future__ import annotations

from pathlib import Path

from cnc_backend.config import BackendConfig
from cnc_backend.config import load_config as load_backend_config
from cnc_edge.config import MetricsSection
from cnc_edge.config import load_config as load_edge_config

CONFIG = Path(__file__).resolve().parents[2] / "config"


def test_edge_default_listen_is_loopback() -> None:
    assert MetricsSection().listen.startswith("127.0.0.1:")
    assert load_edge_config(CONFIG / "edge.toml").metrics.listen.startswith(
        "127.0.0.1:"
    )


def test_backend_default_listen_is_loopback() -> None:
    assert BackendConfig().metrics.listen.startswith("127.0.0.1:")
    assert load_backend_config(CONFIG / "backend.toml").metrics.listen.startswith(
        "127.0.0.1:"
    )
