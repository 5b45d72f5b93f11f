"""Stage train: run training_pt/train.py in .venv-gpu, under torchrun when several GPUs are visible.

    nox -s train -- [--train-config PATH] [--train-override key=value ...] [--nproc N] [--train-device cpu]

train.py writes into the run folder: training_log.txt (its log, also on failure), metrics.jsonl (one
JSON per step), loss.svg (the loss curve) and train_result.json (status, one-line reason, figures),
which this stage reads for its record (`file_says`: the one reading of it, to which tasks/verdict.py holds
the record). The whole console (torchrun's lines, tracebacks) goes to train_console.txt. It runs as
`python -m training_pt.train`, isolated (tasks/proc.py's launcher); with N > 1 processes under
`python -m torch.distributed.run --standalone --nproc-per-node N -m training_pt.train`, DDP over NCCL,
NVLink multicast (NVLS) off. Across nodes (--nnodes, --rdzv-endpoint, or Slurm's / torchrun-style
environment: tasks/multinode.py) every node joins one torchrun job through its c10d rendezvous and
records the job's id, its node rank and the world size. This module never imports torch.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import yaml

from tasks import config, identity, jsonfile, layout, multinode, proc, records, validate
from tasks.records import FileSays, Outcome, StageStatus

DESCRIPTION = (
    "Train GPT-2 for a few steps on every GPU (training_pt/train.py in .venv-gpu): the loss falls on "
    "real text, nothing goes non-finite; tok/s, MFU, memory and NVML samples in training_log.txt."
)

# Figures copied from train_result.json into the stage record (and so into summary.json / README).
FIGURES = (
    "device",
    "model",
    "params_m",
    "gpus",
    "gpu_name",
    "gpu_model",
    "tok_s",
    "tok_s_per_gpu",
    "mfu_pct",
    "peak_tflops",
    "first_loss",
    "final_loss",
    "steps",
    "batch_size",
    "micro_batch",  # batch_size / micro_batch = the retries after an out-of-memory first step
    "grad_accum",
    "oom_retries",
    "block_size",
    "tokens_per_step",
    "compile",
    "loss_path",
    "residual",
    "mlp",
    "gemm",
    "warmup_s",
    "first_step_s",
    "timed_s",  # the GPU time of the timed steps (CUDA events), and their step time:
    "step_ms_median",
    "step_ms_min",
    "step_ms_max",
    "peak_mem_alloc_gib",
    "peak_mem_reserved_gib",
    "gpu_util_median",
    "power_w_median",
    "sm_clock_mhz_median",
    "temp_c_max",
    "torch",
    "transformers",
    "torch_identity",
    "thresholds",
    "nnodes",
    "node_rank",
    "world_size",
    "rdzv_id",
)


def add_arguments(parser) -> None:
    parser.add_argument(
        "--train-config",
        type=Path,
        default=layout.TRAIN_CONFIG,
        metavar="PATH",
        help="training settings (default: configs/submission_local_gpu_gpt2.yaml; "
        "Gemma-2B: configs/submission_local_gpu_gemma2b.yaml)",
    )
    parser.add_argument(
        "--train-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one training setting, e.g. train.steps=20 (repeatable)",
    )
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="training processes, one per GPU (default: every GPU visible; 1 runs without torchrun)",
    )
    parser.add_argument(
        "--train-device",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="cpu: train on the CPU (slow; machines without a GPU and tests)",
    )
    parser.add_argument(
        "--train-timeout",
        type=float,
        default=1800.0,
        metavar="SECONDS",
        help="stop training after this long (default 1800)",
    )
    multinode.add_arguments(parser)


def torch_gpu_count(python: Path) -> tuple[int | None, str]:
    """torch.cuda.device_count() as .venv-gpu's torch sees it (honours CUDA_VISIBLE_DEVICES)."""
    try:
        out = subprocess.run(  # the one launcher's command and isolated environment (tasks/proc.py)
            proc.gpu_command(python, layout.DEVICE_COUNT_MODULE, []),
            capture_output=True,
            text=True,
            timeout=300,
            env=proc.gpu_env(python=python),
            cwd=layout.ROOT,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"could not ask .venv-gpu's torch for the GPU count ({e})"
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines or not lines[-1].isdigit():
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"could not ask .venv-gpu's torch for the GPU count ({last})"
    return int(lines[-1]), "torch.cuda.device_count()"


def gpu_count(run_dir: Path, python: Path) -> tuple[int | None, str]:
    """(count, where from): the GPUs cuda_check ran on in this run (torch's own view in .venv-gpu, so
    CUDA_VISIBLE_DEVICES and MIG are accounted for, unlike NVML's count of physical GPUs), else
    what .venv-gpu's torch sees now."""
    check = records.read(run_dir, "cuda_check") if "CUDA_VISIBLE_DEVICES" not in os.environ else None
    count = check.figures.get("gpus_checked") if check and check.ok else None
    if isinstance(count, int) and not isinstance(count, bool) and count > 0:
        return count, "cuda_check"
    return torch_gpu_count(python)


def command(python: Path, nproc: int, args, run_dir: Path, job: multinode.Job | None = None) -> list[str]:
    script = [
        "--config",
        str(args.train_config),
        "--out",
        str(run_dir),
        "--device",
        args.train_device,
        *args.train_override,
    ]
    # one job across nodes: torchrun's c10d rendezvous, even for one process here
    torchrun = multinode.torchrun_args(job, nproc) if job is not None else None
    return proc.gpu_command(python, layout.TRAIN_MODULE, script, nproc, torchrun)


def failure_reason(
    run_dir: Path, rc: int, timeout: float, result: dict | None, job: multinode.Job | None = None
) -> str:
    """One line: a timeout; the rendezvous that did not form; train.py's own reason; but when rank 0 was
    only stopped ("interrupted", as torchrun stops every rank once one fails) the failing rank's FAIL
    line; else the console's last line."""
    console = run_dir / layout.TRAIN_CONSOLE
    if job is not None and result is None and console.exists():
        if (rdzv := multinode.rendezvous_failure(console.read_text(errors="replace"), job)) is not None:
            return rdzv
    if rc == 124:
        return f"training did not finish within {timeout:g} s; raise --train-timeout or lower train.steps"
    reason = str((result or {}).get("reason") or "")
    if reason and not reason.startswith("interrupted"):
        return reason
    log = run_dir / layout.TRAIN_LOG
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    other_ranks = [line.strip() for line in lines if line.startswith("[rank ") and "FAIL:" in line]
    if other_ranks:
        return other_ranks[0]
    if reason:
        return reason
    fails = [line.strip() for line in lines if line.startswith("FAIL:")]
    if fails:
        return fails[-1]
    tail = (
        [line for line in console.read_text(errors="replace").splitlines() if line.strip()] if console.exists() else []
    )
    return f"train.py exited with code {rc}: {tail[-1].strip() if tail else 'no output'}"


USES_GPU_VENV = True  # the harness holds .venv-gpu shared while run() runs: no install swaps it meanwhile


def check_inputs(args) -> None:
    """The training config and options, refused before any stage runs (ConfigError, exit 2)."""
    validate.train_options(args)


def run(run_dir: Path, args) -> Outcome:
    early, args.train_prestarted = getattr(args, "train_prestarted", None), None  # from prestart, if m40 did
    try:
        return run_with(run_dir, args, early)
    finally:
        if early is not None and early.returncode is None:
            cancel(early)  # never released (a FAIL before the launch): it must not linger


def run_with(run_dir: Path, args, early: subprocess.Popen | None) -> Outcome:
    python = layout.gpu_python()
    if (refused := missing_inputs(python, args)) is not None:
        return refused
    counted = process_count(run_dir, python, args)
    if isinstance(counted, Outcome):
        return counted
    nproc, source = counted
    try:
        job = multinode.resolve(args, os.environ)
    except ValueError as e:
        return Outcome(StageStatus.FAIL, str(e))
    if job is not None and (unreachable := join_job(job)) is not None:
        return Outcome(StageStatus.FAIL, unreachable, job.figures())
    print(f"train: {nproc} process(es) ({source}); config {args.train_config}", flush=True)
    if early is not None and (nproc != 1 or job is not None):
        cancel(early)  # started ahead for one process; this run needs torchrun
        early = None
    rc = launch(run_dir, python, nproc, args, job, early)
    return outcome(run_dir, rc, nproc, args, job)


def prestart(run_dir: Path, args) -> subprocess.Popen | None:
    """The m40 chain calls this before cuda_check: train.py for one GPU, started now so that its interpreter
    and imports (torch, transformers, the model's code, Dynamo: 5-14 s on the H200 host) overlap
    cuda_check. It waits on its stdin, creating no CUDA context and writing no file, until `run` releases it
    (after cuda_check passed, when the run is still one process) or `cancel` ends it. None where this run
    will likely not be one process on one GPU (the probe saw another count, --nproc, --train-device cpu, a
    multi-node job)."""
    python = layout.gpu_python()
    if missing_inputs(python, args) is not None or args.train_device == "cpu" or args.nproc not in (None, 1):
        return None
    try:
        if multinode.resolve(args, os.environ) is not None:
            return None
    except ValueError:
        return None
    probe = records.read(run_dir, "probe")
    if args.nproc is None and (probe is None or probe.figures.get("gpu_count") != 1):
        return None
    return start_waiting(run_dir, python, args)


def start_waiting(run_dir: Path, python: Path, args) -> subprocess.Popen:
    """train.py for one process, started now, waiting for `proc.release` (tasks/proc.py) on its stdin."""
    clear_results(run_dir)
    env = proc.gpu_env({layout.TRAIN_WAIT_ENV: "1"}, python)  # unbuffered, as tee's children are
    return proc.start_in_group(command(python, 1, args, run_dir), env, layout.ROOT, stdin=True)


def cancel(early: subprocess.Popen) -> None:
    """End a train.py started ahead that will not train, at once: its process group is killed (before "go"
    it has written nothing, so nothing is lost; waiting for it to read its closed stdin could take the rest
    of its imports, seconds in which a second Ctrl-C would stop evidence from sealing the run)."""
    proc.release(early, go=False)
    proc.signal_group(early, signal.SIGKILL)
    early.wait()
    if early.stdout is not None:
        early.stdout.close()


def clear_results(run_dir: Path) -> None:
    for name in (layout.TRAIN_LOG, layout.TRAIN_RESULT, layout.TRAIN_METRICS, layout.TRAIN_LOSS_PLOT):
        (run_dir / name).unlink(missing_ok=True)  # a re-run must not report an earlier attempt's result


def missing_inputs(python: Path, args) -> Outcome | None:
    """A FAIL when .venv-gpu or the training config is missing."""
    if not python.exists():
        return Outcome(
            StageStatus.FAIL,
            f"no GPU environment: {python} is missing; run `nox -s install -p CHANNEL` first "
            "(`nox -l` lists the channels), or `nox -s m40`",
        )
    if not Path(args.train_config).is_file():
        return Outcome(
            StageStatus.FAIL, f"--train-config {args.train_config} does not exist; pass an existing YAML file"
        )
    return None


def process_count(run_dir: Path, python: Path, args) -> tuple[int, str] | Outcome:
    """(training processes on this node, where that number came from), or a FAIL."""
    if args.nproc is not None:
        if args.nproc < 1:
            return Outcome(StageStatus.FAIL, f"--nproc {args.nproc}: must be 1 or more")
        return args.nproc, "--nproc"
    if args.train_device == "cpu":
        return 1, "--train-device cpu"
    count, source = gpu_count(run_dir, python)
    if count is None:
        return Outcome(StageStatus.FAIL, f"{source}; check the install (nox -s cuda_check)")
    if count == 0:
        return Outcome(
            StageStatus.FAIL,
            "no CUDA GPU visible to .venv-gpu's torch (torch.cuda.device_count() = 0); "
            "check `nox -s cuda_check`, or pass --train-device cpu to train on the CPU (slow)",
        )
    return count, source


def join_job(job: multinode.Job) -> str | None:
    """Say which multi-node job this node joins; why its rendezvous cannot be reached, or None."""
    print(
        f"train: node {job.node_rank} of {job.nnodes} in job {job.rdzv_id}, rendezvous {job.endpoint} "
        f"(from {job.source}; timeout {job.timeout_s:g} s)",
        flush=True,
    )
    return multinode.reach(job)


def launch(
    run_dir: Path, python: Path, nproc: int, args, job: multinode.Job | None, early: subprocess.Popen | None = None
) -> int:
    """Run train.py (under torchrun for several processes), its console into train_console.txt; its exit code.
    `early`: the same command started ahead by `prestart`, released here instead of starting another."""
    if early is None:
        clear_results(run_dir)
    extra = {}
    if nproc > 1 and "OMP_NUM_THREADS" not in os.environ:
        extra["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    cmd = command(python, nproc, args, run_dir, job)
    env = proc.gpu_env(extra, python)
    shown = {k: env[k] for k in (*layout.NO_MULTICAST_ENV, *extra, "PYTHONPATH", "PYTHONNOUSERSITE")}
    console = run_dir / layout.TRAIN_CONSOLE
    console.write_text(f"$ {' '.join(f'{k}={v}' for k, v in shown.items())} {' '.join(cmd)}\n")
    if early is not None:
        proc.release(early)
    rc = proc.tee(
        cmd,
        console,
        env=env,
        inherit_env=False,
        cwd=layout.ROOT,
        timeout=args.train_timeout,
        append=True,
        started=early,
    )
    log = run_dir / layout.TRAIN_LOG
    if not log.exists():  # train.py died before it opened its log: keep what the console says
        log.write_text(
            f"train.py wrote no log (exit code {rc}); its console output follows\n\n"
            + console.read_text(errors="replace")
        )
    return rc


def outcome(run_dir: Path, rc: int, nproc: int, args, job: multinode.Job | None) -> Outcome:
    """The stage's record from train_result.json, the exit code and the files train.py left."""
    result = read_result(run_dir)
    said = file_says(result) if result is not None else None
    kept = (layout.TRAIN_LOG, layout.TRAIN_METRICS, layout.TRAIN_LOSS_PLOT, layout.TRAIN_RESULT, layout.TRAIN_CONSOLE)
    files = [n for n in kept if (run_dir / n).exists()]
    figures = job.figures() if job is not None else {}
    figures.update(said.figures if said is not None else {})
    overrides = changed_overrides(args.train_override, args.train_config)
    figures.update(nproc=nproc, config=Path(args.train_config).name, overrides=overrides)
    figures["config_path"] = checkout_path(args.train_config)  # tasks/verdict.py: one of this tool's configs?
    raw = (result or {}).get("figures")
    torch_file = raw.get("torch_file") if isinstance(raw, dict) else None
    if torch_file and not isinstance(figures.get("torch_identity"), dict):  # tasks/verdict.py compares it
        figures["torch_identity"] = identity.of_torch(torch_file, figures.get("torch", ""))
    if said is not None and not said.failure and rc == 0:
        return Outcome(StageStatus.PASS, "", figures, files)
    return Outcome(StageStatus.FAIL, failure_reason(run_dir, rc, args.train_timeout, result, job), figures, files)


def read_result(run_dir: Path) -> dict | None:
    """train_result.json, or None where train.py left none (or one jsonfile cannot read: not a JSON object)."""
    try:
        return jsonfile.read(run_dir / layout.TRAIN_RESULT)
    except jsonfile.Unreadable:
        return None


def file_says(result: dict) -> FileSays:
    """What train_result.json says: a pass (status pass, exit code 0) or what instead, and the figures this stage's
    record takes from it (FIGURES, and the `phase_` seconds). tasks/verdict.py holds a passing record to them."""
    status, code, reason = result.get("status"), result.get("exit_code"), result.get("reason")
    if status != "pass":
        failure = f"{status} (exit {code})" + (f": {reason}" if reason else "")
    else:
        failure = "" if code == 0 else f"exit code {code}"
    got = result.get("figures")
    got = got if isinstance(got, dict) else {}
    figures = {k: v for k, v in got.items() if k in FIGURES or k.startswith("phase_")}  # phases: their line
    if not isinstance(figures.get("torch_identity"), dict):  # the stage derives it from torch_file instead
        figures.pop("torch_identity", None)
    return FileSays(failure, figures)


def checkout_path(path) -> str:
    """The config file's path relative to this checkout (configs/...), or absolute where it lies outside."""
    full = Path(path).expanduser().resolve()
    try:
        return full.relative_to(layout.ROOT).as_posix()
    except ValueError:
        return str(full)


def changed_overrides(items: list[str], config_path: Path) -> list[str]:
    """The --train-override items whose value differs from the training config's (tasks/verdict.py judges
    them); `checks.min_loss_drop=2.0` where the config says 2.0 changes nothing and is not listed."""
    try:
        cfg = config.load_yaml(Path(config_path))
    except config.ConfigError:
        return list(items)
    return [item for item in items if not same_as_config(item, cfg)]


def same_as_config(item: str, cfg: dict) -> bool:
    key, _, text = str(item).partition("=")
    parts = key.strip().split(".")
    if len(parts) == 1 and parts[0] not in cfg:  # a unique leaf: `steps` for train.steps
        owners = [s for s, v in cfg.items() if isinstance(v, dict) and parts[0] in v]
        parts = [owners[0], parts[0]] if len(owners) == 1 else parts
    node = cfg
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    if isinstance(node, (int, float)) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(node) == float(value)
    return value == node
