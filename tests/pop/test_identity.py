"""Device authentication (`pop/identity.py`): the constant-time check, and the memo of
accepted credentials that spares a reconnecting device the hash."""

from __future__ import annotations

from pathlib import Path

from egressd.model.deployment import load_deployment
from egressd.model.snapshot import Snapshot
from egressd.pop.identity import CredentialMemo, Identity, authenticate, hash_secret

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "deployment.toml"


def snapshot(secret: str = "bench-secret") -> Snapshot:
    text = BENCH.read_text().replace(hash_secret("bench-secret"), hash_secret(secret))
    return load_deployment(text)


def test_authenticate_checks_device_and_secret() -> None:
    current = snapshot()
    assert authenticate(current, ("bench", "bench-secret")) == Identity("bench", "bench", "bench")
    assert authenticate(current, ("bench", "wrong")) is None
    assert authenticate(current, ("nobody", "bench-secret")) is None
    assert authenticate(current, None) is None


def test_the_memo_answers_as_authenticate_and_forgets_with_a_new_snapshot() -> None:
    memo, first = CredentialMemo(), snapshot()
    identity = memo.authenticate(first, ("bench", "bench-secret"))
    assert identity == Identity("bench", "bench", "bench")
    assert memo.authenticate(first, ("bench", "bench-secret")) is identity  # remembered
    assert memo.authenticate(first, ("bench", "wrong")) is None  # refusals are never kept
    assert memo.authenticate(first, ("bench", "wrong")) is None
    rotated = snapshot("new-secret")  # the secret was rotated: the old one must stop working
    assert memo.authenticate(rotated, ("bench", "bench-secret")) is None
    assert memo.authenticate(rotated, ("bench", "new-secret")) == identity


def test_the_memo_is_bounded() -> None:
    devices = "".join(f'\n  [[accounts.devices]]\n  id = "d{i}"\n  user = "bench"\n'
                      f'  secret_sha256 = "{hash_secret(f"s{i}")}"\n' for i in range(5))
    current = load_deployment(BENCH.read_text() + devices)
    memo = CredentialMemo(size=2)
    for i in range(5):
        assert memo.authenticate(current, (f"d{i}", f"s{i}")) == Identity("bench", "bench", f"d{i}")
        assert len(memo._known) <= 2
