"""What every operator command over the control plane's REST API shares: the connection
options, the HTTP client, the exit codes, and the output (rich tables or `--json`).

A command is a function `f(api: Api, ...)` registered with `api_command(group, "name")`;
the decorator adds `--control`, `--token`, `--token-file`, `--timeout` and `--json` to it.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar
from urllib.parse import quote

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    import httpx

EXIT_OK = 0
EXIT_REFUSED = 1  # the API answered 4xx: a problem document
EXIT_USAGE = 2  # bad options or arguments (typer's own code too)
EXIT_UNREACHABLE = 3  # connection refused, DNS, TLS, timeout
EXIT_SERVER = 4  # the API answered 5xx, or something that is not the API

DEFAULT_URL = "http://127.0.0.1:18070"
DEFAULT_TOKEN_FILE = Path(".egressd-control") / "admin.token"
DEFAULT_TIMEOUT = 10.0

EXIT_CODES_HELP = (
    "Exit codes: **0** ok, **1** the API refused (4xx; the problem is printed on stderr), "
    "**2** usage error, **3** cannot reach the control plane, **4** server error (5xx)."
)

CONNECTION_HELP = (
    "Connection: `--control URL` (env `EGRESSD_CONTROL_URL`, default "
    f"{DEFAULT_URL}); the token from `--token`, `--token-file`, env `EGRESSD_TOKEN`, env "
    f"`EGRESSD_TOKEN_FILE`, or {DEFAULT_TOKEN_FILE} if readable, in that order."
)

PANEL = "Connection and output"
PANEL_API = "Control plane (REST API)"
_TOKEN_RE = re.compile(r"^[\x21-\x7e]+$")  # what can go in an Authorization header


def group_help(text: str) -> str:
    return f"{text}\n\n{CONNECTION_HELP}\n\n{EXIT_CODES_HELP}"


def segment(value: str) -> str:
    """One path segment of a URL, quoted (an IPv6 prefix's '/' included)."""
    return quote(value, safe="")


def fail(message: str, code: int) -> NoReturn:
    Console(stderr=True, soft_wrap=True, highlight=False).print(
        f"egressd: {message}", markup=False)
    raise typer.Exit(code)


def usage_error(message: str) -> NoReturn:
    fail(message, EXIT_USAGE)


def write_private(path: Path, text: str) -> None:
    """Write a secret to a file only its owner can read (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(path, 0o600)


# Tokens: never printed, never put in an error message
# --------------------------------------------------------------------------------------


def _read_token_file(path: Path, *, required: bool) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        if not required:
            return None
        usage_error(f"cannot read the token file {path}: {error.strerror or error}")
    except UnicodeDecodeError:
        usage_error(f"the token file {path} is not text")
    token = text.strip()
    if not token:
        usage_error(f"the token file {path} is empty")
    return token


def resolve_token(token: str | None, token_file: Path | None) -> tuple[str | None, str]:
    """The token and where it came from (for messages): flag, file, env, default file."""
    environ_token = os.environ.get("EGRESSD_TOKEN", "").strip()
    environ_file = os.environ.get("EGRESSD_TOKEN_FILE", "").strip()
    found: tuple[str | None, str]
    if token is not None and token.strip():
        found = token.strip(), "--token"
    elif token_file is not None:
        found = _read_token_file(token_file, required=True), f"--token-file {token_file}"
    elif environ_token:
        found = environ_token, "EGRESSD_TOKEN"
    elif environ_file:
        path = Path(environ_file)
        found = _read_token_file(path, required=True), f"EGRESSD_TOKEN_FILE ({path})"
    else:
        value = _read_token_file(DEFAULT_TOKEN_FILE, required=False)
        found = (value, str(DEFAULT_TOKEN_FILE)) if value else (None, "")
    if found[0] is not None and not _TOKEN_RE.match(found[0]):
        usage_error(f"the token from {found[1]} has characters a token cannot have")
    return found


# The client
# --------------------------------------------------------------------------------------


@dataclass
class Api:
    """A connection to the control plane for one command, and where its output goes."""

    url: str
    token: str | None = None
    token_source: str = ""
    timeout: float = DEFAULT_TIMEOUT
    json_output: bool = False
    out: Console = field(default_factory=lambda: stdout_console())
    _client: httpx.Client | None = None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _http(self) -> httpx.Client:
        import httpx

        if self._client is None:
            headers = {"Accept": "application/json, application/problem+json, text/csv"}
            if self.token:
                headers["Authorization"] = f"Bearer {self.token}"
            try:
                self._client = httpx.Client(
                    base_url=self.url, headers=headers, follow_redirects=False,
                    timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 5.0)))
            except (httpx.InvalidURL, ValueError) as error:
                usage_error(f"--control {self.url!r} is not a usable URL: {error}")
        return self._client

    def send(self, method: str, path: str, *, body: Any = None,
             params: Mapping[str, Any] | None = None) -> httpx.Response:
        """One request; any failure ends the command with the documented exit code."""
        import httpx

        query = {key: value for key, value in (params or {}).items() if value is not None}
        try:
            response = self._http().request(method, path, json=body, params=query or None)
        except httpx.UnsupportedProtocol:
            usage_error(f"--control {self.url!r} is not an http:// or https:// URL")
        except httpx.InvalidURL as error:
            usage_error(f"--control {self.url!r} is not a usable URL: {error}")
        except httpx.TimeoutException:
            fail(f"cannot reach the control plane at {self.url}: no answer within "
                 f"{self.timeout:g} s ({method} {path}; a change may or may not have been "
                 "made — check before retrying)", EXIT_UNREACHABLE)
        except httpx.TransportError as error:
            reason = str(error) or type(error).__name__
            fail(f"cannot reach the control plane at {self.url}: {reason} (is `egressd "
                 "control serve` running there? set --control or EGRESSD_CONTROL_URL)",
                 EXIT_UNREACHABLE)
        if response.status_code >= 300:
            self._refused(response)
        return response

    def call(self, method: str, path: str, *, body: Any = None,
             params: Mapping[str, Any] | None = None) -> Any:
        """The decoded JSON of a 2xx answer (None for 204)."""
        response = self.send(method, path, body=body, params=params)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            fail(f"{self.url} answered {method} {path} with something that is not JSON "
                 f"({response.headers.get('content-type', 'no content type')}): is it the "
                 "egressd control plane?", EXIT_SERVER)

    def get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        return self.call("GET", path, params=params)

    def post(self, path: str, body: Any = None) -> Any:
        return self.call("POST", path, body=body)

    def patch(self, path: str, body: Any) -> Any:
        return self.call("PATCH", path, body=body)

    def put(self, path: str, body: Any) -> Any:
        return self.call("PUT", path, body=body)

    def delete(self, path: str) -> Any:
        return self.call("DELETE", path)

    def _refused(self, response: httpx.Response) -> NoReturn:
        status = response.status_code
        code = EXIT_SERVER if status >= 500 else EXIT_REFUSED
        document: Any = None
        if "json" in response.headers.get("content-type", ""):
            try:
                document = response.json()
            except ValueError:
                document = None
        if not isinstance(document, dict):
            if 300 <= status < 400:
                where = response.headers.get("location", "?")
                fail(f"the control plane at {self.url} answered {status}, a redirect to "
                     f"{where}: use that URL with --control", code)
            snippet = " ".join(response.text.split())[:200] or response.reason_phrase
            fail(f"{self.url} answered {status} {response.request.method} "
                 f"{response.request.url.path}: {snippet}", code)
        if self.json_output:
            emit_json(document)
        lines = problem_lines(document, status)
        if status == 401 and not self.token:
            lines[0] += (" — no token given: use --token, --token-file or EGRESSD_TOKEN "
                         f"(the control plane writes the first one to {DEFAULT_TOKEN_FILE})")
        elif status == 401:
            lines[0] += f" (token from {self.token_source})"
        err = Console(stderr=True, soft_wrap=True, highlight=False)
        for line in lines:
            err.print(line, markup=False)
        raise typer.Exit(code)

    # Output
    # ----------------------------------------------------------------------------------

    def show(self, data: Any, human: Callable[[Any], None]) -> None:
        """The raw API JSON with --json, else what `human` prints for people."""
        if self.json_output:
            emit_json(data)
        else:
            human(data)

    def say(self, message: str) -> None:
        """A confirmation line for people; --json prints nothing for answers without a body."""
        if not self.json_output:
            self.out.print(Text(message))


def stdout_console() -> Console:
    """Rich output for people: the terminal's width, or unwrapped lines when piped."""
    wide = sys.stdout.isatty() or "COLUMNS" in os.environ
    return Console(highlight=False, width=None if wide else 1000)


def problem_lines(document: Mapping[str, Any], status: int) -> list[str]:
    """An RFC 9457 problem as one clear line, then one line per field error."""
    title = str(document.get("title") or "Error")
    detail = str(document.get("detail") or "")
    where = [f"{key} {document[key]}" for key in ("field", "rule") if document.get(key)]
    head = f"egressd: {title} ({status})" + (f": {detail}" if detail else "")
    if where:
        head += f" [{', '.join(where)}]"
    lines = [head]
    errors = document.get("errors")
    if isinstance(errors, list):
        for item in errors:
            if not isinstance(item, Mapping):
                continue
            same = (item.get("detail") == detail and item.get("field") == document.get("field"))
            if same and len(errors) == 1:
                continue
            rule = f" (rule {item['rule']})" if item.get("rule") else ""
            lines.append(f"  - {item.get('field') or '-'}: {item.get('detail', '')}{rule}")
    return lines


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


# Tables
# --------------------------------------------------------------------------------------


def cell(value: Any) -> Text:
    """A value for a table cell; data never goes through rich markup."""
    if value is None or value == "" or value == []:
        return Text("-", style="dim")
    if isinstance(value, bool):
        return Text("on" if value else "off", style="green" if value else "dim")
    if isinstance(value, (list, tuple)):
        return Text(", ".join(str(item) for item in value))
    if isinstance(value, dict):
        return Text(json.dumps(value, ensure_ascii=False, sort_keys=True))
    text = str(value)
    if re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", text):
        return Text(text[:19].replace("T", " "))
    return Text(text)


def table(api: Api, rows: Iterable[Mapping[str, Any]], columns: Sequence[tuple[str, str]],
          *, title: str | None = None, empty: str = "nothing here") -> None:
    """rows as a table; columns are (key, heading); a key may be 'a.b' for nested values."""
    rows = list(rows)
    if not rows:
        api.out.print(Text(empty, style="dim"))
        return
    view = Table(title=title, title_justify="left", header_style="bold", pad_edge=False,
                 box=None)
    for _, heading in columns:
        view.add_column(heading, overflow="fold")
    for row in rows:
        view.add_row(*(cell(pick(row, key)) for key, _ in columns))
    api.out.print(view)


def details(api: Api, data: Mapping[str, Any], keys: Sequence[tuple[str, str]] | None = None,
            *, title: str | None = None) -> None:
    """One object as a two-column table of label and value."""
    view = Table(title=title, title_justify="left", show_header=False, box=None,
                 pad_edge=False)
    view.add_column(style="bold", no_wrap=True)
    view.add_column(overflow="fold")
    for key, label in keys or [(key, key) for key in data]:
        view.add_row(Text(label), cell(pick(data, key)))
    api.out.print(view)


def pick(row: Mapping[str, Any], key: str) -> Any:
    value: Any = row
    for part in key.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def split_values(values: Iterable[str | None] | None) -> list[str]:
    """Repeated options whose values may also be comma-separated, in order, once each."""
    items: list[str] = []
    for value in values or []:
        for item in (value or "").split(","):
            if item.strip() and item.strip() not in items:
                items.append(item.strip())
    return items


def on_off(value: str | None, option: str) -> bool | None:
    if value is None:
        return None
    lowered = value.strip().lower()
    if lowered in ("on", "true", "yes", "1"):
        return True
    if lowered in ("off", "false", "no", "0"):
        return False
    raise typer.BadParameter(f"expected on or off, not {value!r}", param_hint=option)


# The decorator that adds the connection options
# --------------------------------------------------------------------------------------

ControlOption = Annotated[str, typer.Option(
    "--control", envvar="EGRESSD_CONTROL_URL", rich_help_panel=PANEL, show_default=True,
    help="URL of the control plane's API.")]
TokenOption = Annotated[str | None, typer.Option(
    "--token", rich_help_panel=PANEL, show_default=False,
    help="API token (egd_...). Prefer `--token-file` or env `EGRESSD_TOKEN`: a flag shows in "
    "the process list.")]
TokenFileOption = Annotated[Path | None, typer.Option(
    "--token-file", rich_help_panel=PANEL, show_default=False, dir_okay=False,
    help=f"File holding the token (env `EGRESSD_TOKEN_FILE`; default {DEFAULT_TOKEN_FILE} "
    "if readable).")]
TimeoutOption = Annotated[float, typer.Option(
    "--timeout", rich_help_panel=PANEL, min=0.1, help="Seconds to wait for the API.")]
JsonOption = Annotated[bool, typer.Option(
    "--json", rich_help_panel=PANEL,
    help="Print the API's JSON for scripts (and a refusal's problem document).")]

_COMMON = (
    ("control", ControlOption, DEFAULT_URL),
    ("token", TokenOption, None),
    ("token_file", TokenFileOption, None),
    ("timeout", TimeoutOption, DEFAULT_TIMEOUT),
    ("json_output", JsonOption, False),
)

F = TypeVar("F", bound=Callable[..., None])


def api_command(group: typer.Typer, name: str, **settings: Any) -> Callable[[F], F]:
    """Register `func(api, ...)` as `group name` with the connection and output options."""

    def decorate(func: F) -> F:
        signature = inspect.signature(func, eval_str=True)
        own = [param for param in signature.parameters.values() if param.name != "api"]
        common = [inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, annotation=hint,
                                    default=default) for key, hint, default in _COMMON]

        @functools.wraps(func)
        def command(**options: Any) -> None:
            control = str(options.pop("control")).strip().rstrip("/") or DEFAULT_URL
            token, source = resolve_token(options.pop("token"), options.pop("token_file"))
            api = Api(url=control, token=token, token_source=source,
                      timeout=float(options.pop("timeout")),
                      json_output=bool(options.pop("json_output")))
            try:
                func(api, **options)
            finally:
                api.close()

        del command.__wrapped__  # typer must see the signature below, not func's
        command.__signature__ = signature.replace(parameters=own + common)  # type: ignore[attr-defined]
        command.__annotations__ = {param.name: param.annotation for param in own + common}
        settings.setdefault("epilog", EXIT_CODES_HELP)
        group.command(name, **settings)(command)
        return func

    return decorate
