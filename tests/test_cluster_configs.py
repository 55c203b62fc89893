"""Deployment configs: cluster.yaml against Ray's own cluster-config schema and `ray up`'s checks,
the KubeRay manifests against the fields KubeRay requires, the crontab line, and everything they
point at (job scripts, pipeline specs and their flags, the Serve import path, shared storage, and
whether the GPU recipe fits the clusters they describe). No network, no Ray instance.
"""

from __future__ import annotations

import ast
import copy
import importlib
import json
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from visgen.config import load_spec, validate_section

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAML = ROOT / "cluster.yaml"
RAYJOB_YAML = ROOT / "jobs" / "kuberay" / "rayjob.yaml"
RAYSERVICE_YAML = ROOT / "jobs" / "kuberay" / "rayservice.yaml"
RAYCRONJOB_YAML = ROOT / "jobs" / "schedules" / "raycronjob.yaml"
CRONTAB = ROOT / "jobs" / "schedules" / "crontab.example"
SERVE_YAML = ROOT / "jobs" / "serve.yaml"

# Spec fields of the KubeRay v1 CRDs (ray.io/v1, KubeRay 1.6). An unknown key is a typo that the
# API server would reject (strict field validation) or silently drop.
RAYJOB_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
    "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes", "submissionMode", "submitterConfig",
    "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished"}
RAYSERVICE_FIELDS = {
    "deploymentUnhealthySecondThreshold", "excludeHeadPodFromServeSvc", "rayClusterConfig",
    "rayClusterDeletionDelaySeconds", "serveConfigV2", "serveService", "serviceUnhealthySecondThreshold",
    "upgradeStrategy"}
RAYCRONJOB_FIELDS = {"jobTemplate", "schedule", "suspend"}
RAYCLUSTER_FIELDS = {
    "authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec",
    "headServiceAnnotations", "managedBy", "rayVersion", "suspend", "workerGroupSpecs"}
AUTOSCALER_FIELDS = {
    "env", "envFrom", "idleTimeoutSeconds", "image", "imagePullPolicy", "resources", "securityContext",
    "upscalingMode", "version", "volumeMounts"}
HEAD_GROUP_FIELDS = {"enableIngress", "headService", "labels", "rayStartParams", "resources", "serviceType", "template"}
WORKER_GROUP_FIELDS = {
    "groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas", "numOfHosts", "rayStartParams",
    "replicas", "resources", "scaleStrategy", "suspend", "template"}

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
JOB_COMMAND = re.compile(r"python\s+(jobs/\S+\.py)((?:\s+(?!>)\S+)*)")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _docs(path: Path) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _doc(path: Path, kind: str) -> dict:
    found = [d for d in _docs(path) if d.get("kind") == kind]
    assert len(found) == 1, f"{path.name}: expected one {kind}, found {len(found)}"
    return found[0]


def _cluster() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


def _unknown(obj: dict, allowed: set[str], where: str) -> list[str]:
    return [f"{where}.{k} is not a KubeRay field (allowed: {', '.join(sorted(allowed))})" for k in obj if k not in allowed]


def _pod_problems(template, where: str) -> list[str]:
    if not isinstance(template, dict) or not isinstance(template.get("spec"), dict):
        return [f"{where}.spec is missing"]
    spec = template["spec"]
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        return [f"{where}.spec.containers must be a non-empty list"]
    problems = []
    ray_container = containers[0]  # KubeRay runs Ray in the first container
    if not isinstance(ray_container.get("image"), str) or not ray_container["image"].strip():
        problems.append(f"{where}.spec.containers[0].image is missing")
    if not isinstance(ray_container.get("name"), str) or not DNS_LABEL.match(ray_container["name"]):
        problems.append(f"{where}.spec.containers[0].name {ray_container.get('name')!r} is not a DNS label")
    volumes = {v.get("name") for v in spec.get("volumes") or []}
    for c in containers:
        for m in c.get("volumeMounts") or []:
            if m.get("name") not in volumes:
                problems.append(f"{where}: volumeMount {m.get('name')!r} has no volume in the pod")
    return problems


def _start_params_problems(params, where: str) -> list[str]:
    if params is None:
        return []
    if not isinstance(params, dict):
        return [f"{where}.rayStartParams must be a mapping"]
    # map[string]string in the CRD: an unquoted 0 or true is rejected by the API server.
    return [f"{where}.rayStartParams.{k} = {v!r} must be a string (quote it)"
            for k, v in params.items() if not isinstance(v, str)]


def _ray_cluster_problems(spec, where: str) -> list[str]:
    """What KubeRay requires of a RayClusterSpec (RayJob.rayClusterSpec, RayService.rayClusterConfig)."""
    if not isinstance(spec, dict):
        return [f"{where} is missing"]
    problems = _unknown(spec, RAYCLUSTER_FIELDS, where)
    if "rayVersion" in spec and not isinstance(spec["rayVersion"], str):
        problems.append(f"{where}.rayVersion must be a quoted string, got {spec['rayVersion']!r}")
    problems += _unknown(spec.get("autoscalerOptions") or {}, AUTOSCALER_FIELDS, f"{where}.autoscalerOptions")
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        problems.append(f"{where}.headGroupSpec is missing")
    else:
        problems += _unknown(head, HEAD_GROUP_FIELDS, f"{where}.headGroupSpec")
        problems += _start_params_problems(head.get("rayStartParams"), f"{where}.headGroupSpec")
        problems += _pod_problems(head.get("template"), f"{where}.headGroupSpec.template")
    groups = spec.get("workerGroupSpecs") or []
    names = [g.get("groupName") for g in groups]
    for i, g in enumerate(groups):
        w = f"{where}.workerGroupSpecs[{i}]"
        problems += _unknown(g, WORKER_GROUP_FIELDS, w)
        if not isinstance(g.get("groupName"), str) or not DNS_LABEL.match(g["groupName"]):
            problems.append(f"{w}.groupName {g.get('groupName')!r} is missing or not a DNS label")
        elif names.count(g["groupName"]) > 1:
            problems.append(f"{w}.groupName {g['groupName']!r} is used twice")
        counts = {k: g.get(k) for k in ("replicas", "minReplicas", "maxReplicas")}
        bad = [k for k, v in counts.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0]
        if bad:
            problems.append(f"{w}: {', '.join(bad)} must be set to integers >= 0, got {counts}")
        elif not counts["minReplicas"] <= counts["replicas"] <= counts["maxReplicas"] or counts["maxReplicas"] < 1:
            problems.append(f"{w}: need minReplicas <= replicas <= maxReplicas and maxReplicas >= 1, got {counts}")
        problems += _start_params_problems(g.get("rayStartParams"), w)
        problems += _pod_problems(g.get("template"), f"{w}.template")
    return problems


def _rayjob_problems(spec, where: str) -> list[str]:
    """What KubeRay requires of a RayJob spec (also a RayCronJob's jobTemplate)."""
    if not isinstance(spec, dict):
        return [f"{where} is missing"]
    problems = _unknown(spec, RAYJOB_FIELDS, where)
    if not isinstance(spec.get("entrypoint"), str) or not spec["entrypoint"].strip():
        problems.append(f"{where}.entrypoint is missing")
    if "runtimeEnvYAML" in spec:
        env = yaml.safe_load(spec["runtimeEnvYAML"]) if isinstance(spec["runtimeEnvYAML"], str) else None
        if not isinstance(env, dict):
            problems.append(f"{where}.runtimeEnvYAML must be a YAML mapping in a string")
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    if not isinstance(ttl, int) or ttl < 0:
        problems.append(f"{where}.ttlSecondsAfterFinished must be an integer >= 0, got {ttl!r}")
    if ttl and spec.get("shutdownAfterJobFinishes") is not True:
        problems.append(f"{where}.ttlSecondsAfterFinished only applies with shutdownAfterJobFinishes: true")
    if "clusterSelector" not in spec:
        problems += _ray_cluster_problems(spec.get("rayClusterSpec"), f"{where}.rayClusterSpec")
    return problems


def _manifest_problems(doc: dict, kind: str, spec_fields: set[str]) -> list[str]:
    problems = []
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion is {doc.get('apiVersion')!r}, expected 'ray.io/v1'")
    if doc.get("kind") != kind:
        problems.append(f"kind is {doc.get('kind')!r}, expected {kind!r}")
    name = (doc.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not DNS_LABEL.match(name) or len(name) > 63:
        problems.append(f"metadata.name {name!r} is missing or not a DNS label")
    if not isinstance(doc.get("spec"), dict):
        return problems + ["spec is missing"]
    return problems + _unknown(doc["spec"], spec_fields, "spec")


def _cluster_specs() -> dict[str, dict]:
    """Every RayClusterSpec in the manifests, by where it is."""
    return {
        "rayjob": _doc(RAYJOB_YAML, "RayJob")["spec"]["rayClusterSpec"],
        "rayservice": _doc(RAYSERVICE_YAML, "RayService")["spec"]["rayClusterConfig"],
        "raycronjob": _doc(RAYCRONJOB_YAML, "RayCronJob")["spec"]["jobTemplate"]["rayClusterSpec"],
    }


def _pods(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec.get("workerGroupSpecs", [])]


def _cpu_quantity(q) -> float:
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def _cron_problems(expr: str) -> list[str]:
    """Why ``expr`` is not a standard 5-field cron schedule (empty if it is)."""
    names = {3: "jan feb mar apr may jun jul aug sep oct nov dec".split(), 4: "sun mon tue wed thu fri sat".split()}
    bounds = [(0, 59, "minute"), (0, 23, "hour"), (1, 31, "day of month"), (1, 12, "month"), (0, 7, "day of week")]
    fields = expr.split()
    if len(fields) != 5:
        return [f"{expr!r} has {len(fields)} fields, a cron schedule has 5 (minute hour day month weekday)"]
    problems = []
    for i, (field, (lo, hi, what)) in enumerate(zip(fields, bounds)):
        for item in field.split(","):
            m = re.fullmatch(r"(\*|\w+)(?:-(\w+))?(?:/(\d+))?", item)
            if not m:
                problems.append(f"{what} {item!r} is not a cron field")
                continue
            start, end, step = m.groups()
            values = []
            for v in (start, end):
                if v is None or v == "*":
                    continue
                if v.isdigit():
                    values.append(int(v))
                elif v.lower() in names.get(i, []):
                    values.append(names[i].index(v.lower()) + (1 if i == 3 else 0))
                else:
                    problems.append(f"{what} {v!r} is not a number{' or name' if i in names else ''}")
            if any(not lo <= v <= hi for v in values):
                problems.append(f"{what} {item!r} is outside {lo}-{hi}")
            if (start == "*" and end is not None) or (step is not None and int(step) == 0):
                problems.append(f"{what} {item!r} is malformed")
    return problems


def _job_commands() -> dict[str, str]:
    """Every `python jobs/X.py ...` command the configs run, by where it is."""
    cron_lines = [line for line in CRONTAB.read_text().splitlines() if line.strip() and not line.startswith("#")
                  and not re.match(r"^[A-Za-z_]\w*=", line)]
    commands = {
        "rayjob": _doc(RAYJOB_YAML, "RayJob")["spec"]["entrypoint"],
        "raycronjob": _doc(RAYCRONJOB_YAML, "RayCronJob")["spec"]["jobTemplate"]["entrypoint"],
    }
    for i, line in enumerate(cron_lines):
        m = JOB_COMMAND.search(line)
        assert m, f"crontab line {line!r} runs no `python jobs/X.py`"
        commands[f"crontab[{i}]"] = m.group(0)
    return commands


# ---------------------------------------------------------------------------------------------
# cluster.yaml
# ---------------------------------------------------------------------------------------------


def test_cluster_yaml_matches_rays_own_schema():
    import jsonschema
    import ray

    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    jsonschema.validate(_cluster(), json.loads(schema_path.read_text()))


def test_cluster_yaml_passes_ray_ups_checks():
    """What `ray up` runs before it talks to AWS: merge with the provider defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(_cluster()))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    types, head = prepared["available_node_types"], prepared["head_node_type"]
    assert types[head]["resources"].get("CPU") == 0, "the head should advertise no CPUs so no task lands there"
    gpu = [t for t, v in types.items() if v["resources"].get("GPU", 0) >= 1]
    cpu = [t for t, v in types.items() if t != head and not v["resources"].get("GPU")]
    assert gpu and cpu, f"need GPU worker types (training, token cache) and CPU ones (ingest), have {sorted(types)}"
    for t in gpu + cpu:
        assert 0 <= types[t]["min_workers"] <= types[t]["max_workers"] <= prepared["max_workers"], t
        assert types[t]["max_workers"] >= 1, t
    assert prepared["idle_timeout_minutes"] > 0


def test_cluster_setup_installs_pinned_torch_first_then_the_synced_repo():
    cfg = _cluster()
    setup = cfg["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if re.search(r"pip install .*\btorch==", c))
    project_at = next(i for i, c in enumerate(setup) if re.search(r"pip install .*-e", c))
    assert torch_at < project_at, "torch must be installed before the project so pip keeps that build"
    # Same torch pins as `make setup`.
    make_spec = re.search(r"^TORCH_SPEC \?= (.+)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    assert set(make_spec) <= set(shlex.split(setup[torch_at])), (make_spec, setup[torch_at])
    # The directory pip installs is the one file_mounts syncs the working copy to.
    repo_dirs = [remote for remote, local in cfg["file_mounts"].items() if local == "."]
    assert len(repo_dirs) == 1, f"file_mounts must sync the working copy ('.') once: {cfg['file_mounts']}"
    assert f"cd {repo_dirs[0]} " in setup[project_at], setup[project_at]


def test_cluster_workdir_is_the_efs_mount_on_every_node(monkeypatch):
    cfg = _cluster()
    mount = next(re.search(r"mount -t nfs4 .* (\S+)$", c) for c in cfg["initialization_commands"] if "mount -t nfs4" in c)
    assert mount, "initialization_commands must mount the shared file system"
    mount_point = mount.group(1)
    assert f"--volume {mount_point}:{mount_point}" in cfg["docker"]["run_options"], "the container must see the mount"
    for role in ("head", "worker"):
        start = " ".join(cfg[f"{role}_start_ray_commands"])
        workdir = re.search(r"VISGEN_WORKDIR='([^']+)'", start)
        assert workdir and workdir.group(1).startswith(mount_point + "/"), \
            f"{role}: VISGEN_WORKDIR must be under {mount_point}"
        monkeypatch.setenv("VISGEN_WORKDIR", workdir.group(1))
        for recipe in ("shapes-64-gpu", "shapes-32"):
            spec = load_spec(ROOT / "pipelines" / f"{recipe}.yaml")
            assert Path(spec.workdir) == Path(mount_point) / "visgen" / recipe, spec.workdir


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(0o755)


@pytest.mark.parametrize("external", [False, True])
def test_cluster_start_commands_export_the_environment_ray_inherits(tmp_path, external):
    """Run the real start commands in bash with `ray`, `mlflow`, `hostname` ... stubbed."""
    cfg = _cluster()
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    (home / ".visgen").mkdir(parents=True)
    bin_dir.mkdir()
    env_file = "VISGEN_SERVE_TOKEN=s3cret\n" + ("MLFLOW_TRACKING_URI=https://mlflow.example.com\n" if external else "")
    (home / ".visgen" / "cluster.env").write_text(env_file)
    _stub(bin_dir, "ray", 'echo "RAY $*|$VISGEN_WORKDIR|$MLFLOW_TRACKING_URI|$VISGEN_SERVE_TOKEN"')
    _stub(bin_dir, "mlflow", f'echo "$*" > {tmp_path}/mlflow.args')
    _stub(bin_dir, "python", "exit 1")  # the health probe: no server running yet
    _stub(bin_dir, "mkdir", "exit 0")   # leave the real /mnt alone
    _stub(bin_dir, "hostname", 'echo "10.0.1.23 172.17.0.1"')
    env = {"HOME": str(home), "PATH": f"{bin_dir}:/usr/bin:/bin", "RAY_HEAD_IP": "10.0.1.23"}
    seen = {}
    for role in ("head", "worker"):
        for command in cfg[f"{role}_start_ray_commands"]:
            command = command.replace("/tmp/", f"{tmp_path}/")
            out = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=10)
            assert out.returncode == 0, (role, command, out.stderr)
            for line in out.stdout.splitlines():
                if line.startswith("RAY start"):
                    seen[role] = line.split("|")[1:]
    uri = "https://mlflow.example.com" if external else "http://10.0.1.23:5000"
    for role in ("head", "worker"):
        assert seen.get(role) == ["/mnt/efs/visgen/${name}", uri, "s3cret"], (role, seen)
    args_file = tmp_path / "mlflow.args"
    for _ in range(50):  # started in the background
        if external or args_file.exists():
            break
        time.sleep(0.05)
    if external:
        assert not args_file.exists(), "no local MLflow server when an external one is configured"
    else:
        args = args_file.read_text()
        assert "--host 0.0.0.0 --port 5000" in args and "sqlite:////mnt/efs/" in args, args


def test_gpu_recipe_fits_the_cluster_yaml_nodes():
    cfg = _cluster()
    types, head = cfg["available_node_types"], cfg["head_node_type"]

    def shape(t, count):
        r = types[t]["resources"]
        return (float(r.get("CPU", 0)), float(r.get("GPU", 0)), count)

    at_max = [shape(t, 1 if t == head else types[t]["max_workers"]) for t in types]
    at_min = [shape(t, 1 if t == head else types[t]["min_workers"]) for t in types]
    _assert_recipe_fits(at_max, at_min, "cluster.yaml")


def _assert_recipe_fits(at_max, at_min, where):
    """The GPU recipe's training and token-cache stages resolve to GPUs and fit, both at the
    autoscaler's maximum and with only the always-on nodes up (what visgen sees at job start)."""
    from visgen.data.token_cache import resolve_pool
    from visgen.train.scaling import Capacity, NodeShape, resolve_scaling

    spec = load_spec(ROOT / "pipelines" / "shapes-64-gpu.yaml")
    for shapes, source in ((at_max, "autoscaler max"), (at_min, "live nodes")):
        cap = Capacity(nodes=tuple(NodeShape(c, g, n) for c, g, n in shapes if n > 0), source=source)
        for stage in ("image_tokenizer", "lm"):
            r = resolve_scaling(getattr(spec, stage).scaling, cap)
            assert r.use_gpu and r.gpus_per_worker >= 1, f"{where} ({source}): {stage} would train on CPU: {r.describe()}"
        pool = resolve_pool(spec.token_cache, cap, spec.data.ingest.num_cpus)
        assert pool.use_gpu, f"{where} ({source}): token cache would encode on CPU: {pool.describe()}"


# ---------------------------------------------------------------------------------------------
# KubeRay manifests
# ---------------------------------------------------------------------------------------------


def test_rayjob_has_what_kuberay_requires():
    job = _doc(RAYJOB_YAML, "RayJob")
    problems = _manifest_problems(job, "RayJob", RAYJOB_FIELDS) + _rayjob_problems(job["spec"], "spec")
    assert not problems, "\n".join(problems)
    spec = job["spec"]
    assert spec["entrypoint"].split()[:2] == ["python", "jobs/pipeline.py"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    assert any("nvidia.com/gpu" in (c.get("resources", {}).get("limits") or {})
               for g in spec["rayClusterSpec"]["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]), \
        "the pipeline needs a GPU worker group"


def test_raycronjob_has_what_kuberay_requires():
    cron = _doc(RAYCRONJOB_YAML, "RayCronJob")
    problems = _manifest_problems(cron, "RayCronJob", RAYCRONJOB_FIELDS)
    problems += _cron_problems(str(cron["spec"].get("schedule", "")))
    problems += _rayjob_problems(cron["spec"].get("jobTemplate"), "spec.jobTemplate")
    assert not problems, "\n".join(problems)
    assert cron["spec"]["jobTemplate"]["entrypoint"].split()[:2] == ["python", "jobs/retrain.py"]


def test_rayservice_has_what_kuberay_requires_and_a_valid_serve_config():
    from ray.serve.schema import ServeDeploySchema

    svc = _doc(RAYSERVICE_YAML, "RayService")
    problems = _manifest_problems(svc, "RayService", RAYSERVICE_FIELDS)
    problems += _ray_cluster_problems(svc["spec"].get("rayClusterConfig"), "spec.rayClusterConfig")
    assert not problems, "\n".join(problems)
    assert isinstance(svc["spec"]["serveConfigV2"], str), "serveConfigV2 is a YAML document inside a string"
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_cfg)  # Ray Serve's own schema, as `serve deploy` applies it
    for app in serve_cfg["applications"]:
        for key in ("name", "import_path", "route_prefix"):
            assert app.get(key), f"application {app.get('name')!r} has no {key}"
    head_ports = {p["containerPort"] for p in svc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
                  ["containers"][0].get("ports", [])}
    assert serve_cfg["http_options"]["port"] in head_ports, "the head must expose Serve's HTTP port"


@pytest.mark.parametrize("path", [RAYSERVICE_YAML, SERVE_YAML], ids=["rayservice", "serve.yaml"])
def test_serve_apps_import_and_their_args_validate(path):
    from visgen.serve.config import ServeConfig

    cfg = yaml.safe_load(_doc(path, "RayService")["spec"]["serveConfigV2"]) if path == RAYSERVICE_YAML else _docs(path)[0]
    for app in cfg["applications"]:
        module, _, attr = app["import_path"].partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), app["import_path"]
        args = app.get("args") or {}
        spec = load_spec(ROOT / args["pipeline"])  # relative to the working dir, i.e. the repository
        merged = {**(spec.serve.model_dump() if getattr(spec, "serve", None) else {}), **(args.get("serve") or {})}
        validate_section(ServeConfig, merged, "serve")


def test_rayservice_serves_the_same_app_as_serve_yaml():
    ours = yaml.safe_load(_doc(RAYSERVICE_YAML, "RayService")["spec"]["serveConfigV2"])
    theirs = _docs(SERVE_YAML)[0]
    for key in ("proxy_location", "http_options"):
        assert ours.get(key) == theirs.get(key), key

    def shape(cfg):
        return {a["name"]: (a["route_prefix"], a["import_path"], sorted(a.get("args", {})),
                            {d["name"]: d.get("user_config") for d in a.get("deployments", [])})
                for a in cfg["applications"]}

    assert shape(ours) == shape(theirs)


def test_manifests_agree_on_image_environment_and_shared_storage(monkeypatch):
    specs = _cluster_specs()
    pvcs = {d["metadata"]["name"]: d for d in _docs(RAYJOB_YAML) if d.get("kind") == "PersistentVolumeClaim"}
    versions = {where: spec.get("rayVersion") for where, spec in specs.items()}
    docker_image = _cluster()["docker"]["image"]
    image_ray = re.search(r"ray:(\d+\.\d+\.\d+)", docker_image).group(1)
    assert set(versions.values()) == {image_ray}, f"rayVersion {versions} vs cluster.yaml image {docker_image}"
    images = set()
    for where, spec in specs.items():
        for pod in _pods(spec):
            claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", [])
                      if "persistentVolumeClaim" in v}
            assert set(claims.values()) <= set(pvcs), f"{where}: claims {claims} not defined in {RAYJOB_YAML.name}"
            for c in pod["containers"][:1]:
                images.add(c["image"])
                env = {e["name"]: e for e in c.get("env", [])}
                for name in ("MLFLOW_TRACKING_URI", "VISGEN_SERVE_TOKEN"):
                    assert "secretKeyRef" in env.get(name, {}).get("valueFrom", {}), \
                        f"{where}: {name} must come from a Secret"
                # The workdir is on the PVC, one directory per pipeline.
                mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
                workdir = env["VISGEN_WORKDIR"]["value"]
                on_pvc = [p for p, vol in mounts.items() if vol in claims and workdir.startswith(p.rstrip("/") + "/")]
                assert on_pvc, f"{where}: VISGEN_WORKDIR={workdir} is not on a mounted PVC ({mounts})"
                monkeypatch.setenv("VISGEN_WORKDIR", workdir)
                pipeline = load_spec(ROOT / "pipelines" / "shapes-64-gpu.yaml")
                assert Path(pipeline.workdir) == Path(on_pvc[0]) / "shapes-64-gpu", pipeline.workdir
    assert len(images) == 1, f"one image for every Ray container, found {images}"
    for name, pvc in pvcs.items():
        assert "ReadWriteMany" in pvc["spec"]["accessModes"], f"PVC {name}: every Ray pod mounts it, needs ReadWriteMany"


def test_gpu_recipe_fits_the_kuberay_clusters():
    for where, spec in _cluster_specs().items():
        if where == "rayservice":
            continue  # serves, does not train

        def shape(group, count):
            c = group["template"]["spec"]["containers"][0]
            limits = c.get("resources", {}).get("limits", {})
            cpus = group.get("rayStartParams", {}).get("num-cpus", limits.get("cpu", 0))
            return (_cpu_quantity(cpus), float(limits.get("nvidia.com/gpu", 0)), count)

        head = spec["headGroupSpec"]
        at_max = [shape(head, 1)] + [shape(g, g["maxReplicas"]) for g in spec["workerGroupSpecs"]]
        at_min = [shape(head, 1)] + [shape(g, g["minReplicas"]) for g in spec["workerGroupSpecs"]]
        _assert_recipe_fits(at_max, at_min, where)


# ---------------------------------------------------------------------------------------------
# Entry points and schedules
# ---------------------------------------------------------------------------------------------


def _cli_command(job: Path) -> list[str]:
    """The `visgen` command a job script runs: the constant arguments of its `_entry.run(...)`."""
    for node in ast.walk(ast.parse(job.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "run"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "_entry"):
            return [a.value for a in node.args]
    raise AssertionError(f"{job} does not call _entry.run(...)")


def test_every_job_command_names_an_existing_job_and_spec_with_valid_flags(capsys):
    from visgen.cli import build_parser

    commands = _job_commands()
    assert {"rayjob", "raycronjob"} <= set(commands) and any(k.startswith("crontab") for k in commands)
    for where, command in commands.items():
        argv = shlex.split(command)
        assert argv[0] == "python", (where, command)
        job = ROOT / argv[1]
        assert job.is_file(), f"{where}: {argv[1]} does not exist"
        try:
            args = build_parser().parse_args([*_cli_command(job), *argv[2:]])
        except SystemExit:
            pytest.fail(f"{where}: `{command}` has flags its CLI command rejects: {capsys.readouterr().err}")
        assert getattr(args, "pipeline", None), f"{where}: `{command}` names no --pipeline"
        assert (ROOT / args.pipeline).is_file(), f"{where}: {args.pipeline} does not exist"
        load_spec(ROOT / args.pipeline)


def test_crontab_submits_with_a_deterministic_id_and_logs():
    lines = [line for line in CRONTAB.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assignments = dict(line.split("=", 1) for line in lines if re.match(r"^[A-Za-z_]\w*=", line))
    entries = [line for line in lines if not re.match(r"^[A-Za-z_]\w*=", line)]
    assert "RAY_ADDRESS" in assignments, "cron's environment must name the cluster"
    assert len(entries) == 1, entries
    fields = entries[0].split(None, 5)
    problems = _cron_problems(" ".join(fields[:5]))
    assert not problems, problems
    command = fields[5]
    # cron turns an unescaped % into a newline, which would cut the command short.
    assert not re.search(r"(?<!\\)%", command), "escape every % in a crontab command as \\%"
    assert "ray job submit" in command and "--working-dir ." in command
    sub_id = re.search(r"--submission-id\s+\"?(visgen-retrain-\$\(date[^)]*\))", command)
    assert sub_id and all(f"\\%{c}" in sub_id.group(1) for c in "YmdH"), "the id must name the hour: +\\%Y\\%m\\%d\\%H"
    assert re.search(r">>\s*\S+\s+2>&1\s*$", command), "append stdout and stderr to a log file"


@pytest.mark.parametrize("expr, ok", [
    ("0 3 * * *", True), ("*/15 0-6,22,23 1 jan-mar mon-fri", True), ("0 3 * * 7", True),
    ("0 3 * *", False), ("60 3 * * *", False), ("0 24 * * *", False), ("0 3 0 * *", False),
    ("0 3 * * 8", False), ("0 3 * * fun", False), ("*/0 * * * *", False), ("@daily", False),
])
def test_cron_checker(expr, ok):
    assert (not _cron_problems(expr)) is ok, _cron_problems(expr)


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0].pop("image"), r"containers\[0\]\.image is missing"),
    (lambda s: s["workerGroupSpecs"][0].pop("groupName"), r"groupName None is missing"),
    (lambda s: s["workerGroupSpecs"][0].update(minReplicas=5), r"minReplicas <= replicas <= maxReplicas"),
    (lambda s: s["workerGroupSpecs"][0].pop("maxReplicas"), r"must be set to integers"),
    (lambda s: s["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), r"must be a string"),
    (lambda s: s.update(workerGroupSpec=[]), r"workerGroupSpec is not a KubeRay field"),
    (lambda s: s["workerGroupSpecs"].append(copy.deepcopy(s["workerGroupSpecs"][0])), r"is used twice"),
])
def test_cluster_spec_checker_catches_broken_specs(mutate, message):
    spec = copy.deepcopy(_cluster_specs()["rayjob"])
    mutate(spec)
    assert re.search(message, "\n".join(_ray_cluster_problems(spec, "spec")))


def test_rayjob_checker_catches_a_missing_entrypoint_and_a_typo():
    spec = copy.deepcopy(_doc(RAYJOB_YAML, "RayJob")["spec"])
    spec.pop("entrypoint")
    spec["shutdownAfterJobFinish"] = True
    problems = "\n".join(_rayjob_problems(spec, "spec"))
    assert "entrypoint is missing" in problems and "shutdownAfterJobFinish is not a KubeRay field" in problems


def test_serve_yaml_passes_ray_serves_own_config_schema():
    from ray.serve.schema import ServeDeploySchema

    cfg = _docs(SERVE_YAML)[0]
    ServeDeploySchema.model_validate(cfg) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(cfg)
    assert "working_dir" not in (cfg["applications"][0].get("runtime_env") or {}), \
        "Serve configs accept only remote or local:// working_dir URIs"
