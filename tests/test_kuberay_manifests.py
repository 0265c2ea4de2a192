"""The KubeRay manifests (cluster/kuberay/) are what KubeRay v1.7 accepts and say what production.yaml says.

Shown here, fast and with neither Kubernetes nor Ray running:

- Every manifest parses. The RayService validates against the openAPIV3Schema of KubeRay's CRD
  (tests/kuberay_crds/, a copy of shared/kuberay/; or $KUBERAY_CRDS), the core/v1 parts of the other manifests (the Redis
  pod template, the Service, the volume claims) against the same core/v1 schemas the CRD embeds.
  How the Kubernetes dialect is read with jsonschema (Draft 7): `nullable` becomes a null type;
  `x-kubernetes-int-or-string` is the integer-or-string anyOf controller-gen writes beside it
  (added where missing); `format: int32/int64` are range-checked; `x-kubernetes-list-type: map/set`
  rejects duplicate keys as the API server does; CEL rules (`x-kubernetes-validations`: managedBy,
  immutability) are not evaluated. The root `metadata` is Kubernetes' ObjectMeta (the CRD says only
  `type: object`).
- Unknown fields are errors. A structural schema makes the API server prune fields it does not
  know, silently, so a typo (`rayStartParms`) would vanish from the applied object: every key must
  be in its schema's properties (or additionalProperties) unless the schema preserves unknown
  fields. Mutated copies prove each check catches what it is for.
- One source of truth: the committed serveConfigV2 and the Grafana ConfigMap are exactly what
  cluster/render_kuberay.py makes from production.yaml and the dashboard JSON, and serveConfigV2
  differs from production.yaml only at the renderer's declared overrides. Ray's own
  ServeDeploySchema and the app's AppConfig accept it.
- The API keys reach the app: every Ray container reads them from the Secret, production.yaml's
  args leave `auth.keys` to the environment (args would win over it), and the app built with
  that environment holds them.
- The cluster can run the config: each deployment's label_selector names one worker group whose
  pods fit its replicas, up to max_replicas; the head takes no work; GPU groups ask for GPUs on
  GPU nodes (FLUX on other, larger nodes, down to zero pods); metrics on port 8080 named
  `metrics`, scraped by PodMonitors whose selectors match the pods; Redis keeps an append-only
  file on a volume; the upgrade strategy never needs twice the GPUs; KubeRay's own admission
  rules (what its validation code refuses beyond the schema) hold.
- The image: cluster/Dockerfile's base is the installed Ray, within pyproject's pin, with a Python
  pyproject allows; torch is pinned; no tests in the image.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import sys
from collections import Counter
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.version import Version
from ray.serve.schema import ServeDeploySchema

from serve_app.auth import hash_key
from serve_app.config import ApiKey, AppConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "cluster" / "kuberay"
# KubeRay v1.7.0's CRDs, copied from the project's shared/kuberay/ so that CI validates offline on
# any clone ($KUBERAY_CRDS points elsewhere, e.g. at a newer KubeRay's).
CRDS = Path(os.environ.get("KUBERAY_CRDS", ROOT / "tests" / "kuberay_crds"))
SHARED_CRDS = ROOT.parent / "shared" / "kuberay"
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _load_renderer():
    spec = importlib.util.spec_from_file_location("render_kuberay", ROOT / "cluster" / "render_kuberay.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


render_kuberay = _load_renderer()


# --- the manifests ---------------------------------------------------------------------------


@cache
def _documents() -> tuple[tuple[Path, dict], ...]:
    docs = []
    for path in sorted(KUBERAY.rglob("*.yaml")):
        for doc in yaml.load_all(path.read_text(), Loader=Loader):
            if doc is not None:
                docs.append((path.relative_to(ROOT), doc))
    return tuple(docs)


def documents(kind: str | None = None) -> list[dict]:
    """Fresh copies (YAML anchors share objects; tests mutate)."""
    return [copy.deepcopy(doc) for _, doc in _documents() if kind is None or doc["kind"] == kind]


def one(kind: str, name: str | None = None) -> dict:
    (doc,) = [d for d in documents(kind) if name is None or d["metadata"]["name"] == name]
    return doc


def rayservice() -> dict:
    return one("RayService")


def ray_groups(service: dict) -> dict[str, dict]:
    """'head' and each worker group by name."""
    cluster = service["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay's Ray container is the first


def serve_config() -> dict:
    return yaml.safe_load(rayservice()["spec"]["serveConfigV2"])


def serve_app(config: dict | None = None) -> dict:
    (app,) = (config or serve_config())["applications"]
    return app


def deployments(config: dict | None = None) -> dict[str, dict]:
    return {d["name"]: d for d in serve_app(config)["deployments"]}


def production() -> dict:
    return yaml.safe_load((ROOT / "cluster" / "production.yaml").read_text())


# --- the CRD schemas, read as JSON Schema ------------------------------------------------------

OBJECT_META = {  # what Kubernetes accepts in any object's metadata (the CRD leaves it to the API server)
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}},
    },
}


def as_json_schema(node):
    """Kubernetes' OpenAPI v3 dialect as JSON Schema Draft 7 (see the module docstring)."""
    if isinstance(node, list):
        return [as_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: as_json_schema(value) for key, value in node.items()}
    if node.get("nullable") and isinstance(node.get("type"), str):
        node["type"] = [node["type"], "null"]
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return node


@cache
def crd_schema(file: str) -> dict:
    path = CRDS / file
    assert path.exists(), f"KubeRay's CRDs are expected at {CRDS}; set KUBERAY_CRDS to their folder"
    crd = yaml.load(path.read_text(), Loader=Loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = as_json_schema(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = OBJECT_META
    return schema


CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}


@cache
def core_schemas() -> dict[str, dict]:
    """core/v1 schemas as the RayService CRD embeds them: validate the other manifests' Kubernetes parts."""
    spec = crd_schema(CRD_FILES["RayService"])["properties"]["spec"]["properties"]
    template = spec["rayClusterConfig"]["properties"]["headGroupSpec"]["properties"]["template"]
    volume = template["properties"]["spec"]["properties"]["volumes"]["items"]
    service = copy.deepcopy(spec["serveService"])
    service["properties"]["metadata"] = OBJECT_META
    return {
        "PodTemplateSpec": template,
        "PersistentVolumeClaimSpec": volume["properties"]["ephemeral"]["properties"]["volumeClaimTemplate"]["properties"]["spec"],
        "Service": service,
    }


def _list_type(validator, list_type, instance, schema):
    """`x-kubernetes-list-type`: `map` items are unique by `x-kubernetes-list-map-keys`, `set` items outright."""
    if not validator.is_type(instance, "array"):
        return
    if list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen = Counter(tuple(json.dumps(item.get(k)) for k in keys) for item in instance if isinstance(item, dict))
        for key, count in seen.items():
            if count > 1:
                yield jsonschema.ValidationError(f"duplicate entries for map key {dict(zip(keys, map(json.loads, key)))}")
    elif list_type == "set":
        for item, count in Counter(json.dumps(item, sort_keys=True) for item in instance).items():
            if count > 1:
                yield jsonschema.ValidationError(f"duplicate entry {item} in a set")


FORMATS = jsonschema.FormatChecker()


@FORMATS.checks("int32")
def _int32(value) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@FORMATS.checks("int64")
def _int64(value) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


KubernetesValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-kubernetes-list-type": _list_type})


def schema_errors(instance: dict, schema: dict) -> list[str]:
    validator = KubernetesValidator(schema, format_checker=FORMATS)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(instance)]


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Keys the API server would prune: not in `properties`, no `additionalProperties` schema,
    and no `x-kubernetes-preserve-unknown-fields` on the way."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(value, dict):
        properties, additional = schema.get("properties"), schema.get("additionalProperties")
        for key, item in value.items():
            if properties is not None and key in properties:
                found += unknown_fields(item, properties[key], f"{path}.{key}")
            elif isinstance(additional, dict):
                found += unknown_fields(item, additional, f"{path}.{key}")
            elif additional is not True:
                found.append(f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def kubernetes_parts(doc: dict) -> list[tuple[str, object, dict]]:
    """(where, value, schema) for the parts of a manifest that a schema we hold covers."""
    kind = doc["kind"]
    if kind in CRD_FILES:
        return [(kind, doc, crd_schema(CRD_FILES[kind]))]
    core = core_schemas()
    if kind == "Service":
        return [("Service", doc, core["Service"])]
    if kind == "PersistentVolumeClaim":
        return [("PersistentVolumeClaim.spec", doc["spec"], core["PersistentVolumeClaimSpec"])]
    if kind in ("StatefulSet", "Deployment"):
        parts = [(f"{kind}.spec.template", doc["spec"]["template"], core["PodTemplateSpec"])]
        for i, claim in enumerate(doc["spec"].get("volumeClaimTemplates", [])):
            parts.append((f"{kind}.spec.volumeClaimTemplates[{i}].spec", claim["spec"], core["PersistentVolumeClaimSpec"]))
        return parts
    return []


# --- 1. the manifests are valid ---------------------------------------------------------------


def test_every_manifest_parses_and_names_itself_once():
    docs = documents()
    kinds = {"RayService", "StatefulSet", "Service", "PersistentVolumeClaim", "PodMonitor", "ConfigMap", "Secret", "NetworkPolicy"}
    assert {d["kind"] for d in docs} == kinds
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), doc
        assert "namespace" not in doc["metadata"], "apply into a namespace with -n; short service names assume one namespace"
    names = Counter((d["kind"], d["metadata"]["name"]) for d in docs)
    assert all(count == 1 for count in names.values()), names


def test_rayservice_validates_against_the_crd_with_no_unknown_fields():
    service = rayservice()
    assert service["apiVersion"] == "ray.io/v1"
    schema = crd_schema(CRD_FILES["RayService"])
    assert schema_errors(service, schema) == []
    assert unknown_fields(service, schema) == []
    # The RayCluster KubeRay makes from rayClusterConfig is valid for the RayCluster CRD too.
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "diffusion-serve-raycluster-abcde"}}
    cluster["spec"] = service["spec"]["rayClusterConfig"]
    assert schema_errors(cluster, crd_schema(CRD_FILES["RayCluster"])) == []
    assert unknown_fields(cluster, crd_schema(CRD_FILES["RayCluster"])) == []


def test_the_other_manifests_core_v1_parts_validate_too():
    covered = set()
    for doc in documents():
        for where, value, schema in kubernetes_parts(doc):
            assert schema_errors(value, schema) == [], (doc["metadata"]["name"], where)
            assert unknown_fields(value, schema) == [], (doc["metadata"]["name"], where)
            covered.add(where.split(".")[0])
    assert covered >= {"RayService", "Service", "PersistentVolumeClaim", "StatefulSet"}


def test_a_typo_passes_the_schema_but_not_the_unknown_field_check():
    """What the API server would silently prune: the schema alone accepts it, the walk does not."""
    schema = crd_schema(CRD_FILES["RayService"])
    service = rayservice()
    gpu = ray_groups(service)["gpu"]
    gpu["rayStartParms"] = gpu.pop("rayStartParams")
    ray_container(gpu)["resource"] = ray_container(gpu).pop("resources")
    assert schema_errors(service, schema) == []  # both are allowed to be absent, and extra keys pass JSON Schema
    assert unknown_fields(service, schema) == [
        ".spec.rayClusterConfig.workerGroupSpecs[1].template.spec.containers[0].resource",
        ".spec.rayClusterConfig.workerGroupSpecs[1].rayStartParms",
    ]
    redis = one("StatefulSet")
    redis["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    (template,) = [(v, s) for w, v, s in kubernetes_parts(redis) if w.endswith("template")]
    assert unknown_fields(*template) == [".spec.containers[0].readinesProbe"]


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda g: g.update(minReplicas="two"), "'two' is not of type 'integer'"),
        (lambda g: g.update(maxReplicas=2**40), "is not a 'int32'"),
        (lambda g: ray_container(g)["resources"]["limits"].update(memory="28 GiB"), "does not match"),
        (lambda g: ray_container(g)["env"].append({"name": "HF_HOME", "value": "/tmp"}), "duplicate entries for map key"),
    ],
    ids=["type", "int32", "quantity", "duplicate-env"],
)
def test_the_schema_check_catches_wrong_values(mutate, expected):
    service = rayservice()
    mutate(ray_groups(service)["gpu"])
    errors = schema_errors(service, crd_schema(CRD_FILES["RayService"]))
    assert any(expected in e for e in errors), errors


def test_kuberays_own_admission_rules_hold():
    """What KubeRay v1.7's validation (ray-operator/controllers/ray/utils/validation.go) refuses
    beyond the schema, for the parts this RayService uses."""
    spec = rayservice()["spec"]
    cluster = spec["rayClusterConfig"]
    assert spec["serveConfigV2"].strip()
    assert not cluster["headGroupSpec"].get("headService", {}).get("metadata", {}).get("name")
    label = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
    for name, group in ray_groups({"spec": spec}).items():
        params = group.get("rayStartParams", {})
        has_params = any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources"))
        assert not (has_params and group.get("resources")), f"{name}: resources in both rayStartParams and resources"
        assert "labels" not in params, f"{name}: Ray labels go in the group's labels field"
        for key, value in group.get("labels", {}).items():
            assert label.match(key) and (value == "" or label.match(value)), (name, key, value)
        if name != "head":
            assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"], name
            if "idleTimeoutSeconds" in group:
                assert cluster["autoscalerOptions"]["version"] == "v2", f"{name}: per-group idleTimeoutSeconds needs autoscaler v2"
    head_env = {e["name"] for e in ray_container(cluster["headGroupSpec"]).get("env", [])}
    assert not head_env & {"RAY_REDIS_ADDRESS", "REDIS_PASSWORD", "REDIS_USERNAME"}, "KubeRay refuses these with gcsFaultToleranceOptions"
    assert "redis-password" not in cluster["headGroupSpec"]["rayStartParams"]


# --- 2. one source of truth -----------------------------------------------------------------


def test_generated_files_are_what_the_renderer_makes():
    assert render_kuberay.stale() == [], render_kuberay.STALE.format(path=", ".join(map(str, render_kuberay.stale())))


def test_serve_config_v2_is_production_yaml_rendered():
    expected = render_kuberay.serve_config_text((ROOT / "cluster" / "production.yaml").read_text())
    assert rayservice()["spec"]["serveConfigV2"] == expected, render_kuberay.STALE.format(path=render_kuberay.RAYSERVICE)


def test_editing_production_yaml_without_rendering_is_caught():
    text = (ROOT / "cluster" / "production.yaml").read_text()
    flux = "          max_replicas: {}\n          target_ongoing_requests: 4"
    edited = text.replace(flux.format(4), flux.format(5))
    assert edited != text
    rendered = render_kuberay.render(production_text=edited)[render_kuberay.RAYSERVICE]
    assert rendered != (ROOT / render_kuberay.RAYSERVICE).read_text()
    assert yaml.safe_load(rendered)["spec"]["serveConfigV2"] != rayservice()["spec"]["serveConfigV2"]


def leaves(node, prefix: tuple[str, ...] = ()):
    """(path, value) of every leaf; lists of named items are walked by name, as overrides address them."""
    if isinstance(node, dict) and node:
        for key, value in node.items():
            if isinstance(value, list) and value and all(isinstance(i, dict) and "name" in i for i in value):
                for item in value:
                    yield from leaves(item, (*prefix, f"{key}[name={item['name']}]"))
            else:
                yield from leaves(value, (*prefix, key))
    else:
        yield prefix, node


def test_serve_config_v2_differs_from_production_yaml_only_by_the_declared_overrides():
    before, after = dict(leaves(production())), dict(leaves(serve_config()))
    changed = {path for path in before.keys() | after.keys() if before.get(path, "<absent>") != after.get(path, "<absent>")}
    overrides = render_kuberay.kuberay_overrides(production())
    declared = {path: value for o in overrides for path, value in leaves(o.value, o.path)}
    assert changed == set(declared)
    assert all(after[path] == value for path, value in declared.items())
    assert all(o.why for o in overrides)
    header = rayservice()["spec"]["serveConfigV2"].split("\nproxy_location")[0]
    assert all(f"#   {o.dotted()}: {o.why}" in header for o in overrides)  # the config says what was changed and why


def test_ray_accepts_the_serve_config_and_the_app_settings_build():
    config = serve_config()
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == "serve_app.app:build_app"
    assert {d.name for d in app.deployments} == set(deployments(production()))
    assert AppConfig.from_args(app.args).profile == "production"
    assert config["http_options"]["port"] == 8000  # KubeRay's serve port


def test_the_job_store_is_the_in_cluster_redis_for_the_routers_and_every_queue_aware_policy():
    from serve_app.autoscaling import QueueAwarePolicy

    config = AppConfig.from_args(serve_app()["args"])
    assert "sqlite" not in rayservice()["spec"]["serveConfigV2"].split("\nproxy_location")[1]
    store = config.queue.store_url
    assert store == render_kuberay.JOB_STORE_URL == f"redis://{one('Service', 'diffusion-serve-redis')['metadata']['name']}:6379/1"
    policies = 0
    for d in deployments().values():
        policy = d.get("autoscaling_config", {}).get("policy", {})
        if policy.get("policy_function") == render_kuberay.QUEUE_AWARE_POLICY:
            assert QueueAwarePolicy(**policy["policy_kwargs"]).store_url == store, d["name"]
            policies += 1
    assert policies == 3  # StableDiffusion, LCM, Flux
    gcs = rayservice()["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert gcs["redisAddress"] == "diffusion-serve-redis:6379"  # Ray's GCS always uses db 0
    assert store.rsplit("/", 1)[1] != "0", "the job store must not share GCS fault tolerance's db"
    assert "externalStorageNamespace" not in gcs  # each RayCluster its own: an upgrade's new cluster starts clean


def test_redis_requires_the_secrets_password_and_every_client_of_it_has_it():
    """Redis, Ray's GCS and the job store (routers, and the Serve controller's queue-aware policy)
    share one password from one Secret; none of it is in serveConfigV2, which is not a Secret."""
    from serve_app.config import STORE_PASSWORD_ENV

    secret = one("Secret", "diffusion-serve-redis-auth")
    wanted = {"name": secret["metadata"]["name"], "key": "password"}
    assert set(secret["stringData"]) == {"password"}
    (redis,) = one("StatefulSet", "diffusion-serve-redis")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in redis["env"]}
    assert env["REDIS_PASSWORD"] == env["REDISCLI_AUTH"] == wanted  # the probe's redis-cli logs in too
    assert redis["args"][-2:] == ["--requirepass", "$(REDIS_PASSWORD)"]
    gcs = rayservice()["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert gcs["redisPassword"]["valueFrom"]["secretKeyRef"] == wanted
    for name, group in ray_groups(rayservice()).items():
        (entry,) = [e for e in ray_container(group)["env"] if e["name"] == STORE_PASSWORD_ENV]
        assert entry["valueFrom"]["secretKeyRef"] == wanted and not entry["valueFrom"]["secretKeyRef"].get("optional"), name
    assert "@" not in AppConfig.from_args(serve_app()["args"]).queue.store_url  # no password in the URL
    assert AppConfig.from_args(serve_app()["args"]).queue.store_password is None  # the environment's to fill


# --- 3. the API keys ---------------------------------------------------------------------------

KEYS_ENV = "DIFFUSION_SERVE_AUTH__KEYS"


def test_every_ray_container_reads_the_keys_from_the_secret():
    secret = one("Secret", "diffusion-serve-api-keys")
    for name, group in ray_groups(rayservice()).items():
        (entry,) = [e for e in ray_container(group)["env"] if e["name"] == KEYS_ENV]
        ref = entry["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"], name
        assert not ref.get("optional"), f"{name}: a missing Secret must stop the pod, not start it keyless"


def test_the_example_secret_has_the_right_shape_and_no_real_key():
    (entry,) = json.loads(one("Secret", "diffusion-serve-api-keys")["stringData"][KEYS_ENV])
    assert set(entry) == {"id", "sha256"}
    with pytest.raises(ValueError, match="String should match pattern"):
        ApiKey(**entry)  # a placeholder: applied unchanged, the app fails to build instead of running keyless
    example = Path("cluster/kuberay/examples/api-keys.secret.yaml")
    assert example in {p for p, _ in _documents()}  # a subdirectory: not applied by `kubectl apply -f cluster/kuberay/`


def test_keys_from_the_environment_reach_the_app(monkeypatch):
    """Init args win over the environment in AppConfig, nested mappings merged key by key: the
    Secret's keys take effect because production.yaml's `auth` sets `open` and a rate limit but
    not `keys`. The app is built once, by a task on any pod; replicas get the built settings, keys
    included, whatever their own environment."""
    args = serve_app()["args"]
    assert "keys" not in args["auth"], "auth.keys in the serve config would override the Secret"
    key = "my-app:" + "s" * 32
    monkeypatch.setenv(KEYS_ENV, json.dumps([{"id": "my-app", "sha256": hash_key(key)}]))
    built = AppConfig.from_args(args)
    assert [k.id for k in built.auth.keys] == ["my-app"] and built.auth.open is False and built.auth.default_requests_per_minute == 600
    monkeypatch.delenv(KEYS_ENV)
    assert [k.sha256 for k in AppConfig.from_args(built.model_dump(mode="json")).auth.keys] == [hash_key(key)]  # what a replica sees


def test_args_would_win_over_the_environment(monkeypatch):
    """Why the renderer writes the store URL into args: the environment cannot override it, and a
    `keys` entry in args would silence the Secret the same way."""
    monkeypatch.setenv("DIFFUSION_SERVE_QUEUE__STORE_URL", "redis://elsewhere:6379/0")
    assert AppConfig.from_args(production()["applications"][0]["args"]).queue.store_url.startswith("sqlite:")
    monkeypatch.setenv(KEYS_ENV, json.dumps([{"id": "my-app", "sha256": "a" * 64}]))
    shadowed = copy.deepcopy(serve_app()["args"])
    shadowed["auth"]["keys"] = []
    assert AppConfig.from_args(shadowed).auth.keys == []


# --- 4. the cluster can run the config ------------------------------------------------------------


def _cpus(container: dict) -> float:
    cpu = str(container["resources"]["limits"]["cpu"])
    return float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)


def _gpus(container: dict) -> int:
    return int(container["resources"].get("limits", {}).get("nvidia.com/gpu", 0))


def test_the_head_takes_no_work():
    head = ray_groups(rayservice())["head"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert _gpus(ray_container(head)) == 0
    assert rayservice()["spec"]["excludeHeadPodFromServeSvc"] is True


def test_each_deployment_runs_on_one_worker_group_that_fits_it_up_to_max_replicas():
    groups = {name: g for name, g in ray_groups(rayservice()).items() if name != "head"}
    by_group: dict[str, list[dict]] = {name: [] for name in groups}
    for name, d in deployments().items():
        selector = d["ray_actor_options"]["label_selector"]
        (group,) = [g for g, spec in groups.items() if all(spec.get("labels", {}).get(k) == v for k, v in selector.items())]
        by_group[group].append(d)
    for name, hosted in by_group.items():
        container = ray_container(groups[name])
        cpus, gpus = _cpus(container), _gpus(container)
        need_cpu = need_gpu = floor_gpu = 0.0
        for d in hosted:
            actor = d["ray_actor_options"]
            scaling = d.get("autoscaling_config", {})
            most, least = scaling.get("max_replicas", d.get("num_replicas", 1)), scaling.get("min_replicas", d.get("num_replicas", 1))
            want_gpu, want_cpu = actor.get("num_gpus", 0), actor.get("num_cpus", 1)
            assert want_cpu <= cpus and want_gpu <= gpus, (name, d["name"])
            if want_gpu:  # a pod's GPUs are not stranded for want of CPUs
                assert want_cpu * (gpus / want_gpu) <= cpus, (name, d["name"])
            need_cpu, need_gpu, floor_gpu = need_cpu + most * want_cpu, need_gpu + most * want_gpu, floor_gpu + least * want_gpu
        group = groups[name]
        assert need_cpu <= group["maxReplicas"] * cpus and need_gpu <= group["maxReplicas"] * gpus, name
        assert floor_gpu <= group["minReplicas"] * max(gpus, 1), name  # the Serve minimums need no scale-up
    assert [d["name"] for d in by_group["gpu-large"]] == ["Flux"]
    assert {d["name"] for d in by_group["cpu"]} == {"Router", "AdapterFetcher"}


def test_gpu_groups_ask_for_gpus_on_gpu_nodes_and_flux_on_its_own_scaling_to_zero():
    groups = ray_groups(rayservice())
    for name in ("gpu", "gpu-large"):
        resources = ray_container(groups[name])["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1", name
        spec = groups[name]["template"]["spec"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"], name
        assert spec["nodeSelector"], name
    assert groups["gpu"]["template"]["spec"]["nodeSelector"] != groups["gpu-large"]["template"]["spec"]["nodeSelector"]
    assert groups["gpu-large"]["minReplicas"] == 0 and deployments()["Flux"]["autoscaling_config"]["min_replicas"] == 0
    assert _gpus(ray_container(groups["cpu"])) == 0


def test_autoscaling_is_in_tree_with_an_idle_timeout():
    cluster = rayservice()["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert cluster["autoscalerOptions"]["version"] == "v2"


def test_upgrades_never_need_twice_the_gpus():
    spec = rayservice()["spec"]
    strategy = spec["upgradeStrategy"]
    assert strategy["type"] == "NewClusterWithIncrementalUpgrade"  # NewCluster would double the cluster
    options = strategy["clusterUpgradeOptions"]
    # KubeRay's ValidateClusterUpgradeOptions, and below 100% surge:
    assert spec["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    assert 0 < options["stepSizePercent"] <= options["maxSurgePercent"] < 100
    assert options["intervalSeconds"] > 0 and options["gatewayClassName"]
    timeout = AppConfig.from_args(serve_app()["args"]).limits.request_timeout_s
    assert spec["rayClusterDeletionDelaySeconds"] > timeout  # the old cluster finishes its synchronous requests


def test_paths_in_the_serve_config_are_on_the_mounted_volumes():
    config = AppConfig.from_args(serve_app()["args"])
    groups = ray_groups(rayservice())
    claims = {d["metadata"]["name"]: d for d in documents("PersistentVolumeClaim")}
    for name in ("cpu", "gpu", "gpu-large"):
        spec = groups[name]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in ray_container(groups[name])["volumeMounts"]}

        def volume_of(path: Path) -> dict:
            (mount,) = [m for m in mounts if path.is_relative_to(m)]
            return mounts[mount]

        assert set(mounts) == {render_kuberay.DATA_MOUNT, render_kuberay.CACHE_MOUNT}, name
        shared = volume_of(config.files.directory)  # any router serves any file: one volume for all pods
        assert shared is mounts[render_kuberay.DATA_MOUNT]
        assert claims[shared["persistentVolumeClaim"]["claimName"]]["spec"]["accessModes"] == ["ReadWriteMany"]
        env = {e["name"]: e.get("value") for e in ray_container(groups[name])["env"]}
        assert volume_of(Path(env["HF_HOME"])) is shared
        own = volume_of(config.weights.cache_dir)["ephemeral"]["volumeClaimTemplate"]["spec"]  # node-local by design: one per pod
        assert own["resources"]["requests"]["storage"] == f"{render_kuberay.CACHE_VOLUME_GIB}Gi"
        size = render_kuberay.CACHE_VOLUME_GIB * 1024**3
        assert config.weights.max_cache_bytes + config.weights.max_file_bytes <= size


def test_metrics_port_8080_is_named_metrics_on_every_ray_pod_and_scraped():
    service = rayservice()
    monitors = {m["metadata"]["name"]: m for m in documents("PodMonitor")}
    kuberay_labels = {"head": {"ray.io/node-type": "head"}}  # what KubeRay adds to the pods
    for name, group in ray_groups(service).items():
        assert group["rayStartParams"]["metrics-export-port"] == "8080", name
        assert {"name": "metrics", "containerPort": 8080} in ray_container(group)["ports"], name
        labels = {**group["template"]["metadata"]["labels"], **kuberay_labels.get(name, {"ray.io/node-type": "worker"})}
        scrapers = [m for m in monitors.values() if m["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(scrapers) == 1, name
        assert [e["port"] for e in scrapers[0]["spec"]["podMetricsEndpoints"]] == ["metrics"], name


def test_probes_are_left_to_kuberay():
    """KubeRay injects liveness and readiness probes only into Ray containers that have none (its
    workers' readiness includes the Serve proxy check on the port named `serve`): none here."""
    for name, group in ray_groups(rayservice()).items():
        container = ray_container(group)
        assert not {"livenessProbe", "readinessProbe", "startupProbe"} & container.keys(), name
        if name != "head":
            assert {"name": "serve", "containerPort": serve_config()["http_options"]["port"]} in container["ports"], name
    redis = one("StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    assert redis["readinessProbe"] and redis["livenessProbe"]


def test_every_ray_pod_runs_the_one_image_of_the_pinned_ray():
    service = rayservice()
    images = {ray_container(g)["image"] for g in ray_groups(service).values()}
    assert len(images) == 1
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__


def test_redis_keeps_an_append_only_file_on_a_volume_and_admits_only_this_app():
    config = one("ConfigMap", "diffusion-serve-redis-config")["data"]["redis.conf"]
    settings = dict(line.split(None, 1) for line in config.splitlines() if line and not line.startswith("#"))
    assert settings["appendonly"] == "yes" and settings["appendfsync"] in ("everysec", "always")
    assert settings["maxmemory-policy"] == "noeviction"  # an evicted key is a lost job
    redis = one("StatefulSet", "diffusion-serve-redis")
    pod = redis["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    claims = {c["metadata"]["name"] for c in redis["spec"]["volumeClaimTemplates"]}
    assert {"name": "data", "mountPath": settings["dir"]} in container["volumeMounts"] and "data" in claims
    service = one("Service", render_kuberay.REDIS_SERVICE)
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == 6379 and port["targetPort"] in {p["name"] for p in container["ports"]}
    policy = one("NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (allowed,) = policy["spec"]["ingress"][0]["from"]
    for name, group in ray_groups(rayservice()).items():
        assert allowed["podSelector"]["matchLabels"].items() <= group["template"]["metadata"]["labels"].items(), name


def test_the_grafana_dashboard_configmap_is_the_dashboard_json():
    configmap = one("ConfigMap", "diffusion-serve-grafana-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    text = (ROOT / "cluster" / "grafana" / "diffusion-serve.json").read_text()
    assert configmap["data"] == {"diffusion-serve.json": text}
    assert json.loads(configmap["data"]["diffusion-serve.json"])["uid"] == "diffusion-serve"


# --- 5. the image --------------------------------------------------------------------------------


def dockerfile() -> str:
    return (ROOT / "cluster" / "Dockerfile").read_text()


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement(name: str) -> Requirement:
    (req,) = [Requirement(r) for r in pyproject()["project"]["dependencies"] if Requirement(r).name == name]
    return req


def test_the_image_is_the_installed_ray_within_pyprojects_pins():
    (base,) = re.findall(r"^FROM\s+(\S+)", dockerfile(), re.M)
    match = re.fullmatch(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<major>3)(?P<minor>\d+)-gpu", base)
    assert match, base
    assert match["ray"] == ray.__version__
    assert Version(match["ray"]) in requirement("ray").specifier and "serve" in requirement("ray").extras
    python = Version(f"{match['major']}.{match['minor']}")
    assert python in Requirement(f"python{pyproject()['project']['requires-python']}").specifier
    assert f"{match['ray']}" == rayservice()["spec"]["rayClusterConfig"]["rayVersion"]


def test_the_image_pins_torch_and_copies_the_project_but_no_tests():
    text = dockerfile()
    (torch,) = re.findall(r"^ARG TORCH_VERSION=(\S+)", text, re.M)
    assert Version(torch) in requirement("torch").specifier
    assert f"TORCH_VERSION=${{TORCH_VERSION:-{torch}}}" in (ROOT / "scripts" / "setup").read_text()  # the version the tests run
    assert re.search(r'"torch==\$\{TORCH_VERSION\}" --index-url "https://download.pytorch.org/whl/\$\{TORCH_CUDA\}"', text)
    sources = {src.rstrip("/") for line in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)$", text, re.M) for src in line.split()[:-1]}
    assert sources == {"pyproject.toml", "README.md", "serve_app", "deployments", "cluster"}
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert ignore[0] == "*"  # an allow-list: what is not named stays out of the build context
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert sources <= allowed and not allowed & {"tests", ".venv", "bench_results", "load_tests"}


@pytest.mark.skipif(not SHARED_CRDS.is_dir(), reason="no shared/kuberay/ beside this checkout")
def test_the_copied_crds_are_the_shared_ones():
    for name in ("ray.io_rayservices.yaml", "ray.io_rayclusters.yaml"):
        assert (ROOT / "tests" / "kuberay_crds" / name).read_bytes() == (SHARED_CRDS / name).read_bytes(), name
