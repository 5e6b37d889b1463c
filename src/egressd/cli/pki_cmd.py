"""`egressd pki`: the deployment's private CA, and the PoP and device certificates it issues
(backbone mTLS between PoPs, device links)."""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

if TYPE_CHECKING:  # cryptography is loaded by the commands, not at CLI start-up
    from egressd.pki import CaFiles

pki = typer.Typer(
    help="The deployment CA and its certificates: `init` makes the CA (once), `pop` a PoP's "
    "backbone certificate (server and client: PoPs authenticate each other), `device` a "
    "device's client certificate, `show` what a certificate says. Private keys are written "
    "with mode 0600 and never printed.",
    no_args_is_help=True,
)

Dir = Annotated[Path, typer.Option("--dir", help="The PKI directory (CA and issued files).")]


def register(app: typer.Typer) -> None:
    app.add_typer(pki, name="pki")


@pki.command("init")
def init(
    directory: Dir = Path("pki"),
    name: Annotated[str, typer.Option("--name", help="The CA's common name.")] = "egressd CA",
) -> None:
    """Create the CA (ca.crt, ca.key) in DIR; an existing one is kept as it is."""
    from egressd.pki import PkiError, ensure_ca

    existed = (directory / "ca.crt").exists()
    try:
        ca = ensure_ca(_private_dir(directory), name)
    except PkiError as error:
        _fail(str(error))
    typer.echo(f"{'kept' if existed else 'created'} the CA {ca.cert_path} (key {ca.key_path}, 0600)")


@pki.command("pop")
def pop(
    code: Annotated[str, typer.Argument(help="The PoP's code, e.g. lax (its certificate's name).")],
    directory: Dir = Path("pki"),
    dns: Annotated[list[str], typer.Option("--dns", help="DNS name the PoP is reached by. Repeatable.")] = [],  # noqa: B006
    ip: Annotated[list[str], typer.Option("--ip", help="Address the PoP is reached by (its backbone address). Repeatable.")] = [],  # noqa: B006
) -> None:
    """Issue (or keep, while valid) pop-CODE.crt/.key, good for both ends of a backbone link."""
    from egressd.pki import PkiError, ensure_server_cert

    ca = _ca(directory)
    try:
        files = ensure_server_cert(directory, f"pop-{code}", dns or [code], ip, ca, client=True)
    except (PkiError, ValueError) as error:
        _fail(str(error))
    typer.echo(f"{files.cert_path} (key {files.key_path}, 0600), issued by {ca.cert_path}")


@pki.command("device")
def device(
    device_id: Annotated[str, typer.Argument(help="The device id (its certificate's name).")],
    directory: Dir = Path("pki"),
    days: Annotated[int, typer.Option("--days", min=1, max=3650)] = 365,
) -> None:
    """Issue device-ID.crt/.key: a client certificate a device presents to its PoP."""
    from egressd.pki import issue_certificate

    ca = _ca(directory)
    ca_key, ca_cert = ca.read()
    try:
        key_pem, cert_pem = issue_certificate(ca_key, ca_cert, device_id, client=True,
                                              server=False, days=days)
    except ValueError as error:
        _fail(str(error))
    cert_path = directory / f"device-{device_id}.crt"
    key_path = directory / f"device-{device_id}.key"
    _write(key_path, key_pem, 0o600)
    _write(cert_path, cert_pem, 0o644)
    typer.echo(f"{cert_path} (key {key_path}, 0600), issued by {ca.cert_path}")


@pki.command("show")
def show(certificate: Annotated[Path, typer.Argument(exists=True, dir_okay=False)]) -> None:
    """Subject, issuer, names, usages and validity of a certificate (PEM)."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    try:
        cert = x509.load_pem_x509_certificate(certificate.read_bytes())
    except ValueError as error:
        _fail(f"{certificate}: not a PEM certificate ({error})")
    names: list[str] = []
    usages: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(value) for value in san.get_values_for_type(x509.DNSName)]
        names += [str(value) for value in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        pass
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        known = {ExtendedKeyUsageOID.SERVER_AUTH: "server", ExtendedKeyUsageOID.CLIENT_AUTH: "client"}
        usages = [known.get(oid, oid.dotted_string) for oid in eku]
    except x509.ExtensionNotFound:
        usages = ["CA" if _is_ca(cert) else "-"]
    now = datetime.datetime.now(datetime.UTC)
    left = (cert.not_valid_after_utc - now).days
    typer.echo(f"subject:  {cert.subject.rfc4514_string()}")
    typer.echo(f"issuer:   {cert.issuer.rfc4514_string()}")
    typer.echo(f"names:    {', '.join(names) or '-'}")
    typer.echo(f"usage:    {', '.join(usages)}")
    state = f"{left} days left" if left >= 0 else "EXPIRED"
    typer.echo(f"valid:    {cert.not_valid_before_utc:%Y-%m-%d} to "
               f"{cert.not_valid_after_utc:%Y-%m-%d} ({state})")


def _is_ca(cert: object) -> bool:
    from cryptography import x509

    assert isinstance(cert, x509.Certificate)
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _ca(directory: Path) -> CaFiles:
    from egressd.pki import CaFiles

    ca: CaFiles = CaFiles(cert_path=directory / "ca.crt", key_path=directory / "ca.key")
    if not ca.cert_path.exists() or not ca.key_path.exists():
        _fail(f"no CA in {directory}: run `egressd pki init --dir {directory}` first")
    return ca


def _private_dir(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    return directory


def _write(path: Path, data: bytes, mode: int) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)


def _fail(message: str) -> NoReturn:
    typer.echo(f"egressd pki: {message}", err=True)
    raise typer.Exit(1)
