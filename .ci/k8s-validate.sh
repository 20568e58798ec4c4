#!/usr/bin/env bash
# Validates the Kubernetes manifests offline (CI has no cluster and no internet):
# - every core object (Deployment, Service, ...) against the schemas of Kubernetes $K8S_VERSION
#   that the PyPI package kubernetes-validate ships, in strict mode (an unknown field fails);
# - the KEDA ScaledObject and TriggerAuthentication against deploy/kubernetes/schemas/, which
#   refer to the same Kubernetes definitions for metadata and the HPA behavior;
# - what the manifests promise together (docs/kubernetes.md): every manifest listed in
#   kustomization.yaml, terminationGracePeriodSeconds above --grace-period, the probes, the
#   security settings, KEDA's protocol http on the worker's queue with a target above the
#   prefetch, references to Secrets/ConfigMaps/Deployment that exist, the connectors' JSON with
#   every ${VAR} they use set, no --job-files;
# - when kubectl is installed, `kubectl kustomize` renders the folder and the result validates.
# Any failure exits 1.
#
# Usage: bash .ci/k8s-validate.sh [FOLDER]        (default: deploy/kubernetes)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-$repo/deploy/kubernetes}
export K8S_VERSION=${K8S_VERSION:-1.33.0}
KUBERNETES_VALIDATE_VERSION=1.37.0

started=$(date +%s%N)
if ! python3 -c "import importlib.metadata as m, jsonschema, yaml
assert m.version('kubernetes-validate') == '$KUBERNETES_VALIDATE_VERSION'" 2>/dev/null; then
    echo "k8s-validate: installing kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
    python3 -m pip install -q "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi
echo "k8s-validate: tools ready in $(( ($(date +%s%N) - started) / 1000000 )) ms"

rendered=
if command -v kubectl >/dev/null 2>&1; then
    rendered=$(mktemp)
    trap 'rm -f "$rendered"' EXIT
    if ! kubectl kustomize "$dir" >"$rendered"; then
        echo "k8s-validate: kubectl kustomize $dir failed" >&2
        exit 1
    fi
else
    echo "k8s-validate: kubectl not installed, the kustomize rendering is not checked"
fi

python3 - "$dir" "$rendered" <<'PY'
import json, os, re, sys, time

import jsonschema
import kubernetes_validate
import referencing
import yaml
from importlib import resources

started = time.monotonic()
folder, rendered = sys.argv[1], sys.argv[2]
k8s_version = os.environ["K8S_VERSION"]
errors = []


def error(where, message):
    errors.append(f"{where}: {message}")
    print(f"k8s-validate: INVALID {where}: {message}", file=sys.stderr)


# ---- KEDA: our schemas, with the Kubernetes definitions kubernetes-validate ships ----------
def k8s_definitions():
    major_minor = ".".join(k8s_version.split(".")[:2])
    base = resources.files("kubernetes_validate") / "kubernetes-json-schema"
    path = base / f"v{major_minor}.0-local-strict" / "_definitions.json"
    if not path.is_file():
        sys.exit(f"k8s-validate: kubernetes-validate has no schemas for Kubernetes {k8s_version}")
    return json.loads(path.read_text())


keda = yaml.safe_load(open(os.path.join(folder, "schemas", "keda.sh-v1alpha1.yaml")))
definitions = k8s_definitions()
registry = referencing.Registry().with_resource(
    definitions["$id"], referencing.Resource.from_contents(definitions))


def validate_keda(doc):
    kind = doc.get("kind")
    if kind not in ("ScaledObject", "TriggerAuthentication") or doc.get("apiVersion") != "keda.sh/v1alpha1":
        raise LookupError(f"no schema for {doc.get('apiVersion')} {kind}")
    schema = dict(keda[kind])
    schema["$defs"] = keda["$defs"]
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    return [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


def validate_core(doc):
    try:
        kubernetes_validate.validate(doc, k8s_version, strict=True)
        return []
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        raise LookupError(e.message)


def validate(where, doc):
    if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
        error(where, "not a Kubernetes object (apiVersion and kind)")
        return
    name = f"{where} {doc['kind']}/{doc.get('metadata', {}).get('name', '?')}"
    try:
        found = validate_keda(doc) if doc["apiVersion"].startswith("keda.sh/") else validate_core(doc)
    except LookupError as e:
        error(name, str(e))
        return
    for message in found:
        error(name, message)
    if not found:
        print(f"k8s-validate: ok {name}")


# ---- the folder: kustomization.yaml lists every manifest, each one validates ----------------
kustomization = yaml.safe_load(open(os.path.join(folder, "kustomization.yaml")))
listed = kustomization.get("resources") or []
present = sorted(f for f in os.listdir(folder)
                 if f.endswith((".yaml", ".yml")) and f != "kustomization.yaml")
for f in sorted(set(present) - set(listed)):
    error(f, "not listed in kustomization.yaml resources")
for f in sorted(set(listed) - set(present)):
    error("kustomization.yaml", f"lists {f}, which does not exist")

objects = []
for f in present:
    try:
        docs = [d for d in yaml.safe_load_all(open(os.path.join(folder, f))) if d is not None]
    except yaml.YAMLError as e:
        error(f, f"not YAML: {e}")
        continue
    for doc in docs:
        validate(f, doc)
        if isinstance(doc, dict):
            objects.append((f, doc))

if rendered:
    docs = [d for d in yaml.safe_load_all(open(rendered)) if d is not None]
    for doc in docs:
        validate("kustomize output", doc)
    print(f"k8s-validate: kubectl kustomize rendered {len(docs)} objects")


# ---- what the manifests promise together ----------------------------------------------------
# Run only on objects that passed their schemas, so a malformed one reports its schema error
# rather than a crash here.
schema_errors = len(errors)


def cross_checks():
    def find(kind, name=None):
        return [d for _, d in objects
                if d.get("kind") == kind and (name is None or d.get("metadata", {}).get("name") == name)]


    def option(args, env, flag, var, default=None):
        """A worker option from its command-line arguments or its MQTT_CONNECTOR_ variable."""
        for i, a in enumerate(args):
            if a == flag and i + 1 < len(args):
                return args[i + 1]
            if a.startswith(flag + "="):
                return a.split("=", 1)[1]
        for e in env:
            if e.get("name") == var and "value" in e:
                return e["value"]
        return default


    deployments = find("Deployment")
    if len(deployments) != 1:
        error("deployment", f"expected one Deployment, found {len(deployments)}")
    else:
        deployment = deployments[0]
        dname = deployment["metadata"]["name"]
        where = f"Deployment/{dname}"
        pod = deployment["spec"]["template"]["spec"]
        labels = deployment["spec"]["template"]["metadata"].get("labels", {})
        containers = pod.get("containers", [])
        worker = containers[0] if containers else {}
        args, env = worker.get("args", []), worker.get("env", [])
        if not args or args[0] != "worker":
            error(where, "the container's args must start with `worker`")

        grace = option(args, env, "--grace-period", "MQTT_CONNECTOR_GRACE_PERIOD", "30")
        termination = pod.get("terminationGracePeriodSeconds", 30)
        if not int(termination) > int(grace):
            error(where, f"terminationGracePeriodSeconds {termination} must be above --grace-period {grace}")

        metrics = option(args, env, "--metrics-addr", "MQTT_CONNECTOR_METRICS_ADDR")
        if metrics is None or not metrics.endswith(":9090"):
            error(where, "the worker must serve its metrics on port 9090 (--metrics-addr)")
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = worker.get(probe, {}).get("httpGet", {})
            if get.get("path") != path or get.get("port") not in ("metrics", 9090):
                error(where, f"{probe} must GET {path} on port 9090")

        if option(args, env, "--job-files", "MQTT_CONNECTOR_JOB_FILES") is not None:
            error(where, "--job-files lets jobs name files on the worker's disk: not in the hardened fleet")
        if not option(args, env, "--allow-broker", "MQTT_CONNECTOR_ALLOW_BROKER"):
            error(where, "--allow-broker (MQTT_CONNECTOR_ALLOW_BROKER) must name the brokers jobs may reach")

        pod_security = pod.get("securityContext", {})
        security = worker.get("securityContext", {})
        for key, want in (("runAsNonRoot", True), ("runAsUser", 10001)):
            if pod_security.get(key) != want and security.get(key) != want:
                error(where, f"securityContext.{key} must be {want}")
        if (pod_security.get("seccompProfile") or security.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            error(where, "seccompProfile must be RuntimeDefault")
        for key, want in (("readOnlyRootFilesystem", True), ("allowPrivilegeEscalation", False)):
            if security.get(key) is not want:
                error(where, f"container securityContext.{key} must be {want}")
        if security.get("capabilities", {}).get("drop") != ["ALL"]:
            error(where, "container capabilities must drop ALL")
        requests = worker.get("resources", {}).get("requests", {})
        limits = worker.get("resources", {}).get("limits", {})
        if "cpu" not in requests or "memory" not in requests or "memory" not in limits:
            error(where, "resources need requests.cpu, requests.memory and limits.memory")

        # Secrets, ConfigMaps and the connectors they carry.
        env_names = {e.get("name") for e in env}
        for e in env:
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                secrets = find("Secret", ref["name"])
                data = {**(secrets[0].get("data") or {}), **(secrets[0].get("stringData") or {})} if secrets else {}
                if ref["key"] not in data:
                    error(where, f"env {e['name']} reads Secret {ref['name']} key {ref['key']}, which is not in the folder")
        mounts = {m["name"]: m["mountPath"] for m in worker.get("volumeMounts", [])}
        connectors_dir = option(args, env, "--connectors", "MQTT_CONNECTOR_CONNECTORS")
        mounted = False
        for volume in pod.get("volumes", []):
            cm = volume.get("configMap")
            if not cm:
                continue
            maps = find("ConfigMap", cm["name"])
            if not maps:
                error(where, f"volume {volume['name']} mounts ConfigMap {cm['name']}, which is not in the folder")
                continue
            if mounts.get(volume["name"]) == connectors_dir:
                mounted = True
                for file, text in (maps[0].get("data") or {}).items():
                    cwhere = f"ConfigMap/{cm['name']} {file}"
                    if not file.endswith(".json"):
                        error(cwhere, "the worker reads only NAME.json files")
                        continue
                    try:
                        connector = json.loads(text)
                    except json.JSONDecodeError as e:
                        error(cwhere, f"not JSON: {e}")
                        continue
                    if not isinstance(connector, dict):
                        error(cwhere, "a connector is one JSON object")
                        continue
                    for var in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text):
                        if var not in env_names:
                            error(cwhere, f"uses ${{{var}}}, which the worker's env does not set")
                    for secret_key in ("password", "private-key"):
                        value = connector.get(secret_key)
                        if isinstance(value, str) and value and not value.startswith("${"):
                            error(cwhere, f"{secret_key} must come from a Secret through ${{ENV}}, not be written here")
        if not mounted:
            error(where, f"no ConfigMap is mounted at the connectors folder {connectors_dir}")

        # Services and the PodDisruptionBudget select the worker's pods.
        def selects(selector):
            return bool(selector) and all(labels.get(k) == v for k, v in selector.items())
        for svc in find("Service"):
            if not selects(svc["spec"].get("selector", {})):
                error(f"Service/{svc['metadata']['name']}", "its selector matches no worker pod")
            if not any(p.get("name") == "metrics" and p.get("port") == 9090 for p in svc["spec"].get("ports", [])):
                error(f"Service/{svc['metadata']['name']}", "must expose port 9090 named metrics")
        pdbs = find("PodDisruptionBudget")
        if not pdbs or not any(selects(p["spec"].get("selector", {}).get("matchLabels", {})) for p in pdbs):
            error(where, "no PodDisruptionBudget selects the worker's pods")

        # KEDA: the worker's queue, over the management API, a target above the prefetch.
        scaled = find("ScaledObject")
        if len(scaled) != 1:
            error("keda", f"expected one ScaledObject, found {len(scaled)}")
        for so in scaled:
            swhere = f"ScaledObject/{so['metadata']['name']}"
            if so["spec"]["scaleTargetRef"]["name"] != dname:
                error(swhere, f"scaleTargetRef names {so['spec']['scaleTargetRef']['name']}, not {dname}")
            if "replicas" in deployment["spec"]:
                error(where, "KEDA owns the replica count: leave spec.replicas out")
            queue = option(args, env, "--queue", "MQTT_CONNECTOR_QUEUE", "mqtt-connector.send")
            prefetch = int(option(args, env, "--prefetch", "MQTT_CONNECTOR_PREFETCH", "256"))
            rabbit = [t for t in so["spec"]["triggers"] if t.get("type") == "rabbitmq"]
            if not rabbit:
                error(swhere, "needs a rabbitmq trigger")
            for t in rabbit:
                m = t.get("metadata", {})
                if m.get("protocol") != "http":
                    error(swhere, "protocol must be http: over amqp KEDA counts only ready jobs and "
                                  "scales workers down in the middle of theirs")
                if m.get("excludeUnacknowledged") == "true":
                    error(swhere, "excludeUnacknowledged would hide the jobs workers hold")
                if m.get("queueName") != queue:
                    error(swhere, f"queueName {m.get('queueName')} is not the worker's queue {queue}")
                if m.get("mode") != "QueueLength":
                    error(swhere, "mode must be QueueLength")
                try:
                    if float(m.get("value", "0")) <= prefetch:
                        error(swhere, f"value {m.get('value')} must be above the worker's prefetch {prefetch}")
                except ValueError:
                    pass  # the schema already said so
                ref = t.get("authenticationRef", {}).get("name")
                auths = find("TriggerAuthentication", ref)
                if not auths:
                    error(swhere, f"authenticationRef {ref} is not a TriggerAuthentication in the folder")
                for auth in auths:
                    params = {r["parameter"]: r for r in auth["spec"].get("secretTargetRef", [])}
                    if "host" not in params and "host" not in m:
                        error(swhere, "the management URL (host) comes from nowhere")
                    for r in params.values():
                        secrets = find("Secret", r["name"])
                        data = {**(secrets[0].get("data") or {}), **(secrets[0].get("stringData") or {})} if secrets else {}
                        if r["key"] not in data:
                            error(f"TriggerAuthentication/{ref}", f"Secret {r['name']} key {r['key']} is not in the folder")


if schema_errors:
    print("k8s-validate: cross-checks skipped until the schema errors are fixed", file=sys.stderr)
else:
    try:
        cross_checks()
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        error("cross-checks", f"an object lacks what they need: {e!r}")

took = time.monotonic() - started
if errors:
    print(f"k8s-validate: {len(errors)} problem(s) in {folder} ({took:.2f} s)", file=sys.stderr)
    sys.exit(1)
print(f"k8s-validate: {len(objects)} objects valid against Kubernetes {k8s_version} and KEDA "
      f"keda.sh/v1alpha1 in {took:.2f} s")
PY
