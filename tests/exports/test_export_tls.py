"""Issue 24, part 2: `corral export` carries tls_cert, tls_key and http_redirect where the target can.

nginx and HAProxy each run their export in front of `--supervise-only` workers and are asked over HTTPS (curl
with --cacert, the certificate made here) and on the redirect port; the systemd unit and the Kubernetes
manifests are read back.
"""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import STUB, CorralProc, corral_cli, free_ports, request
from exports.test_export import _stop, _wait_listening
from support.certs import make_pair

HAVE = {name: shutil.which(name) is not None for name in ("nginx", "haproxy", "curl", "openssl")}
pytestmark = pytest.mark.skipif(not (HAVE["openssl"] and HAVE["curl"]), reason="openssl and curl are needed")


class TLSSetup:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.front = free_ports(3)  # HTTPS, the redirect port, one worker
        self.redirect = self.front + 1
        self.worker = self.front + 2
        self.cert, self.key = make_pair(tmp, "site", "corral-export")
        self.toml = tmp / "corral.toml"
        self.toml.write_text(
            f'[server]\nhost = "127.0.0.1"\nport = {self.front}\ntls_cert = "{self.cert}"\ntls_key = "{self.key}"\n'
            f"http_redirect = {self.redirect}\n\n"
            f'[[app]]\nname = "api"\ncommand = ["{sys.executable}", "{STUB}", "{{port}}"]\nworkers = 1\n'
            f"base_port = {self.worker}\n"
        )
        self.corral: CorralProc | None = None

    def export(self, kind: str, *extra: str) -> str:
        r = corral_cli("export", kind, "-c", str(self.toml), *extra, timeout=30)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def through(self, proc: subprocess.Popen) -> None:
        """HTTPS reaches the worker, which sees X-Forwarded-Proto https; the redirect port answers a 308."""
        _wait_listening(self.front, proc)
        _wait_listening(self.redirect, proc)
        out = subprocess.run(
            ["curl", "-sS", "--cacert", str(self.cert), f"https://localhost:{self.front}/hello?x=1"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        seen = json.loads(out.stdout)
        assert seen["path"] == "/hello?x=1" and seen["headers"]["x-forwarded-proto"] == "https"
        r = request(self.redirect, b"GET /a?b=c HTTP/1.1\r\nHost: example.org:80\r\nConnection: close\r\n\r\n")
        assert r.status == 308 and r.header("location") == f"https://example.org:{self.front}/a?b=c"


@pytest.fixture(scope="module")
def tls_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSSetup]:
    s = TLSSetup(tmp_path_factory.mktemp("export-tls"))
    s.corral = CorralProc(s.tmp, ["-c", str(s.toml), "--supervise-only"], workers=None)
    yield s
    s.corral.stop()


@pytest.mark.skipif(not HAVE["nginx"], reason="nginx not installed")
def test_nginx_export_serves_https_and_redirects(tls_setup):
    conf = tls_setup.export("nginx")
    assert f"listen 127.0.0.1:{tls_setup.front} ssl;" in conf
    assert f"ssl_certificate {tls_setup.cert};" in conf and f"ssl_certificate_key {tls_setup.key};" in conf
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in conf
    root = tls_setup.tmp / "nginx"
    (root / "conf.d").mkdir(parents=True)
    (root / "conf.d" / "corral.conf").write_text(conf)
    (root / "nginx.conf").write_text(
        f"pid {root}/nginx.pid;\nerror_log {root}/error.log;\nevents {{}}\n"
        f"http {{ access_log off; client_body_temp_path {root}/body; proxy_temp_path {root}/proxy; "
        "include conf.d/*.conf; }\n"
    )
    base = ["nginx", "-p", str(root), "-c", str(root / "nginx.conf"), "-e", str(root / "error.log")]
    t = subprocess.run([*base, "-t"], capture_output=True, text=True, timeout=30)
    assert t.returncode == 0, t.stderr
    proc = subprocess.Popen([*base, "-g", "daemon off; master_process on;"], stderr=subprocess.PIPE)
    try:
        tls_setup.through(proc)
    finally:
        _stop(proc, signal.SIGQUIT)


@pytest.mark.skipif(not HAVE["haproxy"], reason="haproxy not installed")
def test_haproxy_export_serves_https_and_redirects(tls_setup):
    cfg = tls_setup.export("haproxy")
    assert f"ssl crt {tls_setup.cert} alpn http/1.1 ssl-min-ver TLSv1.2" in cfg
    assert "ONE PEM file" in cfg and "X-Forwarded-Proto https" in cfg
    # As the file says: HAProxy >= 2.2 takes the key from beside the certificate, named <crt>.key.
    shutil.copy(tls_setup.key, f"{tls_setup.cert}.key")
    path = tls_setup.tmp / "haproxy.cfg"
    path.write_text(cfg)
    t = subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert t.returncode == 0, t.stdout + t.stderr
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        tls_setup.through(proc)
    finally:
        _stop(proc, signal.SIGUSR1)


def test_systemd_unit_carries_the_tls_flags_and_the_certbot_hook(tmp_path):
    cert, key = make_pair(tmp_path, "site", "corral-export")
    r = corral_cli(
        *("export", "systemd", "--tls-cert", str(cert), "--tls-key", str(key), "--http-redirect", "8080"),
        *("--name", "api", "--", sys.executable, STUB, "{port}"),
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    fields = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line and not line.startswith("#"))
    argv = shlex.split(fields["ExecStart"])
    assert argv[argv.index("--tls-cert") + 1] == str(cert) and argv[argv.index("--tls-key") + 1] == str(key)
    assert argv[argv.index("--http-redirect") + 1] == "8080"
    assert fields["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert "certbot renew --deploy-hook 'systemctl reload corral-api'" in r.stdout


def test_kubernetes_mounts_a_tls_secret_and_points_corral_at_it(tmp_path):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    cert, key = make_pair(tmp_path, "site", "corral-export")
    toml = tmp_path / "corral.toml"
    toml.write_text(
        f'[server]\nport = 8443\ntls_cert = "{cert}"\ntls_key = "{key}"\n\n'
        f'[[app]]\nname = "api"\ncommand = ["{sys.executable}", "{STUB}", "{{port}}"]\nworkers = 1\n'
    )
    r = corral_cli("export", "kubernetes", "-c", str(toml), "--name", "api", timeout=30)
    assert r.returncode == 0, r.stderr
    docs = {d["kind"]: d for d in yaml.safe_load_all(r.stdout) if d}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["args"][-4:] == ["--tls-cert", "/etc/corral/tls/tls.crt", "--tls-key", "/etc/corral/tls/tls.key"]
    assert {"name": "tls", "mountPath": "/etc/corral/tls", "readOnly": True} in c["volumeMounts"]
    assert {"name": "tls", "secret": {"secretName": "api-tls"}} in pod["volumes"]
    assert "TLS belongs to the" in r.stdout and "kubectl create secret tls api-tls" in r.stdout
    for obj in docs.values():
        kubernetes_validate.validate(obj, "1.35", strict=True)
