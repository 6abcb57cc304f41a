"""The Prometheus files under config/prometheus, checked with promtool.

promtool must be installed (Debian: ``apt-get install -y prometheus``). The
tests fail with that command when it is missing, because CI installs it.
"""

from __future__ import annotations

import re
import subprocess

from tests.prometheus import RULES_DIR, promtool


def _output(result: subprocess.CompletedProcess[str]) -> str:
    return (result.stdout + result.stderr).strip()


def test_alert_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(RULES_DIR / "tests.yml"))
    assert result.returncode == 0, _output(result)
    assert "SUCCESS" in result.stdout


def test_alert_rules_are_valid() -> None:
    result = promtool("check", "rules", str(RULES_DIR / "alerts.yml"))
    assert result.returncode == 0, _output(result)


def test_scrape_config_is_valid() -> None:
    result = promtool("check", "config", str(RULES_DIR / "prometheus.yml"))
    assert result.returncode == 0, _output(result)


def test_every_alert_tested_firing_and_not() -> None:
    alerts = re.findall(
        r"^\s*- alert: (\w+)$", (RULES_DIR / "alerts.yml").read_text(), re.M
    )
    tests = (RULES_DIR / "tests.yml").read_text()
    # An eval step is "alertname: X" followed by "exp_alerts: []" (must not
    # fire) or by "exp_alerts:" and a list (must fire).
    steps = re.findall(r"alertname: (\w+)\n\s+exp_alerts:( \[\])?", tests)
    quiet = {name for name, empty in steps if empty}
    firing = {name for name, empty in steps if not empty}
    assert len(alerts) >= 12
    assert sorted(set(alerts) - firing) == [], "alerts without a firing case"
    assert sorted(set(alerts) - quiet) == [], "alerts without a not-firing case"
    assert sorted((firing | quiet) - set(alerts)) == [], "tests of unknown alerts"
