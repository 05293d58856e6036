"""A throw-away certificate authority and a server certificate for 127.0.0.1, made with openssl, for
tests of TLS between real processes (Redis, the inference service)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support.procs import require_binary


@dataclass(frozen=True)
class TestCertificates:
    ca_file: Path
    cert_file: Path
    key_file: Path


def make_certificates(directory: Path, common_name: str = "127.0.0.1") -> TestCertificates:
    """A CA, and a server certificate it signed for `common_name` (also its IP subject alt name)."""
    openssl = require_binary("openssl")
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_file = directory / "ca.key", directory / "ca.pem"
    key_file, csr, cert_file = directory / "server.key", directory / "server.csr", directory / "server.pem"
    ext = directory / "server.ext"
    ext.write_text(f"subjectAltName=IP:{common_name}\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca_file), "-days", "1",
        "-subj", "/CN=smallfirst test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key_file), "-out", str(csr),
        "-subj", f"/CN={common_name}")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca_file), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(cert_file), "-days", "1", "-extfile", str(ext))
    return TestCertificates(ca_file=ca_file, cert_file=cert_file, key_file=key_file)
