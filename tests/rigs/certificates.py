"""TLS certificates for tests, from a certificate authority made on the spot.

`issue_certificates(directory)` writes, and describes in a `TestCertificates`:

- `ca_file`: the test CA's certificate, for `sslrootcert=` (no trust store knows this CA);
- `server_cert_file` / `server_key_file`: a server certificate that CA signed, valid for the
  names in `hostnames` only (so connecting by any other name is a hostname mismatch); the
  certificate file holds the chain up to and including the CA, as many servers send it;
- `other_ca_file`: a second CA that signed nothing, for "the client trusts the wrong CA".

Needs the `trustme` package (which brings `cryptography`); nothing else, no network.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOSTNAMES = ("localhost",)


class CertificatesUnavailable(RuntimeError):
    """Certificates cannot be made here (the `trustme` package is missing)."""


@dataclass(frozen=True)
class TestCertificates:
    """Paths of PEM files made by `issue_certificates`."""

    __test__ = False  # a data class, not a pytest test class

    ca_file: Path
    other_ca_file: Path
    server_cert_file: Path
    server_key_file: Path
    hostnames: tuple[str, ...]


def issue_certificates(
    directory: Path, hostnames: Sequence[str] = DEFAULT_HOSTNAMES
) -> TestCertificates:
    """Make a CA, a server certificate for `hostnames` signed by it, and an unrelated CA."""
    try:
        import trustme  # noqa: PLC0415 - only the tests that use TLS need it
    except ImportError as error:
        raise CertificatesUnavailable(f"pip install trustme ({error})") from None

    ca = trustme.CA(organization_name="todo-store test CA")
    other_ca = trustme.CA(organization_name="todo-store unrelated CA")
    server = ca.issue_cert(*hostnames)
    files = TestCertificates(
        ca_file=directory / "ca.pem",
        other_ca_file=directory / "other-ca.pem",
        server_cert_file=directory / "server.crt",
        server_key_file=directory / "server.key",
        hostnames=tuple(hostnames),
    )
    ca.cert_pem.write_to_path(str(files.ca_file))
    other_ca.cert_pem.write_to_path(str(files.other_ca_file))
    chain = b"".join(blob.bytes() for blob in server.cert_chain_pems) + ca.cert_pem.bytes()
    files.server_cert_file.write_bytes(chain)
    files.server_key_file.touch(mode=0o600)  # PostgreSQL refuses a key others can read
    server.private_key_pem.write_to_path(str(files.server_key_file))
    return files
