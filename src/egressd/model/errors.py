"""Validation errors that name the offending field and the rule it breaks."""

from __future__ import annotations

from dataclasses import dataclass


class ModelError(Exception):
    """Base of every error raised by the model."""


@dataclass(frozen=True, slots=True)
class ValidationIssue:
    """One problem: where (a dotted path into the deployment), what, and which rule."""

    path: str
    message: str
    rule: str = ""

    def __str__(self) -> str:
        rule = f" [{self.rule}]" if self.rule else ""
        return f"{self.path}: {self.message}{rule}"


class ValidationError(ModelError):
    """All the issues found in one validation pass, so a user can fix them in one go."""

    def __init__(self, issues: list[ValidationIssue]) -> None:
        self.issues = tuple(issues)
        super().__init__("\n".join(str(issue) for issue in issues))
