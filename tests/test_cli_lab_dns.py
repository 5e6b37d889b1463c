"""Usage errors of the options this change added: each is exit 2 with a plain reason,
before anything is started."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from egressd.cli import app
from egressd.cli.pop_cmd import _dns_server

DEPLOYMENT = "benchmarks/deployment.toml"


@pytest.mark.parametrize(("option", "value"), [
    ("--dns-upstream", "resolver.example"), ("--dns-upstream", "127.0.0.1:99999"),
    ("--dns-upstream", "[2001:db8::1]x"), ("--dns-allow", "10.0.0.0/99"), ("--dns-listen", "nowhere"),
])
def test_bad_dns_options_are_usage_errors(option: str, value: str) -> None:
    result = CliRunner().invoke(app, ["pop", "-d", DEPLOYMENT, "--pop", "bench", option, value])
    assert result.exit_code == 2 and option in result.output, result.output


def test_dns_upstream_forms() -> None:
    assert [str(a) + f":{p}" for a, p in (_dns_server("192.0.2.53"), _dns_server("192.0.2.53:5353"),
                                         _dns_server("[2001:db8::53]:53"), _dns_server("2001:db8::53"))] == [
        "192.0.2.53:53", "192.0.2.53:5353", "2001:db8::53:53", "2001:db8::53:53"]


def test_lab_names_and_missing_labs_are_explained() -> None:
    bad = CliRunner().invoke(app, ["lab", "up", "--name", "Bad_Name"])
    assert bad.exit_code == 2 and "1-12 lowercase letters or digits" in bad.output
    missing = CliRunner().invoke(app, ["lab", "status", "--name", "nosuchlab"])
    expected = "is not up" if os.geteuid() == 0 else "needs root"
    assert missing.exit_code == 2 and expected in missing.output, missing.output
