"""RFC 9457 problem documents: every error names the field and, where one applies, the rule."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from egressd.model.errors import ValidationError

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://egressd.dev/problems/"


class Problem(Exception):
    """An error the API reports as a problem document."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        field: str | None = None,
        rule: str | None = None,
        kind: str | None = None,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.field = field
        self.rule = rule
        self.kind = kind or title.lower().replace(" ", "-")
        self.errors = errors or []
        self.headers = headers or {}

    def document(self, instance: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": TYPE_BASE + self.kind,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "instance": instance,
        }
        if self.field is not None:
            body["field"] = self.field
        if self.rule is not None:
            body["rule"] = self.rule
        if self.errors:
            body["errors"] = self.errors
        return body


def not_found(what: str, key: str) -> Problem:
    return Problem(404, "Not found", f"{what} {key!r} does not exist", kind="not-found")


def conflict(detail: str, *, field: str | None = None, rule: str | None = None) -> Problem:
    return Problem(409, "Conflict", detail, field=field, rule=rule, kind="conflict")


def invalid(detail: str, *, field: str, rule: str | None = None) -> Problem:
    return Problem(422, "Invalid value", detail, field=field, rule=rule, kind="invalid")


def from_validation(error: ValidationError, *, prefix: str = "") -> Problem:
    """The model's validation issues as one problem; the first names the field and rule."""
    issues = [
        {"field": prefix + issue.path if prefix else issue.path, "detail": issue.message,
         **({"rule": issue.rule} if issue.rule else {})}
        for issue in error.issues
    ]
    first = issues[0] if issues else {"field": "", "detail": str(error)}
    return Problem(
        422,
        "Rule violated" if first.get("rule") else "Invalid configuration",
        "; ".join(str(item["detail"]) for item in issues) or str(error),
        field=str(first["field"]),
        rule=first.get("rule"),
        kind="rule-violated" if first.get("rule") else "invalid",
        errors=issues,
    )


def relocate(problem: Problem, prefix: str) -> Problem:
    """A validation problem told from the request's side: the first issue under `prefix`
    (e.g. `accounts[acme].policies[p1]`) names the field as the request does
    (`accounts[acme].policies[p1].primary` -> `primary`; the object itself -> `id`) and
    the rule, and leads the detail; `errors` keeps every issue with its full path."""
    def label(path: str) -> str:
        return path[len(prefix) + 1:] if path.startswith(prefix + ".") else path

    for issue in problem.errors:
        path = str(issue.get("field", ""))
        if path != prefix and not path.startswith(prefix + "."):
            continue
        rule = issue.get("rule")
        ordered = [issue, *(other for other in problem.errors if other is not issue)]
        return Problem(
            problem.status, "Rule violated" if rule else "Invalid configuration",
            "; ".join(f"{label(str(item.get('field', '')))}: {item['detail']}"
                      for item in ordered),
            field=label(path) if path != prefix else "id", rule=str(rule) if rule else None,
            kind="rule-violated" if rule else "invalid", errors=problem.errors)
    return problem


@contextmanager
def fields_of(prefix: str) -> Iterator[None]:
    """Relocate the validation problems raised inside to the fields of object `prefix`."""
    try:
        yield
    except Problem as problem:
        raise relocate(problem, prefix) from None


def problem_response(problem: Problem, request: Request) -> JSONResponse:
    headers = dict(problem.headers)
    if problem.status == 401 and problem.field != "token":  # not for a token in a body
        headers.setdefault("WWW-Authenticate", "Bearer")
    return JSONResponse(
        problem.document(request.url.path),
        status_code=problem.status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


def _field_of(location: Any) -> str:
    """pydantic's error location as the client's field: `allow_destinations.0`, without the
    request part ("body", "query") and without its internal union labels ("function-plain[...]")."""
    parts = [str(part) for part in location]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(part for part in parts if "[" not in part and "-or-" not in part)


def install(app: FastAPI) -> None:
    """Make every error of the app, FastAPI's own included, a problem document."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {
                "field": _field_of(error.get("loc", ())),
                "detail": str(error.get("msg", "invalid")),
            }
            for error in exc.errors()
        ]
        first = errors[0] if errors else {"field": "", "detail": "invalid request"}
        problem = Problem(
            422, "Invalid request", "; ".join(e["detail"] for e in errors) or "invalid request",
            field=first["field"], kind="invalid-request", errors=errors,
        )
        return problem_response(problem, request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        title = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code, "HTTP error")
        problem = Problem(exc.status_code, title, str(exc.detail), kind=title.lower().replace(" ", "-"))
        return problem_response(problem, request)
