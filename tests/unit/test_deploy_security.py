"""deploy/kubernetes-security.yaml: every env var is a real serve flag, probes use the
plaintext health port, the metrics port is scraped."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from tokenrelay_server.main import add_serve_arguments, env_name, serve_flags

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes-security.yaml"


def test_manifest_matches_the_server_flags() -> None:
    docs = list(yaml.safe_load_all(MANIFEST.read_text()))
    kinds = {d["kind"] for d in docs}
    assert {"Secret", "Deployment", "Service", "ServiceMonitor"} <= kinds
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    known = {env_name(a) for a in serve_flags(parser)}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert set(env) <= known, set(env) - known
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert int(env["TOKENRELAY_HEALTH_PORT"]) == ports["health"]
    assert int(env["TOKENRELAY_METRICS_PORT"]) == ports["metrics"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["health"]  # kubelet probes cannot do TLS
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["metrics"])
    args = parser.parse_args([])
    assert args.health_port == -1 and args.metrics_port == -1  # both off unless asked for
