"""One source of truth for every path, file name, stage name and exit code."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
TEMPLATES = ROOT / "tasks" / "templates"
RUNS_DIR = ROOT / "submission_runs"
# The code that runs in .venv-gpu's Python (it imports torch): one package, its modules started as
# `python -m training_pt.<module>` by tasks/proc.py's launcher, never by file path.
GPU_PACKAGE = "training_pt"
TRAIN_MODULE = "training_pt.train"
# Set by the m40 chain on a train.py it starts ahead (tasks/train.py prestart): import, then wait on stdin for "go".
TRAIN_WAIT_ENV = "M40_TRAIN_WAIT_FOR_GO"
# train asks .venv-gpu's torch how many GPUs it sees (when no cuda_check record of the run says).
DEVICE_COUNT_MODULE = "training_pt.device_count"

# The GPU environment every session shares; nox never creates or deletes it.
VENV_GPU = ROOT / ".venv-gpu"
# Beside a venv (`.venv-gpu.compile-cache`, ignored by git like every `.venv-gpu.*`): the compile cache of
# Inductor, Triton and AOTAutograd that every child in that venv shares (cuda_check's compile check, train,
# bench), kept across runs. Their entries are keyed by torch version, GPU and source, so a stale one is never
# used; a cached kernel still runs and is still compared. Never inside a run folder (not evidence).
COMPILE_CACHE_SUFFIX = ".compile-cache"
# Written into .venv-gpu after a verified install: what channel it holds.
VENV_MARKER = "m40-install.json"
# In a `provisioned` .venv-gpu: the site-packages of the interpreter whose torch it reuses.
VENV_PROVISIONED_PTH = "m40-provisioned.pth"

CHANNELS_FILE = CONFIGS / "channels.yaml"
SETTINGS_FILE = CONFIGS / "m40.yaml"
FLEET_FILE = CONFIGS / "fleet.yaml"  # the fleet report's outlier settings
GPUS_FILE = CONFIGS / "gpus.yaml"
PROBE_FILE = CONFIGS / "probe.yaml"  # the probe's one deadline
VERDICT_FILE = CONFIGS / "verdict.yaml"  # which overrides keep a PASS (tasks/verdict.py)
NVML_FILE = CONFIGS / "nvml.yaml"  # clock-event reasons and Xid classes: the one table of each
TRAIN_CONFIG = CONFIGS / "submission_local_gpu_gpt2.yaml"
# train: what training_pt/train.py writes into its --out folder (the run folder under `nox -s train`),
# and the stage's capture of the whole console (torchrun's own lines and any traceback included).
TRAIN_LOG = "training_log.txt"
TRAIN_METRICS = "metrics.jsonl"
TRAIN_LOSS_PLOT = "loss.svg"
TRAIN_RESULT = "train_result.json"
TRAIN_CONSOLE = "train_console.txt"
# cuda_check across nodes (one torchrun job over every node's GPUs): the module and its console.
ALLREDUCE_NODES_MODULE = "training_pt.allreduce_nodes"
ALLREDUCE_NODES_LOG = "allreduce_nodes.log"
# bench: the benchmark module (runs in .venv-gpu) and its settings (timed steps, speed targets).
BENCH_MODULE = "training_pt.bench"
BENCH_FILE = CONFIGS / "bench.yaml"

# Environment variable that replaces the channel catalog (also read by noxfile.py for `-p NAME`).
CHANNELS_ENV = "M40_CHANNELS_FILE"

RUN_PREFIX = "m40_v"
STAGES_DIR = "stages"  # stages/<stage>.json: one record per stage
LOCK_FILE = ".lock"
SUMS_FILE = "SHA256SUMS"  # written last by evidence: its presence means the run is sealed
SUMMARY_FILE = "summary.json"
README_FILE = "README.md"
GPUS_JSON = "gpus.json"  # written by probe: the GPU list, machine-readable, read by evidence

STAGES = ("probe", "install", "cuda_check", "train", "evidence")
# The stages that do the work, in order; evidence (last) seals the run. The one list m40, verdict, evidence use.
WORK_STAGES = STAGES[:-1]

# The human-readable file each stage leaves (the six files every finished run holds,
# plus the evidence README).
STAGE_FILES = {
    "probe": ("env_info.txt", "nvidia_smi.txt"),
    "install": ("torch_version.txt",),
    "cuda_check": ("cuda_check.txt",),
    "train": (TRAIN_LOG,),
    "evidence": (README_FILE,),
}
REQUIRED_FILES = tuple(f for files in STAGE_FILES.values() for f in files)

# cuda_check: its settings, the checker it runs inside .venv-gpu, and its machine-readable result
# (cuda_check.txt, its human file, is written by the checker; cuda_check.log is the raw console).
CUDA_CHECK_FILE = CONFIGS / "cuda_check.yaml"
GPU_CHECKS_MODULE = "training_pt.gpu_checks"
CUDA_CHECK_JSON = "cuda_check.json"
# The machine-readable file each stage writes when it passes: a PASS needs them (tasks/verdict.py).
STAGE_EVIDENCE = {"probe": GPUS_JSON, "cuda_check": CUDA_CHECK_JSON, "train": TRAIN_RESULT}
CUDA_CHECK_LOG = "cuda_check.log"
# evidence: `python -m torch.utils.collect_env` run in .venv-gpu (what PyTorch's bug reports ask for).
COLLECT_ENV = "collect_env.txt"
# cuda_check --level long (burn-in and fabric checks): its settings and the files it adds to the run.
BURNIN_FILE = CONFIGS / "burnin.yaml"
BURN_SAMPLES = "burn_samples.csv"  # NVML samples (clocks, power, temperature, events, PCIe) throughout
BURN_PLOT = "burn.svg"  # the same samples and the burn's TFLOP/s, drawn
DCGM_JSON = "dcgm_diag.json"  # `dcgmi diag --json` as DCGM wrote it, when dcgmi exists

# install: the module that reports what the installed torch says about itself.
VERIFY_MODULE = "training_pt.verify_torch"

# More files of the install stage: `pip freeze` of .venv-gpu as a requirements file that reproduces
# it, and every command install ran with its output (appended, one block per invocation).
REQUIREMENTS_GPU = "requirements-gpu.txt"
INSTALL_LOG = "install_log.txt"

# The environment of every process that may start NCCL, PyTorch symmetric memory or NVSHMEM: never
# NVLink multicast, which on a shared host can put every GPU out of service.
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

# Exit codes, the same from a stage run alone and from m40 (documented in README.md).
EXIT_OK = 0
EXIT_USAGE = 2  # bad option, bad config file, bad input
EXIT_LOCKED = 75  # another process holds the run folder (EX_TEMPFAIL: nox itself exits 1, 2 or 3)
EXIT_STAGE = {"probe": 10, "install": 20, "cuda_check": 30, "train": 40, "evidence": 50}
EXIT_PARTIAL = 70  # every stage passed, but not under the default checks on every GPU (tasks/verdict.py)
EXIT_INTERRUPTED = 130
EXIT_FLEET_NOT_PASS = (
    60  # nox -s fleet: a node is not PASS (FAIL, INTERRUPTED, PARTIAL, TAMPERED, UNSEALED, UNREADABLE)
)
EXIT_FLEET_OUTLIER = 61  # nox -s fleet: every node PASS, some more than outlier_share below their model's median


def gpu_python(venv: Path | None = None) -> Path:
    """The interpreter of .venv-gpu (or of another venv dir)."""
    venv = venv or VENV_GPU
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def venv_of(python: Path) -> Path | None:
    """The venv an interpreter path belongs to (`<venv>/bin/python`), or None for a Python outside any venv."""
    venv = Path(python).absolute().parent.parent
    return venv if (venv / "pyvenv.cfg").is_file() else None


def compile_cache(venv: Path | None = None) -> Path:
    """The compile cache beside a venv (default .venv-gpu): `<venv>.compile-cache`."""
    venv = Path(venv or VENV_GPU).absolute()
    return venv.with_name(venv.name + COMPILE_CACHE_SUFFIX)


def stage_record_path(run_dir: Path, stage: str) -> Path:
    return run_dir / STAGES_DIR / f"{stage}.json"
