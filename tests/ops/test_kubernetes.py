"""deploy/kubernetes: the kustomize base and the openai overlay render, validate against the
Kubernetes schemas (kubernetes-validate, strict: unknown fields fail), and hold together: the
miner.toml in each ConfigMap loads as `run` loads it, the Secret lands where the miner reads
its credential, probes and scrape annotations point at the metrics port the image listens on.

Rendering: ``kubectl kustomize`` where kubectl is installed; the same manifests are also
rendered here in Python (resources, namespace, strategic-merge patches: the subset these
files use), and where kubectl exists both renderings must agree."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from miner.daemon.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
VARIANTS = {"base": KUBE / "base", "openai": KUBE / "overlays" / "openai"}
SCHEMA_VERSIONS = ("1.29.0", "1.33.0")
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding"}
MERGE_KEYS = {"containers", "initContainers", "volumes", "volumeMounts", "env", "ports", "volumeClaimTemplates"}


# -- a small kustomize, for hosts without kubectl ------------------------------------------


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def strategic_merge(base: Any, patch: Any, key: str = "") -> Any:
    """Kubernetes' strategic merge for these files: maps merge (``null`` deletes), lists of
    named items (containers, volumes, env, ...) merge by ``name``, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = strategic_merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        out_list = list(base)
        for item in patch:
            name = item.get("name") if isinstance(item, dict) else None
            if name is None and isinstance(item, dict):
                name = item.get("metadata", {}).get("name")
            match = next((i for i, b in enumerate(out_list) if _item_name(b) == name), None)
            if match is None:
                out_list.append(copy.deepcopy(item))
            else:
                out_list[match] = strategic_merge(out_list[match], item)
        return out_list
    return copy.deepcopy(patch)


def _item_name(item: Any) -> Any:
    if not isinstance(item, dict):
        return None
    return item.get("name", item.get("metadata", {}).get("name"))


def render_python(folder: Path) -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text(encoding="utf-8"))
    known = {"apiVersion", "kind", "namespace", "resources", "patches"}
    assert set(kustomization) <= known, f"{folder}: the Python renderer supports only {sorted(known)}"
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        target = (folder / entry).resolve()
        objects += render_python(target) if target.is_dir() else _docs(target)
    for patch in kustomization.get("patches", []):
        assert set(patch) == {"path"}, "only file patches matched by kind and name"
        for doc in _docs(folder / patch["path"]):
            i = next(i for i, o in enumerate(objects) if _ident(o) == _ident(doc))
            objects[i] = strategic_merge(objects[i], doc)
    namespace = kustomization.get("namespace")
    if namespace:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = namespace
    return objects


def _ident(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def render(folder: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize`` when kubectl is here (checked against the Python rendering), else Python."""
    ours = render_python(folder)
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return ours
    out = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=120, check=True)
    theirs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert _by_ident(theirs) == _by_ident(ours), "kubectl kustomize and the Python rendering disagree"
    return theirs


def _by_ident(objects: list[dict[str, Any]]) -> dict[tuple[str, str], Any]:
    return {_ident(o): _sorted_named(o) for o in objects}


def _sorted_named(value: Any) -> Any:
    """Lists of named items in name order (kustomize may reorder them when merging)."""
    if isinstance(value, dict):
        return {k: _sorted_named(v) for k, v in value.items()}
    if isinstance(value, list):
        items = [_sorted_named(v) for v in value]
        if items and all(isinstance(i, dict) and _item_name(i) for i in items):
            return sorted(items, key=lambda i: str(_item_name(i)))
        return items
    return value


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(VARIANTS[request.param])


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod["containers"] if c["name"] == name)


# -- the tests ---------------------------------------------------------------------------


def test_strategic_merge_follows_kubernetes_rules() -> None:
    """The renderer's merge (used where kubectl is missing): named items merge, null deletes."""
    base = {"containers": [{"name": "a", "image": "x", "resources": {"limits": {"gpu": 1, "memory": "1Gi"}}}]}
    patch = {"containers": [{"name": "a", "resources": {"limits": {"gpu": None}}}, {"name": "b", "image": "y"}]}
    assert strategic_merge(base, patch) == {
        "containers": [
            {"name": "a", "image": "x", "resources": {"limits": {"memory": "1Gi"}}},
            {"name": "b", "image": "y"},
        ]
    }
    assert strategic_merge({"args": ["1", "2"]}, {"args": ["3"]}) == {"args": ["3"]}


def test_manifests_validate_against_the_kubernetes_schemas(variant: tuple[str, list[dict[str, Any]]]) -> None:
    import kubernetes_validate

    name, objects = variant
    assert {o["kind"] for o in objects} == {"Namespace", "ConfigMap", "Service", "StatefulSet"}, name
    for version in SCHEMA_VERSIONS:
        for obj in objects:
            kubernetes_validate.validate(obj, version, strict=True)


def test_the_example_secret_validates_and_is_the_one_mounted() -> None:
    import kubernetes_validate

    (secret,) = _docs(KUBE / "base" / "api-key-secret.example.yaml")
    for version in SCHEMA_VERSIONS:
        kubernetes_validate.validate(secret, version, strict=True)
    volume = next(
        v
        for v in one(render(VARIANTS["base"]), "StatefulSet")["spec"]["template"]["spec"]["volumes"]
        if v["name"] == "api-key"
    )
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert [i["key"] for i in volume["secret"]["items"]] == list(secret["stringData"]) == ["api-key"]


def test_one_gpu_per_miner_and_state_kept_per_replica(variant: tuple[str, list[dict[str, Any]]]) -> None:
    name, objects = variant
    sts = one(objects, "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    gpus = {c["name"]: c["resources"].get("limits", {}).get("nvidia.com/gpu") for c in pod["containers"]}
    engine = "vllm" if name == "openai" else "miner"
    assert gpus[engine] == 1 and sum(g or 0 for g in gpus.values()) == 1, gpus
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m["name"] for m in container(pod, "miner")["volumeMounts"]}
    assert mounts["/var/lib/aitbc-miner"] in claims  # a PVC per replica: the receipt key survives restarts
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"  # the key stays mode 0600
    env = {e["name"]: e for e in container(pod, "miner")["env"]}
    assert env["AITBC_MINER_MINER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_secret_is_read_through_credentials_directory(variant: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = variant
    pod = one(objects, "StatefulSet")["spec"]["template"]["spec"]
    miner = container(pod, "miner")
    creds = next(e["value"] for e in miner["env"] if e["name"] == "CREDENTIALS_DIRECTORY")
    mount = next(m for m in miner["volumeMounts"] if m["mountPath"] == creds)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert [i["path"] for i in volume["secret"]["items"]] == ["api-key"]  # settings.CREDENTIAL_NAME
    dockerfile = (ROOT / "Dockerfile.cuda").read_text(encoding="utf-8")
    assert f"CREDENTIALS_DIRECTORY={creds}" in dockerfile  # the same place the Docker image reads


def test_probes_and_scrape_annotations_use_the_metrics_port(variant: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = variant
    template = one(objects, "StatefulSet")["spec"]["template"]
    miner = container(template["spec"], "miner")
    listen = re.search(r"AITBC_MINER_METRICS__LISTEN=0\.0\.0\.0:(\d+)", (ROOT / "Dockerfile.cuda").read_text())
    assert listen is not None
    port = int(listen[1])
    named = {p["name"]: p["containerPort"] for p in miner["ports"]}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        get = miner[probe]["httpGet"]
        assert get["path"] == "/healthz" and named[get["port"]] == port, probe
    notes = template["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true" and int(notes["prometheus.io/port"]) == port
    assert notes["prometheus.io/path"] == "/metrics"
    service = one(objects, "Service")
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()


def test_configmap_loads_as_run_loads_it(
    variant: tuple[str, list[dict[str, Any]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ConfigMap's miner.toml with the pod's environment (image ENV + container env) loads."""
    name, objects = variant
    config = tmp_path / "miner.toml"
    config.write_text(one(objects, "ConfigMap")["data"]["miner.toml"], encoding="utf-8")
    for var in list(os.environ):
        if var.startswith("AITBC_MINER_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("AITBC_MINER_MINER_ID", "aitbc-miner-0")
    monkeypatch.setenv("AITBC_MINER_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("AITBC_MINER_METRICS__LISTEN", "0.0.0.0:9477")
    settings = load_settings(config)
    assert settings.miner_id == "aitbc-miner-0" and settings.log.format == "json"
    pod = one(objects, "StatefulSet")["spec"]["template"]["spec"]
    if name == "openai":
        vllm = container(pod, "vllm")
        (model,) = settings.models
        opts = model.options()
        assert model.runner == "openai" and not settings.gpus.enabled
        assert opts["base_url"] == f"http://127.0.0.1:{vllm['ports'][0]['containerPort']}/v1"
        assert f"--served-model-name={opts['served_model']}" in vllm["args"]
        mounts = {m["mountPath"] for m in vllm["volumeMounts"]}
        assert any(a.startswith("--model=/srv/models/") for a in vllm["args"]) and "/srv/models" in mounts
    else:
        (model,) = settings.models
        assert model.runner == "transformers"
        mounts = {m["mountPath"] for m in container(pod, "miner")["volumeMounts"]}
        assert any(model.options()["path"].startswith(m + "/") for m in mounts)
