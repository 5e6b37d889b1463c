"""The device's calls to the control plane: enrollment (`POST /v1/enroll`), its account
view (`GET /v1/device`, HTTP Basic with the device credential) and the geofeed. Errors
come back as `ControlError` with a plain message and whether the control plane refused
(4xx) or could not be reached."""

from __future__ import annotations

from typing import Any, Final

import httpx

from egressd.client.state import Enrollment
from egressd.protocols.geofeed import GeofeedError, GeofeedIndex

__all__ = ["ControlError", "device_view", "enroll", "geofeed"]

TIMEOUT: Final = 10.0


class ControlError(Exception):
    def __init__(self, message: str, *, refused: bool) -> None:
        super().__init__(message)
        self.refused = refused


def _problem(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"{response.status_code} {response.text[:200]}"
    if isinstance(body, dict):
        return f"{response.status_code} {body.get('detail') or body.get('title') or body}"
    return f"{response.status_code} {body}"


def _call(method: str, url: str, **kwargs: Any) -> httpx.Response:
    try:
        response = httpx.request(method, url, timeout=TIMEOUT, **kwargs)
    except httpx.HTTPError as error:
        raise ControlError(f"cannot reach the control plane at {url}: {error}",
                           refused=False) from None
    if response.status_code >= 400:
        raise ControlError(f"the control plane refused ({url}): {_problem(response)}",
                           refused=response.status_code < 500)
    return response


def enroll(control: str, token: str, device_name: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"token": token}
    if device_name:
        body["device_name"] = device_name
    answer = _call("POST", f"{control.rstrip('/')}/v1/enroll", json=body).json()
    if not isinstance(answer, dict) or "secret" not in answer:
        raise ControlError("the control plane's enrollment answer is not one", refused=False)
    return answer


def device_view(enrollment: Enrollment, control: str | None = None) -> dict[str, Any]:
    url = f"{(control or enrollment.control).rstrip('/')}/v1/device"
    answer = _call("GET", url, auth=(enrollment.device_id, enrollment.secret)).json()
    if not isinstance(answer, dict):
        raise ControlError(f"{url} did not answer with an object", refused=False)
    return answer


def geofeed(control: str) -> GeofeedIndex | None:
    """The published geofeed, or None if it cannot be had (geolocation is then the echo's)."""
    try:
        return GeofeedIndex.from_text(_call("GET", f"{control.rstrip('/')}/geofeed.csv").text)
    except (ControlError, GeofeedError):
        return None
