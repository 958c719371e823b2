"""Deployment files checked without a Docker engine or a cluster (docker/, deploy/, LLaDA-8B presets).

What a cluster would reject at start-up (a schema error, an image or preset that does not exist, a
resource no node offers, a Dockerfile with its own version list) fails here instead. The last test
submits a job to a real local Ray head with `ray job submit --runtime-env deploy/runtime_env.yaml`.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PRESETS = ["llada8b_gsm8k", "llada8b_countdown"]
FAMILY_PRESETS = {"dream7b_gsm8k": "dream-7b", "sdar8b_gsm8k": "sdar-8b", "llada2mini_gsm8k": "llada2-mini"}  # the public shape each decodes
# Dockerfile -> the image tag deploy/README.md builds from it; manifests may only name these.
IMAGES = {"docker/Dockerfile": "unmask:gpu", "docker/Dockerfile.cpu": "unmask:cpu"}
# CLI subcommands the README documents that the driver (issue 7) has not grown yet; they are parsed
# as soon as `driver.cli` knows them.
PENDING_SUBCOMMANDS = {"scale"}
PLACEHOLDER = "PLACEHOLDER"


def _yaml(path: Path):
    return yaml.safe_load(path.read_text())


def _cluster() -> dict:
    return _yaml(DEPLOY / "cluster.yaml")


def _rayjob() -> dict:
    return _yaml(DEPLOY / "rayjob.yaml")


def _worker_groups() -> dict[str, dict]:
    return {g["groupName"]: g for g in _rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"]}


def _group_custom_resources(group: dict) -> dict[str, float]:
    """KubeRay's `resources` start param is a JSON object quoted once more for the shell."""
    raw = group["rayStartParams"].get("resources")
    return json.loads(json.loads(raw)) if raw else {}


def _group_gpus(group: dict) -> int:
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    return int(limits.get("nvidia.com/gpu", 0))


def _load_preset(name: str):
    from common.config import load_config

    return load_config(name)


# --- every file parses ---------------------------------------------------------------------------


def test_every_deploy_yaml_and_preset_parses():
    files = sorted(DEPLOY.glob("*.yaml")) + [REPO / "configs" / f"{p}.yaml" for p in PRESETS]
    assert {f.name for f in files} >= {"runtime_env.yaml", "cluster.yaml", "rayjob.yaml"}
    for f in files:
        assert isinstance(_yaml(f), dict), f
    assert isinstance(yaml.safe_load(_rayjob()["spec"]["runtimeEnvYAML"]), dict)


@pytest.mark.parametrize("name", PRESETS)
def test_llada8b_presets_validate_for_gpu_rl(name):
    cfg = _load_preset(name)
    assert cfg.model.path == "/models/LLaDA-8B-Instruct" and cfg.model.dtype == "bfloat16"
    assert cfg.task.prompt_style == "chat"
    assert cfg.sampler.temperature > 0, "policy-gradient rollouts must sample"
    # The AGRPO release's decoding (probablyabot/agrpo): 384 tokens, blocks of 12, 128 steps.
    assert (cfg.sampler.gen_length, cfg.sampler.block_length, cfg.sampler.steps) == (384, 12, 128)
    assert cfg.rollout.group_size == 8 and cfg.rollout.num_gpus_per_worker >= 1
    assert cfg.learner.lora.enabled and cfg.learner.lora.r == 64 and cfg.learner.lr == 5e-6
    assert cfg.learner.num_gpus_per_rank >= 1 and cfg.learner.backend == "nccl"
    assert cfg.learner.weight_transport == "nccl"
    assert cfg.algorithm.name == "agrpo" and cfg.algorithm.k_steps == 24


@pytest.mark.parametrize("name", list(FAMILY_PRESETS))
def test_the_other_families_gpu_presets_decode_as_their_family_requires(name):
    from common.model import family_of, preset_config

    cfg = _load_preset(name)
    config = preset_config(FAMILY_PRESETS[name])  # the checkpoint's config.json is not here: its public shape
    family_of(config).check_sampler(cfg.sampler, config)
    assert cfg.sampler.temperature > 0 and cfg.task.name == "gsm8k" and cfg.task.prompt_style == "chat"
    assert cfg.learner.lora.enabled and cfg.learner.num_gpus_per_rank >= 1 and cfg.rollout.num_gpus_per_worker >= 1


# --- the manifests: schema, resources, images --------------------------------------------------


def test_cluster_yaml_passes_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_cluster()))


def test_cluster_node_types_separate_learner_and_rollout():
    cluster = _cluster()
    types = cluster["available_node_types"]
    assert set(types) == {"head", "learner", "rollout"} and cluster["head_node_type"] == "head"
    assert types["head"]["resources"].get("GPU") == 0
    for name in ("learner", "rollout"):
        res = types[name]["resources"]
        # One unit of the custom resource per GPU, and only on its own node type.
        assert res[name] == res["GPU"] >= 1
        other = {"learner": "rollout", "rollout": "learner"}[name]
        assert other not in res
    assert types["learner"]["min_workers"] == types["learner"]["max_workers"] == 1
    assert types["rollout"]["max_workers"] > types["rollout"]["min_workers"]
    assert cluster["max_workers"] >= types["learner"]["max_workers"] + types["rollout"]["max_workers"]
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "--num-gpus=0" in head_start


def test_rayjob_has_the_same_two_worker_groups():
    job = _rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]["rayClusterSpec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    groups = _worker_groups()
    assert set(groups) == {"learner", "rollout"}
    cluster_types = _cluster()["available_node_types"]
    for name, group in groups.items():
        # rayStartParams are strings; GPUs agree between Ray, the pod limits and the custom resource.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), name
        gpus = _group_gpus(group)
        assert int(group["rayStartParams"]["num-gpus"]) == gpus >= 1
        assert _group_custom_resources(group) == {name: gpus}
        assert gpus == cluster_types[name]["resources"]["GPU"], f"{name}: GPUs per node differ between manifests"
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert groups["learner"]["minReplicas"] == groups["learner"]["maxReplicas"] == 1
    assert groups["rollout"]["maxReplicas"] == cluster_types["rollout"]["max_workers"]
    assert groups["rollout"]["minReplicas"] == cluster_types["rollout"]["min_workers"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_fit_the_manifests_nodes(name):
    cfg = _load_preset(name)
    types = _cluster()["available_node_types"]
    learner_gpus = cfg.learner.num_ranks * cfg.learner.num_gpus_per_rank
    assert learner_gpus <= types["learner"]["resources"]["GPU"], "the learner group must fit its one node"
    assert cfg.learner.num_ranks * cfg.learner.num_cpus_per_rank <= types["learner"]["resources"]["CPU"]
    rollout = types["rollout"]["resources"]
    assert cfg.rollout.num_gpus_per_worker <= rollout["GPU"]
    assert cfg.rollout.num_cpus_per_worker <= rollout["CPU"]
    per_node = rollout["GPU"] // cfg.rollout.num_gpus_per_worker
    assert cfg.rollout.num_workers <= per_node * types["rollout"]["max_workers"]
    # Each side asks for its own node type's custom resource, so neither lands on the other's GPUs.
    assert cfg.learner.resources == {"learner": 1.0} and cfg.rollout.resources == {"rollout": 1.0}
    assert cfg.learner.num_ranks * cfg.learner.resources["learner"] <= types["learner"]["resources"]["learner"]
    # The paths the presets read and write are the ones both manifests mount.
    mounts = " ".join(_cluster()["docker"]["run_options"])
    pod_mounts = {m["mountPath"] for g in _worker_groups().values()
                  for m in g["template"]["spec"]["containers"][0]["volumeMounts"]}
    head = _rayjob()["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head_mounts = {m["mountPath"] for m in head["volumeMounts"]}
    assert cfg.task.data_dir is None  # the presets read the data shipped in the package
    for path in ("/" + cfg.model.path.split("/")[1], cfg.run.root):
        assert f":{path}" in mounts, f"cluster.yaml does not mount {path}"
        assert path in pod_mounts and path in head_mounts, f"rayjob.yaml does not mount {path}"


def _manifest_images() -> list[str]:
    images = [_cluster()["docker"]["image"]]
    spec = _rayjob()["spec"]["rayClusterSpec"]
    for pod in [spec["headGroupSpec"]] + spec["workerGroupSpecs"]:
        images += [c["image"] for c in pod["template"]["spec"]["containers"]]
    return images


def test_manifests_name_only_the_image_the_repo_builds():
    for image in _manifest_images():
        assert image.rsplit("/", 1)[-1] == IMAGES["docker/Dockerfile"], image
    readme = (DEPLOY / "README.md").read_text()
    for dockerfile, tag in IMAGES.items():
        assert (REPO / dockerfile).is_file()
        assert f"docker build -f {dockerfile} -t {tag} ." in readme


# --- entrypoints: every documented command parses and names a real preset ---------------------


def _driver_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after the program) for each `python -m driver ...` / `unmask ...` command."""
    texts = {
        "rayjob.yaml": _rayjob()["spec"]["entrypoint"],
        "README.md": (DEPLOY / "README.md").read_text(),
        "cluster.yaml": (DEPLOY / "cluster.yaml").read_text(),
        "runtime_env.yaml": (DEPLOY / "runtime_env.yaml").read_text(),
    }
    found = []
    for where, text in texts.items():
        text = text.replace("\\\n", " ")
        for match in re.finditer(r"(?:python -m driver|(?<![\w-])unmask) ([^\n`|#]*)", text):
            # `<preset>`-style placeholders stand for any value; they parse but are not resolved.
            argv = shlex.split(re.sub(r"<[^>]*>", PLACEHOLDER, match.group(1)))
            if argv and argv[0] in {"train", "config", "eval", "scale", "stop"}:
                found.append((where, argv))
    return found


def test_every_documented_driver_command_parses_and_resolves():
    from common.config import load_config
    from driver.cli import build_parser

    commands = _driver_commands()
    assert any(where == "rayjob.yaml" for where, _ in commands)
    presets_used = set()
    parser = build_parser()
    known = set(parser._subparsers._group_actions[0].choices)
    for where, argv in commands:
        if argv[0] not in known:
            assert argv[0] in PENDING_SUBCOMMANDS, f"{where}: unknown subcommand {argv}"
            continue
        args = parser.parse_args(argv)
        if getattr(args, "config", None) and PLACEHOLDER not in args.config:
            load_config(args.config, args.overrides)  # the preset exists and the overrides validate
            presets_used.add(args.config)
    assert "llada8b_gsm8k" in presets_used
    # The job's module is importable from the image's working directory.
    import importlib.util

    assert importlib.util.find_spec("driver.__main__") is not None


# --- Dockerfiles: one source of versions, cache-friendly, non-root -----------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(
        line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_dockerfile_installs_only_through_pyproject(dockerfile):
    steps = _instructions(REPO / dockerfile)
    pip_runs = [(i, args) for i, (op, args) in enumerate(steps) if op == "RUN" and "pip install" in args]
    assert pip_runs
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~;\[ ]", d)[0].lower() for d in deps}
    for _, args in pip_runs:
        for command in re.split(r"&&|\|", args):
            if "pip install" not in command:
                continue
            words = shlex.split(command.split("pip install", 1)[1])
            targets = [w for w in words if not w.startswith("-") and not w.startswith("/")
                       and not w.startswith("${") and not w.startswith("$(")]
            # Only the project itself (".") or a variable read from pyproject; never a name or a pin.
            assert targets in ([], ["."]), f"{dockerfile}: pip installs {targets} outside pyproject.toml"
            assert not any(w.lower().split("=")[0] in names for w in words), command
    copies = [(i, args) for i, (op, args) in enumerate(steps) if op == "COPY"]
    first_dep_install = pip_runs[0][0]
    pyproject_copy = next(i for i, args in copies if args.split()[-2:] == ["pyproject.toml", "./"])
    source_copy = next(i for i, args in copies if args.split()[-2:] == [".", "."] or args.endswith("/app /app"))
    # Dependency layer first, source after: a code change does not reinstall dependencies.
    assert pyproject_copy < first_dep_install < source_copy
    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1] not in {"root", "0"}
    assert steps[-1][0] == "CMD" and "driver" in steps[-1][1]


def test_cpu_dockerfile_is_multi_stage_on_a_slim_base():
    froms = [args for op, args in _instructions(REPO / "docker/Dockerfile.cpu") if op == "FROM"]
    assert len(froms) == 2 and all("slim" in f for f in froms)
    text = (REPO / "docker/Dockerfile.cpu").read_text()
    assert "COPY --from=builder /opt/venv /opt/venv" in text


def test_dockerignore_drops_history_and_outputs_but_keeps_the_build_inputs():
    patterns = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {".git", "runs", "checkpoints/*", ".devicepkgs"} <= patterns
    # The CPU image's default job trains from the shipped tiny base: those stay in the context.
    assert {"!checkpoints/tiny-countdown-base", "!checkpoints/tiny-sudoku-base"} <= patterns
    for needed in ("pyproject.toml", "configs", "common", "driver", "rollout", "learner", "README.md"):
        assert needed not in patterns and not any(p.startswith(needed) for p in patterns)


def test_dependency_step_resolves_against_pyproject_offline(tmp_path):
    """The GPU image's dependency step, replayed here: the source-less project carries every dependency
    and resolves with the preinstalled torch kept (no index: what it needs is already installed)."""
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "README.md").touch()
    listed = subprocess.run([sys.executable, "-m", "pip", "list", "--format=freeze"],
                            capture_output=True, text=True, check=True).stdout
    keep = [line for line in listed.splitlines() if re.match(r"(?i)^(torch|triton)==", line)]
    assert keep, "the environment has no torch to keep"
    (tmp_path / "keep-base.txt").write_text("\n".join(keep) + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation",
         "--disable-pip-version-check", "-c", "keep-base.txt", "."],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    would = [line for line in proc.stdout.splitlines() if line.startswith("Would install")]
    # Everything pyproject needs is satisfied by what is installed: only the project itself is new.
    assert would == ["Would install unmask-0.1.0"], would


# --- runtime_env: accepted by Ray, excludes what must not travel ---------------------------------


def _runtime_env() -> dict:
    return _yaml(DEPLOY / "runtime_env.yaml")


def test_runtime_env_is_a_valid_ray_runtime_env_and_matches_the_rayjob():
    from ray.runtime_env import RuntimeEnv

    env = _runtime_env()
    RuntimeEnv(**env)  # raises on an unknown field or a malformed value
    assert "pip" not in env and "conda" not in env, "dependencies come from the image, not the job"
    assert {".git", "/runs", "/.devicepkgs"} <= set(env["excludes"])
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    assert any(k.startswith("NCCL_") for k in env["env_vars"])
    assert yaml.safe_load(_rayjob()["spec"]["runtimeEnvYAML"])["env_vars"] == env["env_vars"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_mentioning(text: str) -> list[int]:
    """Processes whose command line contains ``text`` (Linux /proc; no psutil needed)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:  # the process exited while we looked
                pass
    return pids


def _session_log_tails(temp_dir: str) -> str:
    """The end of the head's dashboard and agent logs, for a failure message."""
    logs = Path(temp_dir) / "session_latest" / "logs"
    return "".join(f"\n== {name}\n" + (logs / name).read_text()[-1500:]
                   for name in ("dashboard.log", "dashboard_agent.log") if (logs / name).is_file())


def _stop_our_ray(head: subprocess.Popen, temp_dir: str) -> None:
    """Stop only the head this test started: SIGTERM to `ray start --block` (it stops its children),
    then SIGKILL its process group and any process still naming our temp dir, by pid. Never
    `ray stop`, which would take down every Ray instance on the machine."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(head.pid, signal.SIGKILL)  # the group `start_new_session` gave the head
    except ProcessLookupError:
        pass
    head.wait(timeout=10)
    deadline = time.time() + 20
    while (leftovers := _pids_mentioning(temp_dir)) and time.time() < deadline:
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    assert not _pids_mentioning(temp_dir), "Ray processes of this test survived"


@pytest.mark.ray
def test_ray_job_submit_accepts_the_runtime_env():
    """`ray job submit --runtime-env deploy/runtime_env.yaml --working-dir <repo>` against a real local
    head on loopback runs `python -m driver config --config tiny_countdown` to SUCCEEDED."""
    temp_dir = tempfile.mkdtemp(prefix="rjd", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs_port, dash_port = _free_port(), _free_port()
    address = f"http://127.0.0.1:{dash_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # Token auth, as on a real cluster, with a token of our own (never ~/.ray/auth_token).
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex)
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]

    def ray(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(ray_cli + list(args), env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)

    log_path = Path(temp_dir) / "head.log"
    with open(log_path, "w") as log:
        head = subprocess.Popen(
            ray_cli + ["start", "--head", "--block", f"--port={gcs_port}", "--node-ip-address=127.0.0.1",
                       "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", "--num-cpus=3",
                       "--include-dashboard=true", f"--temp-dir={temp_dir}", "--disable-usage-stats",
                       # Ray's fixed default agent ports collide with any other Ray on the machine.
                       f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                       f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"],
            env=env, cwd=temp_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        # `ray start --block` prints "--block" once every process, the dashboard included, is up.
        deadline = time.time() + 120
        while "--block" not in log_path.read_text():
            assert head.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, "the Ray head did not come up in 120 s"
            time.sleep(1)

        submission_id = f"deploy-test-{uuid.uuid4().hex[:8]}"
        deadline = time.time() + 240
        while True:
            submit = ray("job", "submit", "--address", address, "--submission-id", submission_id,
                         "--runtime-env", str(DEPLOY / "runtime_env.yaml"), "--working-dir", str(REPO), "--",
                         "sh", "-c", "python -m driver config --config tiny_countdown && ls -a && python -m driver "
                         f"train --set run.root={temp_dir}/runs --set run.total_steps=2 --set task.eval_size=8 "
                         "--set run.eval_sampling_steps=[] "
                         "--set learner.groups_per_step=1 --set rollout.prompts_per_call=1", timeout=400)
            # The node's job agent registers a few seconds after the dashboard answers.
            if "No available agent" not in submit.stderr or time.time() > deadline:
                break
            time.sleep(2)
        status = ray("job", "status", "--address", address, submission_id)
        logs = ray("job", "logs", "--address", address, submission_id).stdout
        # `ray job status` ends with "Job '<id>' succeeded" (or failed/stopped).
        succeeded = f"Job '{submission_id}' succeeded" in status.stdout + status.stderr
        assert submit.returncode == 0 and succeeded, (
            submit.stderr[-1500:] + status.stdout + logs[-1500:] + _session_log_tails(temp_dir))
        assert "name: tiny-countdown" in logs and "learner:" in logs
        listing = {line.strip() for line in logs.splitlines()}
        assert {"configs", "driver", "common", "pyproject.toml"} <= listing
        assert ".git" not in listing, "the runtime_env must keep .git out of the uploaded working dir"
        # The tiny RL run itself ran under the job: its run directory and metrics are complete.
        run_dir = next(Path(temp_dir, "runs").glob("tiny-countdown-*"))
        steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in steps if "loss" in r] == [1, 2]
        assert (run_dir / "policy" / "model.safetensors").is_file() and (run_dir / "plots").is_dir()
        assert "held-out after training" in logs
    finally:
        _stop_our_ray(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
