"""The cluster configs: ray_cluster.yaml (Ray cluster launcher, AWS), deploy/kuberay-rayjob.yaml (KubeRay) and the
commands docs/CLUSTER.md tells users to run against them.

ray_cluster.yaml goes through what ``ray up`` does before it contacts the cloud: Ray's ``prepare_config`` (defaults
from ray/autoscaler/aws/defaults.yaml, setup-command merge, Docker checks, per-type worker counts) and
``validate_config`` (jsonschema against ray/autoscaler/ray-schema.json plus Ray's cross-field checks). It stops short
of ``bootstrap_config``, the step that calls AWS (IAM, VPC, key pairs); sockets are blocked during validation so an
accidental cloud call fails the test instead of leaving the machine. Then what the schema cannot see: the GPU type
has GPUs, worker counts, referenced node types exist, images match the project's Ray/Python pins, the setup commands
install the project the way the Makefile does, the shared mount, token authentication, and the paths and worker
counts that the docs pass to the pipelines. Plain file parsing: well under a second after Ray's import.
"""
from __future__ import annotations

import copy
import json
import re
import shlex
import socket
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the cluster configs (it comes with ray[default])")
jsonschema = pytest.importorskip(
    "jsonschema", reason="jsonschema is needed for Ray's cluster-config validation (it comes with ray[default])")
ray_util = pytest.importorskip(
    "ray.autoscaler._private.util",
    reason="Ray's cluster launcher code (ray[default]) is needed to validate ray_cluster.yaml")

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the project runs on 3.11, pyproject allows 3.10
    tomllib = pytest.importorskip("tomli", reason="tomllib/tomli is needed to read pyproject.toml")

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "ray_cluster.yaml"
KUBERAY_YAML = ROOT / "deploy" / "kuberay-rayjob.yaml"
DOCS = ROOT / "docs" / "CLUSTER.md"
SHARED = "/mnt/shared"  # the shared file system every node sees
DATASETS = {"digits_lt", "mnist_lt", "cifar10_lt", "cifar100_lt", "imagenet_lt", "newsgroups_lt"}
# Flags naming files or folders that the driver or the training workers open: on a cluster, shared paths only.
PATH_FLAGS = ("--out", "--data-root", "--train-list", "--val-list", "--test-list")
PROJECT_DIR = "/home/ray/cact"  # where the nodes keep the editable install

# vCPUs and GPUs of the instance types the comments suggest: resources must follow an InstanceType change.
INSTANCES = {
    "m5.xlarge": (4, 0), "m5.2xlarge": (8, 0), "m5.4xlarge": (16, 0), "m6i.2xlarge": (8, 0), "m6i.4xlarge": (16, 0),
    "g5.xlarge": (4, 1), "g5.2xlarge": (8, 1), "g5.4xlarge": (16, 1), "g5.8xlarge": (32, 1),
    "g5.12xlarge": (48, 4), "g5.24xlarge": (96, 4), "g5.48xlarge": (192, 8),
    "g6.xlarge": (4, 1), "g6.12xlarge": (48, 4), "g6e.xlarge": (4, 1), "g6e.12xlarge": (48, 4),
    "p4d.24xlarge": (96, 8), "p5.48xlarge": (192, 8),
}


# ----------------------------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection (an AWS call, a Docker Hub lookup) raises instead of leaving the machine."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access during cluster-config validation: {args[1:] or kwargs}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    """ray_cluster.yaml as `ray up` sees it after prepare_config (defaults merged, setup commands merged)."""
    return ray_util.prepare_config(copy.deepcopy(raw))


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pin(name: str) -> str:
    """The known-good version of ``name``: pinned with == by the Makefile's install (pyproject asks for ranges)."""
    m = re.search(rf"(?<![\w-]){re.escape(name)}(\[[^\]]*\])?==([\w.+]+)", (ROOT / "Makefile").read_text())
    if m:
        return m.group(2)
    raise AssertionError(f"the Makefile pins no {name}==...")


def _makefile_install() -> dict:
    """The install steps of the Makefile: torch pins, torchsort pin, project install flags."""
    text = (ROOT / "Makefile").read_text()
    torch = re.search(r"install -q (torch==\S+ torchvision==\S+)", text)
    torchsort = re.search(r"--no-build-isolation (torchsort==\S+)", text)
    project = re.search(r"install -q (--no-build-isolation -e) ", text)
    python = re.search(r"^PYTHON\s*\?=\s*python(\d)\.(\d+)", text, re.M)
    assert torch and torchsort and project and python, "Makefile install steps changed: update this test"
    return {"torch": torch.group(1), "torchsort": torchsort.group(1), "project": project.group(1),
            "py_tag": f"py{python.group(1)}{python.group(2)}"}


def _gpu_types(config: dict) -> dict:
    return {name: t for name, t in config["available_node_types"].items() if t.get("resources", {}).get("GPU", 0) > 0}


def _node_image(config: dict, name: str) -> str:
    """The Docker image a node type runs (node-level worker_image over global worker_image/head_image over image)."""
    docker = config.get("docker", {})
    if name == config["head_node_type"]:
        return docker.get("head_image", docker.get("image"))
    return (config["available_node_types"][name].get("docker", {}).get("worker_image")
            or docker.get("worker_image", docker.get("image")))


def _min_gpus(config: dict) -> int:
    """GPUs the cluster has with every node type at its min_workers (what exists when a job starts)."""
    return sum(t.get("min_workers", 0) * t["resources"].get("GPU", 0) for t in config["available_node_types"].values())


def _shell_blocks(markdown: str) -> list[str]:
    return [body for lang, body in re.findall(r"```([a-zA-Z]*)\n(.*?)```", markdown, re.S) if lang in ("bash", "sh")]


def _commands(markdown: str) -> list[list[str]]:
    """Commands of the docs' bash blocks: continuation lines joined, comments dropped, split with shlex."""
    out = []
    for block in _shell_blocks(markdown):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(shlex.split(line, comments=True))
    return out


def _flags(tokens: list[str]) -> dict:
    """--flag value / --flag pairs of a command (flags without a value map to True)."""
    flags = {}
    for i, tok in enumerate(tokens):
        if tok.startswith("--"):
            key, eq, val = tok.partition("=")
            if eq:
                flags[key] = val
            elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                flags[key] = tokens[i + 1]
            else:
                flags[key] = True
    return flags


def _pipeline_calls(tokens: list[str]) -> list[tuple[str, dict]]:
    """(dataset script, its flags) for every `pipelines/<name>.py` invocation in a command."""
    calls = []
    for i, tok in enumerate(tokens):
        m = re.search(r"pipelines/(\w+)\.py$", tok)
        if m:
            calls.append((m.group(1), _flags(tokens[i + 1:])))
    return calls


def _docs_pipeline_calls() -> list[tuple[str, dict, list[str]]]:
    calls = []
    for tokens in _commands(DOCS.read_text()):
        calls += [(name, flags, tokens) for name, flags in _pipeline_calls(tokens)]
    assert calls, "docs/CLUSTER.md shows no pipeline command"
    return calls


def _kuberay() -> tuple[dict, list[dict]]:
    docs = [d for d in yaml.safe_load_all(KUBERAY_YAML.read_text()) if d]
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    assert len(jobs) == 1, "deploy/kuberay-rayjob.yaml should hold exactly one RayJob"
    return jobs[0], docs


# ----------------------------------------------------------------------------------------------------------------
# ray_cluster.yaml: Ray's own validation


def test_cluster_yaml_passes_rays_schema_and_checks(raw, no_network):
    # The file itself is schema-valid (the schema forbids unknown keys, so a typo fails here) ...
    schema = json.loads((Path(ray_util.ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)
    # ... and so is what `ray up` builds from it, with Ray's cross-field checks (head type exists, sum of
    # min_workers <= max_workers, Docker container name and image).
    config = ray_util.prepare_config(copy.deepcopy(raw))
    ray_util.validate_config(config)
    assert config["provider"]["type"] == "aws"


@pytest.mark.parametrize("breakage", ["unknown_key", "min_over_max", "bad_head"])
def test_validation_has_teeth(raw, no_network, breakage):
    """The same calls reject a broken copy: the check above is not vacuous."""
    bad = copy.deepcopy(raw)
    gpu = next(iter(_gpu_types(bad).values()))
    if breakage == "unknown_key":
        bad["max_worker"] = 3  # typo of max_workers
        with pytest.raises(jsonschema.ValidationError):
            ray_util.validate_config(ray_util.prepare_config(bad))
    elif breakage == "min_over_max":
        gpu["min_workers"] = bad["max_workers"] + 1
        with pytest.raises(ValueError, match="max_workers"):
            ray_util.validate_config(ray_util.prepare_config(bad))
    else:
        bad["head_node_type"] = "no_such_type"
        with pytest.raises(ValueError, match="head_node_type"):
            ray_util.validate_config(ray_util.prepare_config(bad))


# ----------------------------------------------------------------------------------------------------------------
# ray_cluster.yaml: what the schema does not check


def test_node_types_head_cpu_and_gpu_workers(raw):
    types = raw["available_node_types"]
    head = raw["head_node_type"]
    assert head in types, f"head_node_type {head!r} is not one of {sorted(types)}"
    assert types[head]["resources"].get("GPU", 0) == 0, "the head is the CPU node type"
    assert types[head].get("max_workers", 0) == 0 and types[head].get("min_workers", 0) == 0
    gpu = _gpu_types(raw)
    assert gpu, "no worker type declares GPU resources"
    for name, t in types.items():
        if name == head:
            continue
        assert 0 <= t.get("min_workers", 0) <= t.get("max_workers", raw["max_workers"]) <= raw["max_workers"], name
        assert t["resources"].get("CPU", 0) >= 1, f"{name}: declare its CPUs"
    assert sum(t.get("min_workers", 0) for t in types.values()) <= raw["max_workers"]


def test_resources_match_instance_types(raw):
    for name, t in raw["available_node_types"].items():
        itype = t["node_config"]["InstanceType"]
        if itype not in INSTANCES:
            continue  # an instance type this table does not know: only the generic checks apply
        cpus, gpus = INSTANCES[itype]
        assert t["resources"].get("CPU") == cpus, f"{name}: {itype} has {cpus} vCPUs"
        assert t["resources"].get("GPU", 0) == gpus, f"{name}: {itype} has {gpus} GPUs"


def test_node_configs_have_image_and_disk(raw):
    for name, t in raw["available_node_types"].items():
        nc = t["node_config"]
        assert nc.get("ImageId"), f"{name}: set an AMI (Ray's default AMI is an old CUDA 11 Deep Learning AMI)"
        sizes = [m["Ebs"]["VolumeSize"] for m in nc.get("BlockDeviceMappings", []) if "Ebs" in m]
        assert sizes and max(sizes) >= 100, f"{name}: the images and torch need a root volume of 100 GB or more"


def test_images_match_project_pins(raw):
    ray_pin, py_tag = _pin("ray"), _makefile_install()["py_tag"]
    assert raw["docker"].get("container_name"), "Docker mode needs a container name"
    for name in raw["available_node_types"]:
        image = _node_image(raw, name)
        assert image, f"{name}: no Docker image"
        m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-(py\d+)-(\w+)", image)
        assert m, f"{name}: {image!r} is not a rayproject/ray:<version>-<python>-<platform> image"
        assert m.group(1) == ray_pin, f"{name}: image Ray {m.group(1)} but the Makefile pins ray=={ray_pin}"
        assert m.group(2) == py_tag, f"{name}: image Python {m.group(2)} but the Makefile uses {py_tag}"
        if name in _gpu_types(raw):
            assert m.group(3) == "gpu" or m.group(3).startswith("cu"), f"{name}: GPU nodes need a CUDA image"


def test_setup_commands_install_like_the_makefile(prepared):
    make = _makefile_install()
    assert make["torch"] == f"torch=={_pin('torch')} torchvision=={_pin('torchvision')}"
    assert make["torchsort"] == f"torchsort=={_pin('torchsort')}"
    for key in ("head_setup_commands", "worker_setup_commands"):  # setup_commands merged in by prepare_config
        cmds = prepared[key]
        where = {step: [i for i, c in enumerate(cmds) if needle in c]
                 for step, needle in (("torch", make["torch"]), ("torchsort", make["torchsort"]),
                                      ("project", make["project"] + " ."))}
        assert all(where.values()), f"{key}: missing install step(s) {[s for s, i in where.items() if not i]}"
        assert where["torch"][0] < where["torchsort"][0] < where["project"][0], f"{key}: torch, torchsort, project"
        # Every pip install of torchsort compiles against the installed torch.
        for line in "\n".join(cmds[i] for i in where["torchsort"]).splitlines():
            if "pip install" in line and make["torchsort"] in line:
                assert "--no-build-isolation" in line, line
        torchsort_step = cmds[where["torchsort"][0]]
        assert "TORCH_CUDA_ARCH_LIST" in torchsort_step and "CUDA_HOME" in torchsort_step
        project_step = cmds[where["project"][0]]
        assert f"cd {PROJECT_DIR} " in project_step, "the editable install runs in the mounted project folder"


def test_project_is_mounted_where_it_is_installed(raw):
    mounts = raw["file_mounts"]
    pkgs = _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    needed = ["pyproject.toml", _pyproject()["project"]["readme"]] + [p.rstrip("*") for p in pkgs]
    for rel in needed:
        remote = f"{PROJECT_DIR}/{rel}"
        assert remote in mounts, f"file_mounts lacks {remote} (needed by the editable install)"
        local = (ROOT / mounts[remote]).resolve()
        assert local == (ROOT / rel).resolve(), f"{remote} should come from ./{rel}"
    assert not any(Path(v).resolve() == ROOT for v in mounts.values() if not v.startswith("~")), \
        "do not mount the whole checkout: `ray up` hashes every file under it (.venv included)"


def test_shared_storage_mounted_on_every_node(raw):
    init = "\n".join(raw["initialization_commands"])
    assert re.search(rf"mount -t nfs4 .*{SHARED}", init), "initialization_commands should mount EFS at /mnt/shared"
    m = re.search(r"\.efs\.([a-z0-9-]+)\.amazonaws\.com", init)
    assert m and m.group(1) == raw["provider"]["region"], "the EFS host's region must be provider.region"
    run_options = " ".join(raw["docker"].get("run_options", []))
    assert f"-v {SHARED}:{SHARED}" in run_options, "the container must see the host's /mnt/shared"
    for name, t in raw["available_node_types"].items():  # no node type drops the global initialization
        assert "initialization_commands" not in t, f"{name} overrides initialization_commands: no shared mount"


def test_token_authentication(raw):
    head = " ".join(raw["head_start_ray_commands"])
    worker = " ".join(raw["worker_start_ray_commands"])
    for cmds in (head, worker):
        assert "RAY_AUTH_MODE=token ray start" in cmds, "every node starts Ray in token mode"
    assert raw["file_mounts"].get("/home/ray/.ray/auth_token") == "~/.ray/auth_token", \
        "the token reaches every node at Ray's default path"
    port = re.search(r"ray start --head [^;]*--port=(\d+)", head).group(1)
    assert f"--address=$RAY_HEAD_IP:{port}" in worker, "workers join the head's GCS port"
    assert "--dashboard-host=0.0.0.0" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head


# ----------------------------------------------------------------------------------------------------------------
# docs/CLUSTER.md: the commands it tells users to run


def test_docs_launch_and_submit_commands():
    text = DOCS.read_text()
    for needle in ("ray up ray_cluster.yaml", "ray attach ray_cluster.yaml", "ray dashboard ray_cluster.yaml",
                   "ray down ray_cluster.yaml", "ray get-auth-token --generate", "RAY_AUTH_MODE=token",
                   "kubectl apply -f deploy/kuberay-rayjob.yaml"):
        assert needle in text, f"docs/CLUSTER.md should show `{needle}`"
    submits = [t for t in _commands(text) if t[:3] == ["ray", "job", "submit"]]
    assert submits, "docs/CLUSTER.md shows no `ray job submit`"
    for tokens in submits:
        flags = _flags(tokens[:tokens.index("--")] if "--" in tokens else tokens)
        assert str(flags.get("--address", "")).endswith(":8265"), f"submit to the Jobs API port: {shlex.join(tokens)}"
        assert flags.get("--working-dir") == ".", f"submit the checkout: {shlex.join(tokens)}"


def test_docs_pipeline_paths_are_on_shared_storage():
    """Data are read by path on every node: the docs pass shared paths for them, and for the run folder either
    a shared path or an S3 URI (then the docs and ray_cluster.yaml must say how the workers get credentials)."""
    cluster_text = CLUSTER_YAML.read_text()
    for name, flags, tokens in _docs_pipeline_calls():
        cmd = shlex.join(tokens)
        assert name in DATASETS, f"unknown pipeline {name}: {cmd}"
        assert "--out" in flags, f"pass --out on shared storage (the default is a local folder): {cmd}"
        for flag in PATH_FLAGS:
            if flag in flags and not (flag == "--out" and str(flags[flag]).startswith("s3://")):
                assert str(flags[flag]).startswith(SHARED + "/"), f"{flag} must be under {SHARED}: {cmd}"
        for storage in (flags.get("--storage-path"), flags.get("--out")):
            if storage is None:
                continue
            assert storage.startswith(SHARED + "/") or storage.startswith("s3://"), f"--storage-path: {cmd}"
            if storage.startswith("s3://"):
                assert "IamInstanceProfile" in cluster_text and "IamInstanceProfile" in DOCS.read_text(), \
                    "S3 checkpoints need worker credentials: the docs and ray_cluster.yaml must say how"


def test_docs_gpu_worker_counts_fit_the_cluster(raw):
    """stages.train refuses more GPU workers than the cluster has GPUs when the job starts (min_workers)."""
    gpus = _min_gpus(raw)
    for name, flags, tokens in _docs_pipeline_calls():
        if flags.get("--use-gpu") and "kubectl" not in tokens:
            n = int(flags.get("--num-workers", 1))
            assert n <= gpus, f"{shlex.join(tokens)}: {n} GPU workers but ray_cluster.yaml starts with {gpus} GPUs"


def test_docs_flags_exist_in_the_pipelines():
    """Once the pipelines exist, every flag the docs pass is one they define."""
    sources = list((ROOT / "pipelines").glob("*.py"))
    calls = [(n, f, t) for n, f, t in _docs_pipeline_calls() if (ROOT / "pipelines" / f"{n}.py").is_file()]
    if not calls:
        pytest.skip("pipelines/<dataset>_lt.py not written yet: the docs' flags are checked once they exist")
    text = "\n".join(p.read_text() for p in sources)
    for name, flags, tokens in calls:
        for flag in flags:
            assert f'"{flag}"' in text or f"'{flag}'" in text, f"pipelines define no {flag}: {shlex.join(tokens)}"


# ----------------------------------------------------------------------------------------------------------------
# deploy/kuberay-rayjob.yaml


def test_kuberay_rayjob_structure():
    job, docs = _kuberay()
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    calls = _pipeline_calls(shlex.split(spec["entrypoint"]))
    assert len(calls) == 1 and calls[0][0] in DATASETS, f"entrypoint runs no pipeline: {spec['entrypoint']!r}"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == _pin("ray")
    assert cluster.get("authOptions", {}).get("mode") == "token"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] and {p["containerPort"] for p in head["ports"]} >= {6379, 8265}
    images = {head["image"]}
    gpu_total = 0
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        for c in group["template"]["spec"]["containers"]:
            images.add(c["image"])
            limits, requests = c["resources"]["limits"], c["resources"].get("requests", {})
            if "nvidia.com/gpu" in limits:
                # Kubernetes requires GPU requests (if given) to equal the limits.
                assert requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"]) == limits["nvidia.com/gpu"]
                gpu_total += group["minReplicas"] * int(limits["nvidia.com/gpu"])
    assert gpu_total > 0, "no worker group requests nvidia.com/gpu"
    assert len(images) == 1, f"head and workers should run the same image: {images}"
    flags = calls[0][1]
    if flags.get("--use-gpu"):
        assert int(flags.get("--num-workers", 1)) <= gpu_total, "more GPU workers than the worker groups' GPUs"


def test_kuberay_shared_volume_everywhere():
    job, docs = _kuberay()
    cluster = job["spec"]["rayClusterSpec"]
    claims = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "PersistentVolumeClaim"}
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for tpl in templates:
        volumes = {v["name"]: v for v in tpl["spec"]["volumes"]}
        for c in tpl["spec"]["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert SHARED in mounts, f"{c['name']} does not mount {SHARED}"
            claim = volumes[mounts[SHARED]]["persistentVolumeClaim"]["claimName"]
            assert claim in claims, f"{c['name']}: PVC {claim} is not defined in the file"
            assert "ReadWriteMany" in claims[claim]["spec"]["accessModes"], "every pod mounts it: ReadWriteMany"
    flags = _pipeline_calls(shlex.split(job["spec"]["entrypoint"]))[0][1]
    assert "--out" in flags and "--data-root" in flags, "the entrypoint names its data and run folder"
    for flag in PATH_FLAGS:
        if flag in flags:
            assert str(flags[flag]).startswith(SHARED + "/"), f"entrypoint {flag} must be under {SHARED}"
    storage = flags.get("--storage-path")
    assert storage is None or storage.startswith(SHARED + "/") or storage.startswith("s3://")
