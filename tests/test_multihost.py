"""Several processes as one run (jax.distributed): two local CPU processes with two devices
each give the same selection and tokens as one process with four devices, joined by
explicit flags or by JAX's SLURM detection; a peer that never starts is a clear error."""

import json
import os
import re
import socket
import subprocess
import sys

import pytest

import pcomp_jax
import tiny
from bounds import assert_within, nll_bound

pytestmark = pytest.mark.slow  # subprocesses or whole pipelines: the full suite, not the fast tier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240


JAX_SLURM_PORTS = range(65535 - 2**12 + 1, 65536)  # where JAX's SLURM detection puts the coordinator


def free_port(ports: range | None = None) -> int:
    """A TCP port free on 127.0.0.1 now: any (the system's choice), or the first free one of ``ports``."""
    for port in ports or [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port in {ports}")


def cpu_env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    # this process's XLA_FLAGS (the optimization level conftest sets) plus the device count
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=flags, JAX_NUM_CPU_DEVICES=str(devices), **extra)
    return env


@pytest.fixture(scope="module")
def run_args(hf_checkpoints, tmp_path_factory):
    path, _ = hf_checkpoints("llama_gqa_untied")
    book = tmp_path_factory.mktemp("mh") / "book.txt"
    book.write_text(" ".join(f"The {w} sat on mat number {i}." for i, w in enumerate(["cat", "dog", "owl"] * 12)))

    orbax_dir = tmp_path_factory.mktemp("mh_orbax") / "model"
    # in this process, as scripts/convert_checkpoint.py does (test_gguf.py runs the script itself)
    pcomp_jax.save_model(pcomp_jax.load_model(path), str(orbax_dir))

    def args(out, model=path):
        model = str(orbax_dir) if model == "orbax" else model
        return [sys.executable, "-m", "pcomp_jax.generate", "--config", "configs/demo.yaml", "--model", model,
                "--context-file", str(book), "--question", "where did the owl sit?", "--max-new-tokens", "6",
                "--set", "pipeline.chunk_len=48", "--set", "pipeline.top_k_chunks=2", "--set",
                "pipeline.group_size=4", "--output-json", str(out)]

    return args


def launch(commands_and_envs):
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd, env in commands_and_envs]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT_S)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            p.kill()
    return results


@pytest.fixture(scope="module")
def one_process(hf_checkpoints, run_args):
    """The same run in this process (four CPU devices, as conftest sets)."""
    import pcomp_jax
    from pcomp_jax.config import load_config

    cmd = run_args("unused.json")
    overrides = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--set"]
    config = load_config("configs/demo.yaml", overrides + ["max_new_tokens=6"])
    book = cmd[cmd.index("--context-file") + 1]
    result = pcomp_jax.answer(pcomp_jax.load_model(hf_checkpoints("llama_gqa_untied")[0]), open(book).read(),
                              cmd[cmd.index("--question") + 1], config.pipeline, config.max_new_tokens)
    assert jax_devices() == 4
    return {"selected_chunks": result.selected_chunks, "token_ids": result.token_ids,
            "chunk_scores": result.chunk_scores}


def jax_devices() -> int:
    import jax

    return len(jax.devices())


def check_same(one, out_dir, results):
    for rc, _, err in results:
        assert rc == 0, err
    # Only process 0 prints. The CPU collectives (Gloo) log each rank's connection from their
    # own threads, and those messages can run together on one line: remove them, not lines.
    assert re.sub(r"\[Gloo\][^\[\n]*", "", results[1][1]).strip() == "", results[1][1]
    assert os.listdir(out_dir) == ["r.json"]  # and writes
    two = json.loads((out_dir / "r.json").read_text())
    assert two["selected_chunks"] == one["selected_chunks"] and two["token_ids"] == one["token_ids"]
    assert_within(two["chunk_scores"], one["chunk_scores"], nll_bound(tiny.DIMS, one["chunk_scores"], row_len=tiny.DIMS.window),
                  "chunk scores")


def test_two_processes_with_flags_equal_one(run_args, one_process, tmp_path):
    port = free_port()
    results = launch([
        (run_args(tmp_path / "r.json") + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                          "--process-id", str(i)], cpu_env(2))
        for i in range(2)
    ])
    check_same(one_process, tmp_path, results)


def test_two_processes_found_by_slurm_detection_equal_one(run_args, one_process, tmp_path):
    """Also: the model is an orbax checkpoint, restored by each process onto its devices."""
    port = free_port(JAX_SLURM_PORTS)  # JAX takes the coordinator port from the job id:
    job = 4096 * 25 + port - JAX_SLURM_PORTS.start  # SLURM_JOB_ID % 4096 + 61440
    results = launch([
        (run_args(tmp_path / "r.json", model="orbax"),
         cpu_env(2, SLURM_JOB_ID=str(job), SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                 SLURM_PROCID=str(i), SLURM_LOCALID=str(i)))
        for i in range(2)
    ])
    check_same(one_process, tmp_path, results)


def test_a_peer_that_never_starts_is_a_clear_error(run_args, tmp_path):
    port = free_port()
    [(rc, out, err)] = launch([(run_args(tmp_path / "r.json") + [
        "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "0",
        "--set", "distributed.timeout_s=5"], cpu_env(2))])
    assert rc == 2 and "Traceback" not in err
    assert "did not all join at coordinator 127.0.0.1:" in err.strip().splitlines()[-1]
    assert not (tmp_path / "r.json").exists()


def test_launch_files_are_consistent_and_their_commands_parse():
    """deploy/: the Kubernetes Indexed Job's flags agree with its Job and headless Service,
    and the commands of both launch files parse with the CLI's own parser."""
    import shlex

    import yaml

    from pcomp_jax.generate import build_parser

    service, job = yaml.safe_load_all(open(os.path.join(ROOT, "deploy", "kubernetes.yaml")))
    pod = job["spec"]["template"]["spec"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    assert pod["subdomain"] == service["metadata"]["name"] and job["spec"]["completionMode"] == "Indexed"
    command = shlex.split(pod["containers"][0]["args"][0].replace('"$JOB_COMPLETION_INDEX"', "1"))
    args = build_parser().parse_args(command[3:])
    port = service["spec"]["ports"][0]["port"]
    assert args.coordinator == f"{job['metadata']['name']}-0.{service['metadata']['name']}:{port}"
    assert args.num_processes == job["spec"]["completions"] == job["spec"]["parallelism"] and args.process_id == 1
    assert os.path.exists(os.path.join(ROOT, args.config))

    from pcomp_jax.config import load_config

    script = open(os.path.join(ROOT, "deploy", "slurm.sbatch")).read().replace("\\\n", " ")
    options = dict(line.split()[1].lstrip("-").split("=") for line in script.splitlines() if line.startswith("#SBATCH"))
    devices = int(options["nodes"]) * int(options["ntasks-per-node"])  # one accelerator per task
    assert "/" not in options["output"]  # opened by SLURM before the script runs: no directory to create
    lines = [line for line in script.splitlines() if line.startswith("srun ")]
    assert lines
    for line in lines:
        command = shlex.split(line.replace("${SLURM_JOB_ID}", "7"))
        args = build_parser().parse_args(command[4:])
        assert os.path.exists(os.path.join(ROOT, args.config)) and args.coordinator is None  # SLURM detection
        assert load_config(args.config, args.overrides).pipeline.group_size % devices == 0


def test_initialize_after_jax_has_run_in_this_process():
    """From Python, after JAX has computed: no flags is one process; flags are a clear error."""
    import jax.numpy as jnp

    from pcomp_jax.distributed import DistributedConfig, initialize
    from pcomp_jax.errors import ConfigError, PcompError

    jnp.ones(2).block_until_ready()
    assert initialize(DistributedConfig()) is False
    with pytest.raises(PcompError, match="must be joined before this process runs any JAX computation"):
        initialize(DistributedConfig("127.0.0.1:1", 2, 0, timeout_s=5))
    with pytest.raises(ConfigError, match="distributed.process_id is missing"):
        DistributedConfig("127.0.0.1:1", 2)
