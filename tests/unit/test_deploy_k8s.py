"""deploy/k8s/ validates against the pinned Kubernetes version's schemas (kubernetes-validate,
strict: unknown fields are errors), and says what the deployment promises: Triton probed three
ways and scaled on queue time, the repository on a ReadWriteMany volume, secrets by reference, the
adapter store mounted where each container looks for it, in the mode it needs."""

from __future__ import annotations

import tomllib

import pytest
import yaml

from tests.adapter_store_mounts import STORE_MODES, adapter_store_path, repository_path
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
    for name in ("fluxserve-models", "fluxserve-build", "fluxserve-adapters"):
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


# ----------------------------------------------------------------------------- adapter store (issue 27)

STORE_CLAIM = "fluxserve-adapters"
MODELS_CLAIM = "fluxserve-models"
STORE_ROLES = {("api", "api"): "api", ("worker", "worker"): "worker", ("triton", "triton"): "triton"}
"""(workload, container) -> the role whose STORE_MODES entry applies."""


def adapter_store_problems(docs: list[dict]) -> list[str]:
    """What keeps the adapter store from working in these manifests: a container that needs the
    store without the `fluxserve-adapters` claim at `adapters_dir` of its own repository path, or in
    the wrong mode; its repository not on the models claim; the store mounted where it is not needed."""
    problems = []
    seen = set()
    for doc in docs:
        if doc["kind"] not in {"Deployment", "StatefulSet", "Job"}:
            continue
        pod = doc["spec"]["template"]["spec"]
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod.get("volumes", [])}
        for c in pod["containers"] + pod.get("initContainers", []):
            where = (doc["metadata"]["name"], c["name"])
            mounted = {
                m["mountPath"]: (claims.get(m["name"]), "ro" if m.get("readOnly") else "rw")
                for m in c.get("volumeMounts", [])
            }
            role = STORE_ROLES.get(where)
            if role is None:
                if any(claim == STORE_CLAIM for claim, _ in mounted.values()):
                    problems.append(f"{where}: mounts the adapter store it does not use")
                continue
            seen.add(where)
            env = {e["name"]: e.get("value", "") for e in c.get("env", [])}
            repo = repository_path(role, c["image"], env, [*c.get("command", []), *c.get("args", [])])
            if mounted.get(repo, ("", ""))[0] != MODELS_CLAIM:
                problems.append(f"{where}: its repository {repo} is not on {MODELS_CLAIM}")
            store = adapter_store_path(repo)
            if store not in mounted:
                problems.append(f"{where}: no adapter store at {store}")
            elif mounted[store] != (STORE_CLAIM, STORE_MODES[role]):
                problems.append(f"{where}: {store} is {mounted[store]}, not ({STORE_CLAIM!r}, {STORE_MODES[role]!r})")
    problems += [f"{where}: not found" for where in sorted(set(STORE_ROLES) - seen)]
    return problems


def test_adapter_store_is_shared_where_each_container_looks_for_it() -> None:
    """The workers publish into the store (rw), the facade lists and deletes (rw), Triton's
    transformer reads it (ro); the export Job, Redis and the replica sync sidecar never see it."""
    assert adapter_store_problems([doc for _, doc in resources()]) == []


@pytest.mark.parametrize(
    "breakage", ["worker unmounted", "api read-only", "triton read-write", "sidecar mounted", "repository moved"]
)
def test_adapter_store_check_catches_a_broken_mount(breakage: str) -> None:
    docs = yaml.safe_load(yaml.safe_dump([doc for _, doc in resources()]))

    def container(workload: str, name: str) -> dict:
        doc = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == workload)
        return next(c for c in doc["spec"]["template"]["spec"]["containers"] if c["name"] == name)

    def store_mount(c: dict) -> dict:
        return next(m for m in c["volumeMounts"] if m["name"] == "adapters")

    if breakage == "worker unmounted":
        worker = container("worker", "worker")
        worker["volumeMounts"].remove(store_mount(worker))
    elif breakage == "api read-only":
        store_mount(container("api", "api"))["readOnly"] = True
    elif breakage == "triton read-write":
        store_mount(container("triton", "triton")).pop("readOnly")
    elif breakage == "sidecar mounted":
        container("triton", "repository-sync")["volumeMounts"].append(
            {"name": "adapters", "mountPath": "/app/adapters"}
        )
    else:  # Triton told of another repository, its mounts left as they were
        container("triton", "triton")["env"].append({"name": "FLUXSERVE_TRITON_MODEL_REPOSITORY", "value": "/srv/repo"})
    assert adapter_store_problems(docs)
