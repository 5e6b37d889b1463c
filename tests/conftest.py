"""Shared pytest configuration: markers that skip with a clear reason where they cannot run."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    not_root = os.geteuid() != 0
    no_postgres = not os.environ.get("EGRESSD_TEST_POSTGRES_URL")
    for item in items:
        if not_root and item.get_closest_marker("root"):
            item.add_marker(pytest.mark.skip(reason="needs root for network namespaces (CI runs as root)"))
        if no_postgres and item.get_closest_marker("postgres"):
            item.add_marker(pytest.mark.skip(reason="set EGRESSD_TEST_POSTGRES_URL (.ci/run starts a server)"))
