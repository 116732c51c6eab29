"""deploy/kubernetes.yaml runs its replicas on one durable, shared jobs store (issue 7, item 13)."""

from __future__ import annotations

import argparse
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tokenrelay_server.main import add_serve_arguments, config_from_args

yaml = pytest.importorskip("yaml")
MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes.yaml"


def test_the_replicas_share_a_persistent_redis_jobs_store() -> None:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    server = by_kind[("Deployment", "tokenrelay")]
    assert server["spec"]["replicas"] >= 2
    container = server["spec"]["template"]["spec"]["containers"][0]
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    jobs = config_from_args(parser.parse_args(container["args"])).jobs
    assert jobs is not None and jobs.store_url.startswith("redis://"), "each pod would keep its own jobs"
    url = urlparse(jobs.store_url)
    service = by_kind[("Service", url.hostname)]
    assert any(p["port"] == url.port for p in service["spec"]["ports"])
    # the Service leads to a Redis whose data outlives its pod: a volume claim and an append-only file
    redis = next(d for d in docs if d["kind"] == "StatefulSet"
                 and d["spec"]["template"]["metadata"]["labels"].items() >= service["spec"]["selector"].items())
    claims = {c["metadata"]["name"] for c in redis["spec"]["volumeClaimTemplates"]}
    redis_container = redis["spec"]["template"]["spec"]["containers"][0]
    args = redis_container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    data_dir = args[args.index("--dir") + 1]
    assert any(m["name"] in claims and m["mountPath"] == data_dir for m in redis_container["volumeMounts"])
