"""Issue 15: `corral export kubernetes`: the manifests validate against the Kubernetes schemas
(kubernetes-validate, offline), the probes point at the health listener, the grace period covers the
drain, resources follow the worker count; and the pod's own command, probes and preStop hook, run here
as the kubelet would run them."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from conftest import ROOT, STUB, corral_cli, free_ports, get, read_response
from hypothesis import given, settings
from hypothesis import strategies as st
from kubernetes_validate.utils import all_versions

from corral.exports import kubernetes as kube
from corral.exports.yaml_emitter import Commented, Note, to_yaml

# The Kubernetes minor versions in support when this was written (each is supported about 14 months);
# kubernetes-validate ships their schemas, so nothing is fetched.
KUBE_VERSIONS = ("1.35", "1.36", "1.37")
EXAMPLE = ROOT / "examples" / "plumber" / "corral.toml"
PY = sys.executable


def export(toml: Path, *extra: str) -> str:
    r = corral_cli("export", "kubernetes", "-c", str(toml), *extra, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout


def objects(text: str) -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(text) if d]
    out = {d["kind"]: d for d in docs}
    assert len(out) == len(docs)
    return out


def container(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (c,) = objs["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def stub_toml(tmp: Path, body: str = "", server: str = "", name: str = "corral.toml") -> Path:
    toml = tmp / name
    toml.write_text(
        f'[server]\nport = 8000\n{server}\n[[app]]\nname = "api"\ncommand = ["{PY}", "{STUB}", "{{port}}"]\n{body}\n'
    )
    return toml


# --- schemas ---------------------------------------------------------------------------------------
@pytest.mark.unit
def test_the_chosen_kubernetes_versions_are_shipped_by_kubernetes_validate():
    shipped = {".".join(v.split(".")[:2]) for v in all_versions()}
    assert set(KUBE_VERSIONS) <= shipped, sorted(shipped)


@pytest.mark.parametrize("hpa", [False, True])
def test_exported_manifests_validate_against_the_kubernetes_schemas(hpa):
    text = export(EXAMPLE, "--image", "registry.example/corral-example:1.0", *(["--hpa"] if hpa else []))
    objs = objects(text)
    want = {"ConfigMap", "Deployment", "Service"} | ({"HorizontalPodAutoscaler"} if hpa else set())
    assert set(objs) == want
    for version in KUBE_VERSIONS:
        for obj in objs.values():
            # strict: a field the schema does not know (a typo, a field of another version) fails too
            assert kubernetes_validate.validate(obj, version, strict=True) == version


def test_strict_validation_is_not_vacuous():
    deployment = objects(export(EXAMPLE))["Deployment"]
    container(objects(export(EXAMPLE)))  # well formed as exported
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSIONS[-1], strict=True)
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "46"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSIONS[-1], strict=True)


def test_the_commented_queue_wait_metric_validates_once_uncommented():
    text = export(EXAMPLE, "--hpa")
    hpa_text = text.split("---\n")[-1]
    lines = hpa_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "# - type: Pods")
    pad = lines[start].index("#")
    end = start + 1
    while end < len(lines) and lines[end].startswith(" " * pad + "#   "):
        end += 1
    for i in range(start, end):
        lines[i] = lines[i][:pad] + lines[i][pad + 2 :]  # "# " removed in place
    hpa = yaml.safe_load("\n".join(lines))
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Resource", "Pods"]
    assert hpa["spec"]["metrics"][1] == kube.queue_wait_metric()
    assert hpa["spec"]["metrics"][1]["pods"]["metric"]["name"] == "corral_queue_wait_seconds_mean"
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(hpa, version, strict=True)
    assert "corral_queue_wait_seconds_sum" in hpa_text and "prometheus-adapter" in hpa_text


# --- what the objects say --------------------------------------------------------------------------
def test_probes_point_at_the_health_listener_and_the_service_at_the_public_port():
    objs = objects(export(EXAMPLE, "--hpa"))
    c = container(objs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000, "health": 9000}  # the ports corral.toml names
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "health"}
    args = c["args"]
    assert c["command"] == ["corral"] and args[:3] == ["run", "-c", "/app/corral.toml"]
    assert args[args.index("--health-listen") + 1] == "0.0.0.0:9000"  # the pod's address, not loopback
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert "--shutdown-delay" not in args  # corral.toml has one (5 s)
    pod = objs["Deployment"]["spec"]["template"]
    assert objs["Deployment"]["spec"]["selector"]["matchLabels"] == pod["metadata"]["labels"]
    assert objs["Service"]["spec"]["selector"] == pod["metadata"]["labels"]
    (sport,) = objs["Service"]["spec"]["ports"]
    assert sport["targetPort"] == "http" and sport["port"] == 80
    (vol,) = pod["spec"]["volumes"]
    assert vol["configMap"]["name"] == objs["ConfigMap"]["metadata"]["name"]
    (mount,) = c["volumeMounts"]
    assert mount["mountPath"] == "/app/corral.toml" and mount["subPath"] == "corral.toml"
    assert objs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == objs["Deployment"]["metadata"]["name"]
    assert "replicas" not in objs["Deployment"]["spec"]  # with --hpa the autoscaler owns the count
    assert objects(export(EXAMPLE))["Deployment"]["spec"]["replicas"] == 2
    hook = c["lifecycle"]["preStop"]
    assert list(hook) == ["exec"] and hook["exec"]["command"][:3] == ["corral", "stop", "--no-wait"]
    assert not any(part in ("sh", "/bin/sh", "bash", "-c") for part in hook["exec"]["command"])  # no shell


def test_a_health_port_is_chosen_clear_of_every_port_corral_uses(tmp_path):
    toml = stub_toml(tmp_path, "workers = 4\nbase_port = 8998\n")  # workers 8998-9001, replacements to 9005
    c = container(objects(export(toml)))
    health = {p["name"]: p["containerPort"] for p in c["ports"]}["health"]
    assert health == 9006
    assert c["args"][c["args"].index("--health-listen") + 1] == "0.0.0.0:9006"
    assert c["args"][c["args"].index("--shutdown-delay") + 1] == "5"  # a pod needs one; corral.toml has none


def test_grace_period_covers_the_delay_the_drain_and_the_kill(tmp_path):
    toml = tmp_path / "corral.toml"
    cmd = f'command = ["{PY}", "{STUB}", "{{port}}"]'
    toml.write_text(
        f"[server]\nshutdown_delay = 7.5\n"
        f"[[app]]\nname='a'\nroute='/a'\n{cmd}\nworkers=1\ngraceful_timeout=60\nkill_timeout=1\n"
        f"[[app]]\nname='b'\nroute='/b'\n{cmd}\nworkers=2\ngraceful_timeout=1\nkill_timeout=20\n"
    )
    spec = objects(export(toml))["Deployment"]["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] >= 7.5 + 60 + 20 + 1  # the longest drain, then the longest kill
    toml.write_text(f"[[app]]\nname='a'\n{cmd}\nworkers=1\n")
    spec = objects(export(toml))["Deployment"]["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] >= 5 + 30 + 5 + 1  # the pod's default delay counts too


def test_resources_follow_the_worker_count(tmp_path):
    def resources(body: str) -> dict[str, Any]:
        return container(objects(export(stub_toml(tmp_path, body))))["resources"]

    def cpu(q: str) -> int:
        return int(q[:-1]) if q.endswith("m") else int(float(q) * 1000)

    def mi(q: str) -> int:
        return int(q.removesuffix("Mi"))

    two, six = resources("workers = 2"), resources("workers = 6")
    assert cpu(six["requests"]["cpu"]) - cpu(two["requests"]["cpu"]) == 4000  # a core per worker
    assert cpu(six["limits"]["cpu"]) - cpu(two["limits"]["cpu"]) == 4000
    assert mi(six["requests"]["memory"]) > mi(two["requests"]["memory"])
    capped = resources("workers = 2\nmax_memory = 400")
    assert mi(capped["limits"]["memory"]) < mi(two["limits"]["memory"])
    assert mi(capped["limits"]["memory"]) >= 2 * 400 * 1.25  # room above max_memory: corral recycles first
    scaled = resources("min_workers = 1\nmax_workers = 4")
    assert cpu(scaled["requests"]["cpu"]) == kube.CORRAL_CPU_REQUEST_M + 1000  # requests: the least
    assert cpu(scaled["limits"]["cpu"]) == kube.CORRAL_CPU_LIMIT_M + 4000  # limits: the most
    for r in (two, six, capped, scaled):
        assert cpu(r["requests"]["cpu"]) <= cpu(r["limits"]["cpu"])
        assert mi(r["requests"]["memory"]) <= mi(r["limits"]["memory"])


def test_export_refuses_what_would_follow_the_nodes_cpus_and_bad_names(tmp_path):
    def refused(toml: Path, *extra: str) -> str:
        r = corral_cli("export", "kubernetes", "-c", str(toml), *extra, timeout=30)
        assert r.returncode == 2 and not r.stdout, r.stdout + r.stderr
        return r.stderr

    assert "workers: set it for Kubernetes" in refused(stub_toml(tmp_path, ""))
    assert "max_workers: set it for Kubernetes" in refused(stub_toml(tmp_path, "min_workers = 2"))
    assert "--name" in refused(stub_toml(tmp_path, "workers = 1"), "--name", "Not_A_Name")
    assert "health_listen: must be HOST:PORT" in refused(stub_toml(tmp_path, "workers = 1", 'health_listen = "x"'))
    ok = objects(export(stub_toml(tmp_path, "workers = 1", name="My API.toml")))
    assert ok["Deployment"]["metadata"]["name"] == "my-api"


def test_admin_channel_for_prometheus_gets_a_port_a_secret_and_the_hook_uses_loopback(tmp_path):
    toml = stub_toml(tmp_path, "workers = 1", 'admin = "0.0.0.0:9180"')
    objs = objects(export(toml, "--name", "api"))
    c = container(objs)
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["admin"] == 9180
    (token,) = [e for e in c["env"] if e["name"] == "CORRAL_ADMIN_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"] == {"name": "api-admin", "key": "token"}
    assert c["lifecycle"]["preStop"]["exec"]["command"][-2:] == ["--admin", "127.0.0.1:9180"]
    for version in KUBE_VERSIONS:
        for obj in objs.values():
            kubernetes_validate.validate(obj, version, strict=True)


def test_configmap_carries_corral_toml_as_written(tmp_path):
    toml = stub_toml(tmp_path, "workers = 1")
    text = (
        "  # an indented first line (YAML needs an indentation indicator)\n"
        + toml.read_text()
        + "# unicode: d\u00e9j\u00e0 vu \u2014 \u2713\n\t# a tab\n   \n# trailing blank lines\n\n\n"
    )
    toml.write_text(text)
    objs = objects(export(toml))
    assert objs["ConfigMap"]["data"]["corral.toml"] == text
    annotations = objs["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["corral/config-sha256"] == hashlib.sha256(text.encode()).hexdigest()


# --- the YAML emitter -------------------------------------------------------------------------------
TRICKY = ["yes", "No", "on", "null", "~", "", "0755", "1e3", "-c", "- x", ": x", "#x", "a: b", "0x1F", ".inf",
          "@at", "`tick", "'q'", '"dq"', "multi\nline\n", "trail ", " lead", "tab\there", "{x}", "[1]", "*a", "&a",
          "!tag", "%p", "|", ">", "?", "1_000", "+1", "2026-11-30", "1:30", "   \nx\n", " \n", "\n", "\n\n  x\n",
          "x\n \n", "a\n\n\n", "\tx\n", "x\u2028y\n", "\x85\n", "\ufeffx\n", "\x7f\n"]  # fmt: skip

keys = st.one_of(st.sampled_from(TRICKY), st.text(min_size=1, max_size=12))
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**12), 10**12), st.sampled_from(TRICKY), st.text(max_size=30)
)
trees = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=20,
)


@pytest.mark.unit
@settings(max_examples=300, deadline=None)
@given(st.dictionaries(keys, trees, min_size=1, max_size=5))
def test_yaml_emitter_round_trips_through_a_yaml_parser(obj):
    text = "\n".join(to_yaml(obj)) + "\n"
    assert yaml.safe_load(text) == obj, text


@pytest.mark.unit
def test_yaml_emitter_comments_are_comments():
    obj = {Note("a note"): None, "a": [Note("in a list"), 1, Commented({"b": 2, "c": [3]})]}
    text = "\n".join(to_yaml(obj)) + "\n"
    assert yaml.safe_load(text) == {"a": [1]}
    assert "# a note" in text and "  # - b: 2" in text


# --- the Dockerfile ---------------------------------------------------------------------------------
@pytest.mark.unit
def test_dockerfile_runs_corral_as_the_entrypoint_as_the_pods_user():
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith(("#", " "))]
    entry = next(line for line in instructions if line.startswith("ENTRYPOINT "))
    assert json.loads(entry.removeprefix("ENTRYPOINT ")) == ["corral"]  # exec form: no shell in between
    assert f"USER {kube.RUN_AS}:{kube.RUN_AS}" in instructions
    assert f"WORKDIR {kube.APP_DIR}" in instructions
    cmd = json.loads(next(line for line in instructions if line.startswith("CMD ")).removeprefix("CMD "))
    assert cmd[:3] == ["run", "-c", f"{kube.APP_DIR}/corral.toml"]
    for line in instructions:  # what it copies from this repository exists
        m = re.match(r"COPY --from=corral (.+) (\S+)$", line)
        if m:
            for src in m.group(1).split():
                assert (ROOT / src).exists(), src
    assert "r-cran-plumber" in text


# --- the pod, run here as the kubelet runs it --------------------------------------------------------
def _as_pod(objs: dict[str, dict[str, Any]], app_dir: Path) -> tuple[list[str], list[str]]:
    """The container's command + args and its preStop command, with /app moved to app_dir and `corral`
    meaning this checkout's."""
    app_dir.mkdir(exist_ok=True)
    (app_dir / "corral.toml").write_text(objs["ConfigMap"]["data"]["corral.toml"])
    c = container(objs)

    def local(argv: list[str]) -> list[str]:
        argv = [a.replace(kube.APP_DIR, str(app_dir)) for a in argv]
        return [PY, "-m", "corral", *argv[1:]] if argv[0] == "corral" else argv

    return local(c["command"] + c["args"]), local(c["lifecycle"]["preStop"]["exec"]["command"])


def _probe(port: int, path: str) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 10.0.0.9:{port}\r\nUser-Agent: kube-probe/1.37\r\n\r\n".encode())
        return read_response(s).status


def test_the_pod_serves_probes_where_declared_and_its_prestop_and_sigterm_stop_it_within_the_grace(tmp_path):
    block = free_ports(8)
    worker = f"trap '' TERM; exec {PY} {STUB} \"$0\""  # ignores SIGTERM: the kill must come in time too
    toml = tmp_path / "corral.toml"
    toml.write_text(
        f'[server]\nport = {block}\nhealth_listen = "127.0.0.1:{block + 1}"\nshutdown_delay = 1.5\n'
        f"[[app]]\nname = 'api'\ncommand = ['sh', '-c', {json.dumps(worker)}, '{{port}}']\nworkers = 2\n"
        f"base_port = {block + 2}\ngraceful_timeout = 2\nkill_timeout = 1\n"
    )
    objs = objects(export(toml))
    c = container(objs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    grace = objs["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    run, prestop = _as_pod(objs, tmp_path / "app")
    out = tmp_path / "pod.log"
    with open(out, "wb") as f:
        pod = subprocess.Popen(run, stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path / "app")
    try:
        live, ready = c["livenessProbe"]["httpGet"], c["readinessProbe"]["httpGet"]
        deadline = time.monotonic() + 30
        while True:  # the kubelet's probes, at the ports and paths the Deployment names
            try:
                if _probe(ports[ready["port"]], ready["path"]) == 200:
                    break
            except OSError:
                pass
            assert pod.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.1)
        assert _probe(ports[live["port"]], live["path"]) == 200
        assert get(ports["http"], "/x").status == 200
        held = socket.create_connection(("127.0.0.1", ports["http"]), timeout=30)
        held.sendall(b"GET /hang HTTP/1.1\r\nHost: t\r\n\r\n")  # outlives the drain: the worst case
        time.sleep(0.3)
        t0 = time.monotonic()
        hook = subprocess.run(prestop, capture_output=True, text=True, timeout=30)  # the pod is deleted
        assert hook.returncode == 0, hook.stdout + hook.stderr
        assert _probe(ports[ready["port"]], ready["path"]) == 503  # out of the Service's endpoints
        assert get(ports["http"], "/x").status == 200  # yet serving what still arrives
        pod.send_signal(signal.SIGTERM)  # the kubelet's SIGTERM right after the hook: no hurry
        assert get(ports["http"], "/x").status == 200
        try:
            code = pod.wait(grace)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after terminationGracePeriodSeconds={grace}") from None
        took = time.monotonic() - t0
        held.close()
    finally:
        if pod.poll() is None:
            pod.kill()
            pod.wait()
    log = out.read_text()
    assert code == 0 and "corral: stopped" in log, log
    assert "killed by SIGKILL" in log  # the workers really ignored SIGTERM
    assert 1.5 + 2 <= took < grace


def test_systemd_unit_waits_for_the_shutdown_delay_too(tmp_path):
    toml = stub_toml(tmp_path, "workers = 1", "shutdown_delay = 10")
    r = corral_cli("export", "systemd", "-c", str(toml), timeout=30)
    assert r.returncode == 0, r.stderr
    fields = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line and not line.startswith("#"))
    assert int(fields["TimeoutStopSec"]) >= 10 + 30 + 5 + 1  # delay + graceful + kill + 1, before the margin
