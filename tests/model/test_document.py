"""`load_document`: the JSON deployment document a PoP receives from the control plane.

It is the deployment file's schema read by the same reader, so a file and its JSON
rendering give the same snapshot and the same issues (without line numbers).
"""

from __future__ import annotations

import copy
import ipaddress
import json
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from egressd.model import Snapshot
from egressd.model.deployment import DeploymentError, load_deployment, load_document

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "seed.toml"
SEED = EXAMPLE.read_text(encoding="utf-8")
NOW = datetime(2030, 1, 1, tzinfo=UTC)
QUARANTINE_TOML = (
    '\n[[quarantine]]\naddress = "198.51.100.60"\nreleased_by = "initech"\n'
    "until = 2030-02-01T00:00:00Z\n"
)


def as_json(value: Any) -> Any:
    """What the control plane sends: the TOML document with date-times as ISO-8601 strings,
    through a real JSON round trip."""

    def plain(item: Any) -> Any:
        if isinstance(item, datetime):
            return item.isoformat()
        if isinstance(item, dict):
            return {key: plain(inner) for key, inner in item.items()}
        if isinstance(item, list):
            return [plain(inner) for inner in item]
        return item

    return json.loads(json.dumps(plain(value)))


def seed_document() -> dict[str, Any]:
    return as_json(tomllib.loads(SEED))  # type: ignore[no-any-return]


def same_snapshot(left: Snapshot, right: Snapshot) -> None:
    assert left.version == right.version
    assert left.data_centers == right.data_centers
    assert {key: entry.account for key, entry in left.accounts.items()} == {
        key: entry.account for key, entry in right.accounts.items()
    }
    assert {key: entry.dedicated_active for key, entry in left.accounts.items()} == {
        key: entry.dedicated_active for key, entry in right.accounts.items()
    }
    assert left.devices == right.devices
    assert left.origins == right.origins
    assert left.routes == right.routes
    assert left.quarantine == right.quarantine
    assert left.settings == right.settings


def test_the_json_rendering_of_the_example_gives_the_same_snapshot() -> None:
    from_file = load_deployment(SEED, version=7, now=NOW)
    from_json = load_document(seed_document(), version=7, now=NOW)
    same_snapshot(from_json, from_file)
    assert from_json.version == 7


def test_quarantine_until_as_an_iso_string() -> None:
    later = datetime(2030, 2, 1, tzinfo=UTC)
    text = SEED + QUARANTINE_TOML.replace("198.51.100.60", "198.51.100.61")
    document = as_json(tomllib.loads(text))
    assert document["quarantine"][0]["until"] == "2030-02-01T00:00:00+00:00"
    from_json = load_document(document, version=1, now=later)
    same_snapshot(from_json, load_deployment(text, now=later))
    entry = from_json.quarantine[0]
    assert entry.address == ipaddress.ip_address("198.51.100.61")
    assert entry.until == later
    # "Z" and a naive local time (taken as UTC) are accepted as well.
    for until in ("2030-02-01T00:00:00Z", "2030-02-01T00:00:00"):
        document["quarantine"][0]["until"] = until
        assert load_document(document, version=1, now=later).quarantine[0].until == later


def test_a_quarantine_string_that_is_not_a_date_time_is_an_issue() -> None:
    document = seed_document()
    document["quarantine"] = [
        {"address": "198.51.100.61", "released_by": "initech", "until": "tomorrow"},
        {"address": "198.51.100.62", "released_by": "initech", "until": 5},
    ]
    with pytest.raises(DeploymentError) as excinfo:
        load_document(document, version=1, now=NOW)
    paths = [issue.path for issue in excinfo.value.issues]
    assert "quarantine[198.51.100.61].until" in paths
    assert "quarantine[198.51.100.62].until" in paths
    assert "'tomorrow'" in str(excinfo.value)


def test_issues_are_the_files_issues_without_lines() -> None:
    text = SEED.replace('proxy_udp = true', 'proxy_udp = "yes"', 1)
    assert text != SEED
    document = as_json(tomllib.loads(text))
    document["accounts"][0]["bogus"] = 1
    with pytest.raises(DeploymentError) as excinfo:
        load_document(document, version=3, now=NOW)
    error = excinfo.value
    assert all(item.line is None for item in error.located)
    assert len(error.located) == len(error.issues) >= 2
    rendered = str(error)
    assert "unknown key 'bogus'" in rendered
    assert "proxy_udp: expected bool, got str" in rendered
    assert "line " not in rendered
    # The same issue, in the file, is located by line.
    with pytest.raises(DeploymentError) as from_file:
        load_deployment(text, now=NOW)
    assert all(item.line is not None for item in from_file.value.located)


def test_rule_errors_are_reported_for_a_document_too() -> None:
    document = seed_document()
    acme = next(account for account in document["accounts"] if account["id"] == "acme")
    acme["plan"] = "free"  # dedicated locations on a free account break R2
    with pytest.raises(DeploymentError) as excinfo:
        load_document(document, version=1, now=NOW)
    assert any(issue.rule == "R2" for issue in excinfo.value.issues)


@pytest.mark.parametrize("document", [[], "text", None, 5])
def test_a_document_that_is_not_an_object(document: Any) -> None:
    with pytest.raises(DeploymentError) as excinfo:
        load_document(document, version=1)
    assert excinfo.value.issues[0].path == "(document)"
    assert excinfo.value.located[0].line is None


def test_wrong_shapes_are_issues_not_exceptions() -> None:
    for mutate in (
        lambda d: d.update(accounts={"acme": {}}),
        lambda d: d.update(data_centers=[1, 2]),
        lambda d: d.update(deployment=[]),
        lambda d: d["accounts"][0].update(devices="none"),
        lambda d: d["accounts"][0]["policies"][0].update(ports={"443": True}),
        lambda d: d["data_centers"][0].update(latitude="north"),
        lambda d: d["data_centers"][0].update(slot=True),
    ):
        document = seed_document()
        mutate(document)
        with pytest.raises(DeploymentError):
            load_document(document, version=1, now=NOW)


def test_tuples_and_integer_coordinates_are_accepted() -> None:
    """A Python producer may build the document with tuples; JSON may drop a `.0`."""
    document = seed_document()
    original = copy.deepcopy(document)
    document["data_centers"] = tuple(document["data_centers"])
    document["data_centers"][0]["latitude"] = 36
    document["data_centers"][0]["shared_ipv4"] = tuple(document["data_centers"][0]["shared_ipv4"])
    snapshot = load_document(document, version=1, now=NOW)
    assert snapshot.data_centers["las"].latitude == 36.0
    assert load_document(original, version=1, now=NOW).data_centers["las"].latitude == 36.17


def test_load_document_does_not_modify_its_input() -> None:
    document = seed_document()
    before = copy.deepcopy(document)
    load_document(document, version=1, now=NOW)
    assert document == before
