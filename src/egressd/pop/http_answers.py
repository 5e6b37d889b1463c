"""HTTP answers and records shared by the plain handshake, the callback forwarder and the
coroutine path: a failed flow's status (403 with its rule, 502, 504, a protocol error) and
its flow record, filled in the same way whichever path met it."""

from __future__ import annotations

import logging

from egressd.pop.flowlog import FlowRecord
from egressd.pop.identity import Identity
from egressd.pop.runtime import FlowRefused, PopRuntime, tcp_record
from egressd.pop.upstream import UpstreamError
from egressd.protocols.http1 import HttpError, RequestHead, error_response, simple_response

log = logging.getLogger("egressd.pop.http")


def log_auth_failure(runtime: PopRuntime, peer: tuple[str, int], head: RequestHead) -> None:
    """Count and log (one flow record) a request with missing or wrong credentials."""
    runtime.metrics.auth_failures.labels(runtime.code, "http").inc()
    record = runtime.new_record("tcp", peer)
    record.destination, record.port, record.outcome = head.host, head.port, "auth-failed"
    record.error = "missing proxy credentials" if head.proxy_credentials is None else (
        f"wrong credentials for device {head.proxy_credentials[0]!r}")
    runtime.finish(record)


def bad_request(runtime: PopRuntime, peer: tuple[str, int], error: HttpError) -> bytes:
    """Count and log a malformed request head; the answer (400, 413, 431...) to send."""
    runtime.metrics.protocol_errors.labels(runtime.code, "http").inc()
    log.info("bad request from %s:%s: %s", peer[0], peer[1], error.reason)
    return error_response(error)


def start_record(runtime: PopRuntime, peer: tuple[str, int], identity: Identity) -> FlowRecord:
    """The record of a TCP flow of an authenticated device (`PopRuntime.new_record`, with
    its identity, in one call: `runtime.tcp_record`)."""
    return tcp_record(runtime.code, f"{peer[0]}:{peer[1]}", identity)


def failure_response(record: FlowRecord, exc: FlowRefused | UpstreamError) -> bytes:
    """The 403 (refused by the decision, with its rule) or 502/504 answer; fills the record."""
    if isinstance(exc, FlowRefused):
        record.outcome, record.error = "refused", exc.decision.reason
        body = f"egressd: flow refused ({exc.decision.rule}): {exc.decision.reason}\n"
        return simple_response(403, "Forbidden", body.encode(),
                               headers=[("X-Egressd-Rule", exc.decision.rule)])
    record.outcome, record.error = "upstream-error", exc.reason
    reason = "Gateway Timeout" if exc.status == 504 else "Bad Gateway"
    return simple_response(exc.status, reason, f"egressd: {exc.reason}\n".encode())


def protocol_error_response(record: FlowRecord, error: HttpError) -> bytes:
    """The answer to a bad request body (400...) or a bad upstream response (502)."""
    record.outcome, record.error = "protocol-error", error.reason
    if error.status == 502:
        return simple_response(502, "Bad Gateway", f"egressd: {error.reason}\n".encode())
    return error_response(error)
