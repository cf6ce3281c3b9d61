"""deploy/k8s/ validates against the pinned Kubernetes version's schemas (kubernetes-validate,
strict: unknown fields are errors), and says what the deployment promises: Triton probed three
ways and scaled on queue time, the repository on a ReadWriteMany volume, secrets by reference."""

from __future__ import annotations

import tomllib

import pytest
import yaml

from tests.conftest import PROJECT_ROOT

K8S = PROJECT_ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["fluxserve"][
    "kubernetes-version"
]
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="pip install -e '.[test]' installs kubernetes-validate"
)


def resources() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        out += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


def by_kind(kind: str, name: str) -> dict:
    return next(doc for _, doc in resources() if doc["kind"] == kind and doc["metadata"]["name"] == name)


@pytest.mark.parametrize(
    ("file", "resource"), resources(), ids=lambda x: x if isinstance(x, str) else x["metadata"]["name"]
)
def test_manifest_validates_strictly(file: str, resource: dict) -> None:
    kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def test_validation_can_fail() -> None:
    broken = by_kind("Deployment", "triton")
    broken = yaml.safe_load(yaml.safe_dump(broken))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/typo"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_triton_probes_scaling_and_replica_sync() -> None:
    pod = by_kind("Deployment", "triton")["spec"]["template"]["spec"]
    triton, sync = pod["containers"]
    assert triton["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert sync["command"][-1] == "runtime.repository_sync"
    hpa = by_kind("HorizontalPodAutoscaler", "triton")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "triton"
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "avg_time_queue_us"


def test_shared_volumes_are_read_write_many_and_pods_run_unprivileged() -> None:
    for name in ("fluxserve-models", "fluxserve-build"):
        assert by_kind("PersistentVolumeClaim", name)["spec"]["accessModes"] == ["ReadWriteMany"]
    for _, doc in resources():
        if doc["kind"] in {"Deployment", "StatefulSet", "Job"}:
            pod = doc["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True, doc["metadata"]["name"]
            for c in pod["containers"]:
                assert c["securityContext"]["allowPrivilegeEscalation"] is False, c["name"]


def test_secrets_only_by_reference() -> None:
    assert not [doc for _, doc in resources() if doc["kind"] == "Secret"]
    text = "".join(p.read_text() for p in K8S.glob("*.yaml"))
    assert "secretKeyRef: {name: fluxserve-redis, key: password}" in text


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_only_the_facade_gets_the_operator_keys() -> None:
    api = by_kind("Deployment", "api")["spec"]["template"]["spec"]["containers"][0]
    assert _env(api)["FLUXSERVE_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == "fluxserve-api-keys"
    for _, doc in resources():
        if doc["kind"] in {"Deployment", "StatefulSet", "Job"} and doc["metadata"]["name"] != "api":
            for c in doc["spec"]["template"]["spec"]["containers"]:
                assert "FLUXSERVE_API_KEYS" not in _env(c), (doc["metadata"]["name"], c["name"])


def test_facade_host_allow_list_covers_its_service_and_its_probes() -> None:
    from api.host_check import allowed_hosts, host_name

    api = by_kind("Deployment", "api")["spec"]["template"]["spec"]["containers"][0]
    env = _env(api)
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    # What the kubelet expands $(POD_NAMESPACE) to, here for namespace `ml`.
    listed = env["FLUXSERVE_API_ALLOWED_HOSTS"]["value"].replace("$(POD_NAMESPACE)", "ml").split(",")
    allowed = allowed_hosts(listed, "0.0.0.0")
    service = by_kind("Service", "api")["metadata"]["name"]
    assert {service, f"{service}.ml", f"{service}.ml.svc", f"{service}.ml.svc.cluster.local"} <= allowed
    for probe in ("readinessProbe", "livenessProbe"):
        headers = {h["name"]: h["value"] for h in api[probe]["httpGet"]["httpHeaders"]}
        assert host_name(headers["Host"]) in allowed, probe  # else the kubelet's pod-IP Host is refused
