"""`egressd tunnel create|token|list|show|delete` against a real control plane (the
fixtures of test_cli.py): the token is printed once, by the command that made it, and
never again; --json; exit codes for a refusal."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from egressd.cli import app
from egressd.protocols.tunnel import connector_of

from .test_cli import Control, control, world

__all__ = ["control", "world"]  # the fixtures, re-used


def test_tunnel_commands(world: Control) -> None:
    c = world
    created = c.runner.invoke(app, ["tunnel", "create", "acme", "office-1"], env=c.env())
    assert created.exit_code == 0, created.output
    token = created.stdout.strip().splitlines()[-1]
    assert connector_of(token) == "office-1"
    c.check_secrets(created.stdout + created.stderr, allowed=token)
    rows = c.json("tunnel", "list", "acme")
    assert [(row["id"], row["status"]) for row in rows] == [("office-1", "disconnected")]
    stdout, _ = c.run("tunnel", "list", "acme")
    assert "office-1" in stdout and "disconnected" in stdout
    shown = c.json("tunnel", "show", "acme", "office-1")
    assert shown["attached"] == [] and "token" not in shown
    # A new token: printed once; the old one is no longer accepted (see the e2e tests).
    result = CliRunner().invoke(app, ["tunnel", "token", "acme", "office-1", "--json"], env=c.env())
    assert result.exit_code == 0, result.output
    new = json.loads(result.stdout)["token"]
    assert new != token
    c.check_secrets(result.stdout, allowed=new)
    # Refusals exit 1 with the problem: a duplicate id, an unknown connector.
    _, stderr = c.run("tunnel", "create", "globex", "office-1", code=1)
    assert "already exists" in stderr
    c.run("tunnel", "show", "acme", "nope", code=1)
    stdout, _ = c.run("tunnel", "delete", "acme", "office-1")
    assert "deleted connector office-1 of acme" in stdout
    assert c.json("tunnel", "list", "acme") == []
    # `tunnel run` without a token, or with something that is not one: usage errors (2).
    c.run("tunnel", "run", "--pop", "127.0.0.1:1", "--ca", __file__, code=2)
    c.run("tunnel", "run", "--pop", "127.0.0.1:1", "--ca", __file__, "--token", "nope",
          code=2)
