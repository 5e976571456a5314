"""The operators' command line and the load tool against a real `coupon serve` over TLS:
the certificate docs/clients.md's recipe makes is accepted with `--cacert` or
COUPON_CA_FILE (and SSL_CERT_FILE), and each way TLS fails is one line that says why."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from coupon_loadtest.cli import main as loadtest_main
from harness.server import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "tls-token"
pytestmark = pytest.mark.e2e
KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def docs_recipe(directory: Path) -> tuple[Path, Path]:
    """The certificate and key made by the commands docs/clients.md's TLS section gives,
    run as written in `directory`."""
    text = (ROOT / "docs/clients.md").read_text()
    section = text[text.index("\n## TLS\n") :]
    block = section[section.index("```sh\n") + 6 :]
    block = block[: block.index("```")].replace("\\\n", " ")
    commands = [line for line in block.splitlines() if line.startswith(("mkdir", "openssl"))]
    assert len(commands) == 2, block
    for line in commands:
        subprocess.run(["bash", "-c", line], cwd=directory, check=True, capture_output=True)
    return directory / "tls/cert.pem", directory / "tls/key.pem"


def private_ca(directory: Path, *, days: str = "1") -> tuple[Path, Path, Path]:
    """A CA, and the key and certificate it signs for `localhost` alone (no IP address):
    (CA certificate, server certificate, server key)."""
    openssl("req", "-x509", *KEY, "-days", "1", "-subj", "/CN=test CA",
            "-keyout", "ca-key.pem", "-out", "ca.pem", cwd=directory)  # fmt: skip
    openssl("req", *KEY, "-subj", "/CN=localhost", "-keyout", "key.pem", "-out", "leaf.csr",
            cwd=directory)  # fmt: skip
    (directory / "ext.cnf").write_text("subjectAltName=DNS:localhost\n")
    openssl("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem",
            "-days", days, "-extfile", "ext.cnf", "-out", "cert.pem", cwd=directory)  # fmt: skip
    return directory / "ca.pem", directory / "cert.pem", directory / "key.pem"


def ca_as_server(directory: Path) -> tuple[Path, Path]:
    """What `openssl req -x509` makes without basicConstraints: a CA's certificate."""
    openssl("req", "-x509", *KEY, "-days", "1", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout", "key.pem", "-out", "cert.pem", cwd=directory)  # fmt: skip
    return directory / "cert.pem", directory / "key.pem"


def serve_tls(cert: Path, key: Path, log_dir: Path) -> ServerProcess:
    proc = ServerProcess(
        env={
            "COUPON_TLS_CERT_FILE": str(cert),
            "COUPON_TLS_KEY_FILE": str(key),
            "COUPON_ADMIN_TOKEN": TOKEN,
        },
        in_memory=True,
        log_dir=log_dir,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"https://127.0.0.1:{proc.port}/readyz", verify=False).is_success:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or proc.process.poll() is not None:
            proc.stop()
            raise RuntimeError(f"the TLS server did not start:\n{proc.log()}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[str], tuple[ServerProcess, Path]]]:
    """A TLS server by the kind of its certificate, started once for the module: (server,
    the CA file that trusts it)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl makes the tests' certificates")
    started: dict[str, tuple[ServerProcess, Path]] = {}

    def get(kind: str) -> tuple[ServerProcess, Path]:
        if kind not in started:
            directory = tmp_path_factory.mktemp(kind)
            if kind == "docs":
                cert, key = docs_recipe(directory)
                ca = cert
            elif kind in ("private CA", "expired"):
                ca, cert, key = private_ca(directory, days="-1" if kind == "expired" else "1")
            else:
                cert, key = ca_as_server(directory)
                ca = cert
            started[kind] = (serve_tls(cert, key, directory), ca)
        return started[kind]

    try:
        yield get
    finally:
        for proc, _ in started.values():
            proc.stop()


def coupon(
    *args: str, env: dict[str, str] | None = None, cwd: Path
) -> subprocess.CompletedProcess[str]:
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("COUPON_", "SSL_CERT_")) and k != "PORT"
    }
    return subprocess.run(
        [sys.executable, "-m", "coupon", "campaigns", *args],
        env={**base, "COUPON_ADMIN_TOKEN": TOKEN, **(env or {})},
        cwd=cwd,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_docs_certificate_is_trusted_with_cacert_coupon_ca_file_or_ssl_cert_file(
    servers: Callable[[str], tuple[ServerProcess, Path]], tmp_path: Path
) -> None:
    proc, cert = servers("docs")
    port = proc.port
    for host in ("localhost", "127.0.0.1"):
        url = f"https://{host}:{port}"
        made = coupon("--url", url, "--cacert", str(cert), "--json", "create", "--name",
                      host, "--coupons", "5", cwd=tmp_path)  # fmt: skip
        assert made.returncode == 0, made.stderr
        assert json.loads(made.stdout)["campaign"]["name"] == host
    url = f"https://localhost:{port}"
    after = coupon("--url", url, "list", "--cacert", str(cert), cwd=tmp_path)
    assert after.returncode == 0 and "127.0.0.1" in after.stdout, after.stderr
    for variable in ("COUPON_CA_FILE", "SSL_CERT_FILE"):
        listed = coupon("--url", url, "list", env={variable: str(cert)}, cwd=tmp_path)
        assert listed.returncode == 0, (variable, listed.stderr)
        assert "localhost" in listed.stdout


def test_the_load_tool_runs_over_tls_with_the_ca_file(
    servers: Callable[[str], tuple[ServerProcess, Path]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The set-up's and the read-back's calls and the load's own connections all trust it."""
    proc, cert = servers("docs")
    monkeypatch.delenv("COUPON_CA_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    report = tmp_path / "report.json"
    common = ["--admin-token", TOKEN, "--users", "20", "--coupons", "10", "--no-chart",
              "--quiet", "--max-lag", "1000", "--report", str(report)]  # fmt: skip
    url = f"--url=https://127.0.0.1:{proc.port}"
    load = ["--rate", "200", "--start-in", "0", "--duration", "1"]
    code = loadtest_main([url, "--cacert", str(cert), *load, *common])
    err = capsys.readouterr().err
    assert code == 0, err
    outcomes = json.loads(report.read_text())["outcomes"]
    assert outcomes["ok_new"] == 10, outcomes
    # Without it, the system's CAs do not know the certificate: one line, before any load.
    report.unlink()
    code = loadtest_main([f"--url=https://localhost:{proc.port}", "--rate", "200", *common])
    err = capsys.readouterr().err
    assert code == 2
    assert err == (
        f"loadtest: cannot reach the service at https://localhost:{proc.port}: TLS: the "
        "service's certificate is not signed by a trusted CA (--cacert FILE or "
        "COUPON_CA_FILE trusts a private CA)\n"
    )
    assert not report.exists()
    # The plain scheme to a TLS port: where to change it is said.
    code = loadtest_main([f"--url=http://127.0.0.1:{proc.port}", *common])
    assert code == 2
    assert capsys.readouterr().err == (
        f"loadtest: cannot reach the service at http://127.0.0.1:{proc.port}: the port speaks "
        "TLS (use https:// in --url or COUPON_URL)\n"
    )
    assert not report.exists()
    monkeypatch.setenv("COUPON_CA_FILE", str(tmp_path / "missing.pem"))
    code = loadtest_main([f"--url=https://localhost:{proc.port}", *common])
    assert code == 2
    assert capsys.readouterr().err == (
        f"loadtest: COUPON_CA_FILE: cannot read '{tmp_path}/missing.pem': "
        "No such file or directory\n"
    )


@pytest.mark.parametrize(
    ("kind", "where", "trust", "reason"),
    [
        ("private CA", "https://localhost:{port}", False,
         "TLS: the service's certificate is not signed by a trusted CA (--cacert FILE or "
         "COUPON_CA_FILE trusts a private CA)"),
        ("private CA", "https://127.0.0.1:{port}", True,
         "TLS: the service's certificate is not valid for 127.0.0.1 (only for localhost)"),
        ("expired", "https://localhost:{port}", True,
         "TLS: the service's certificate has expired"),
        ("CA as server", "https://localhost:{port}", True,
         "TLS: the service's certificate is a CA's (CA:TRUE), which is refused as a "
         "server's: make one with CA:FALSE (docs/clients.md#tls)"),
        ("private CA", "http://127.0.0.1:{port}", True,
         "the port speaks TLS (use https:// in --url or COUPON_URL)"),
    ],
)  # fmt: skip
def test_a_tls_failure_is_one_line_that_says_why(
    servers: Callable[[str], tuple[ServerProcess, Path]],
    tmp_path: Path,
    kind: str,
    where: str,
    trust: bool,
    reason: str,
) -> None:
    proc, ca = servers(kind)
    url = where.format(port=proc.port)
    trusted = ["--cacert", str(ca)] if trust else []
    result = coupon("--url", url, *trusted, "list", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == f"coupon: cannot reach the service at {url}: {reason}\n"
    assert result.stdout == ""
    # With the CA and the right scheme and name, the same server answers.
    fine = coupon("--url", f"https://localhost:{proc.port}", "--cacert", str(ca), "list",
                  cwd=tmp_path)  # fmt: skip
    assert (fine.returncode == 0) == (kind == "private CA"), fine.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read '{path}': No such file or directory"),
        ("not a certificate\n", "must name a PEM file of CA certificates (got '{path}')"),
    ],
)
def test_a_ca_file_that_is_not_one_is_refused_before_any_call(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_text(content)
    # Port 9 (discard) would refuse: the file is checked first.
    result = coupon("--url", "https://127.0.0.1:9", "--cacert", str(path), "list", cwd=tmp_path)
    assert result.returncode == 2
    text = message.format(path=path)
    assert result.stderr == f"coupon: --cacert{':' if content is None else ''} {text}\n"
    by_variable = coupon(
        "--url", "https://127.0.0.1:9", "list", env={"COUPON_CA_FILE": str(path)}, cwd=tmp_path
    )
    assert by_variable.returncode == 2
    assert by_variable.stderr == (
        f"coupon: COUPON_CA_FILE{':' if content is None else ''} {text}\n"
    )


def test_the_docs_recipe_writes_only_into_an_ignored_folder(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl runs the recipe")
    docs_recipe(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tls"]
    ignored = subprocess.run(
        ["git", "check-ignore", "tls/cert.pem", "tls/key.pem"],
        cwd=ROOT,
        check=False,
        capture_output=True,
    )
    assert ignored.returncode == 0, ignored.stderr
    assert re.search(r"^tls$", (ROOT / ".dockerignore").read_text(), re.MULTILINE)


def test_a_ca_certificate_served_is_warned_of_at_start(
    servers: Callable[[str], tuple[ServerProcess, Path]],
) -> None:
    """Curl takes it, so the service starts; the clients that will refuse it are named."""
    warned = "COUPON_TLS_CERT_FILE is a CA's certificate (CA:TRUE)"
    lines = [
        json.loads(line)
        for line in servers("CA as server")[0].log().splitlines()
        if line.startswith("{") and warned in line
    ]
    assert len(lines) == 1, lines
    assert lines[0]["level"] == "warning"
    assert "rustls (coupon campaigns, coupon loadtest)" in lines[0]["message"]
    assert "docs/clients.md#tls" in lines[0]["message"]
    for kind in ("docs", "private CA"):
        assert warned not in servers(kind)[0].log()
