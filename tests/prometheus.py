"""Helpers for tests of the HTTP endpoints: requests, parsed scrapes, promtool."""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

INSTALL_HINT = (
    "promtool is not installed; install it with "
    "'apt-get install -y prometheus' (Debian and Ubuntu), which CI does in .ci/run"
)


def request(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """Send one request; return (status, headers, body), also for error statuses."""
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), exc.read()


def scrape(url: str) -> str:
    status, _, body = request(url + "/metrics")
    assert status == 200, f"GET {url}/metrics returned {status}: {body!r}"
    return body.decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Map (sample name, label set) to value for every sample of a scrape."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def values(text: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """Return the samples called ``name`` by label set."""
    return {labels: value for (n, labels), value in samples(text).items() if n == name}


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run promtool; without it, skip on a developer's machine and fail in CI.

    A fresh machine has no promtool and the README's test command must pass
    there; CI installs it (``.ci/run``) and sets CI, so there a missing
    promtool is an error and these tests cannot be skipped unnoticed.
    """
    executable = shutil.which("promtool")
    if executable is None:
        if os.environ.get("CI"):
            pytest.fail(INSTALL_HINT)
        pytest.skip(INSTALL_HINT)
    return subprocess.run(
        [executable, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def assert_promtool_clean(text: str) -> None:
    """Fail on any problem ``promtool check metrics`` reports, lint included."""
    result = promtool("check", "metrics", stdin=text)
    problems = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, problems
    assert problems == "", problems


RULES_DIR = Path(__file__).resolve().parent.parent / "config" / "prometheus"
