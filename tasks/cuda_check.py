"""Stage cuda_check: will PyTorch really compute correctly and fast on every GPU of this machine?

The checks run in `.venv-gpu`'s Python as one fresh, isolated process (`python -m training_pt.gpu_checks`,
started by tasks/proc.py's launcher: it imports torch, nox's interpreter never does). It writes
cuda_check.txt (one PASS/FAIL/SKIP line per check with its value, reason and time) and cuda_check.json;
its console goes to cuda_check.log. This module turns the JSON into the stage's Outcome (`file_says`:
the one reading of it, to which tasks/verdict.py holds the record). The stage fails when any check
FAILs, and also when no GPU check ran at all: on a machine where torch sees no GPU the checker SKIPs
the GPU checks with the reason, but a machine that cannot compute does not pass. In a job of several
nodes (tasks/multinode.py) it then runs one all-reduce over every node's GPUs
(training_pt/allreduce_nodes.py under torchrun).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tasks import burn_rules, config, cuda_rules, identity, jsonfile, layout, multinode, phases, proc, text
from tasks.records import FileSays, Outcome, StageStatus

DESCRIPTION = (
    "Check that PyTorch computes correctly and at speed on every GPU (build, driver, devices, kernels "
    "for the architecture, matmul/conv/attention against float64, memory, copy and matmul speed against "
    "the datasheet, torch.compile, NCCL all-reduce, NVML health); runs in .venv-gpu"
)
TXT = layout.STAGE_FILES["cuda_check"][0]


def add_arguments(parser) -> None:
    parser.add_argument(
        "--check-mem-share",
        type=config.share_arg(0.9),
        default=None,
        metavar="F",
        help="share of each GPU's free memory the memory check writes and reads back "
        "(default: memory_share in configs/cuda_check.yaml, 0.5)",
    )
    parser.add_argument(
        "--check-speed-share",
        type=config.share_arg(1.0),
        default=None,
        metavar="F",
        help="FAIL a copy or matmul speed below this share of the GPU's datasheet figure "
        "(default: speed_share in configs/cuda_check.yaml, 0.5)",
    )
    parser.add_argument(
        "--check-seed",
        type=seed_arg,
        default=None,
        metavar="N",
        help="seed of the checks' random inputs (default: a fresh one, recorded in cuda_check.txt)",
    )
    parser.add_argument(
        "--level",
        choices=burn_rules.LEVELS,
        default=None,
        help="quick: the checks above (seconds per GPU; the default, also in m40); long: also a "
        "burn-in on every GPU at once and the fabric checks (docs/cuda_check.md)",
    )
    parser.add_argument(
        "--duration",
        type=seconds_arg,
        default=None,
        metavar="SECONDS",
        help="seconds of the long level's burn (default: duration_s in configs/burnin.yaml, 300)",
    )
    parser.add_argument(
        "--dcgm-level",
        type=int,
        choices=(1, 2, 3, 4),
        default=None,
        metavar="N",
        help="`dcgmi diag -r N` in the long level where dcgmi exists (default: configs/burnin.yaml, 1)",
    )


DURATION_S = (1.0, 7 * 24 * 3600.0)  # a burn of at least a second (two products to compare), at most a week
SEED_MAX = 2**62  # the checker draws a seed per check from it upwards; torch takes 64-bit seeds


def seconds_arg(text: str) -> float:
    """--duration: seconds from DURATION_S[0] to DURATION_S[1]."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not DURATION_S[0] <= value <= DURATION_S[1]:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds from {DURATION_S[0]:g} to {DURATION_S[1]:g} (a week); "
            "give e.g. --duration 300"
        )
    return value


def seed_arg(text: str) -> int:
    """--check-seed: a whole number from 0 to SEED_MAX."""
    if not text.strip().isdigit() or int(text) > SEED_MAX:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 0 to 2**62; give e.g. --check-seed 7")
    return int(text)


def checker_args(run_dir: Path, args) -> list:
    """The checker's options: the run folder, the settings files and the stage's --check-* options."""
    cmd = ["--out", run_dir, "--config", layout.CUDA_CHECK_FILE, "--gpus-file", layout.GPUS_FILE]
    for option, name in (
        ("--mem-share", "check_mem_share"),
        ("--speed-share", "check_speed_share"),
        ("--seed", "check_seed"),
        ("--level", "level"),
        ("--duration", "duration"),
        ("--dcgm-level", "dcgm_level"),
    ):
        value = getattr(args, name, None)
        if value is not None:
            cmd += [option, str(value)]
    return cmd


USES_GPU_VENV = True  # the harness holds .venv-gpu shared while run() runs: no install swaps it meanwhile


def check_inputs(args) -> None:
    """The check tolerances, the GPU datasheet, the burn-in settings and the NVML tables (clock events,
    Xids) the checker judges with, refused before any stage runs (ConfigError, exit 2)."""
    for option, name in (("--duration", "duration"), ("--dcgm-level", "dcgm_level")):
        if getattr(args, name, None) is not None and getattr(args, "level", None) != "long":
            raise config.ConfigError(f"{option} applies to --level long only; add --level long, or drop it")
    config.load_cuda_check()
    config.load_gpus()
    config.load_burnin()
    config.load_nvml()


def run(run_dir: Path, args) -> Outcome:
    python = layout.gpu_python()
    if not python.exists():
        return Outcome(
            StageStatus.FAIL, f"no .venv-gpu ({python} does not exist): run `nox -s install -p <channel>` first"
        )
    settings = config.load_cuda_check()  # a bad config is a one-line ConfigError before anything runs
    config.load_gpus()
    burnin = config.load_burnin()
    limit = burn_rules.time_budget_s(
        getattr(args, "level", None) or "quick",
        getattr(args, "duration", None) or burnin["duration_s"],
        settings["timeout_s"],
        burnin["extra_timeout_s"],
    )
    result_path = run_dir / layout.CUDA_CHECK_JSON
    result_path.unlink(missing_ok=True)  # never read a previous run's result as this one's
    log = run_dir / layout.CUDA_CHECK_LOG
    # The checker stops itself after timeout_s (faulthandler); this limit is the backstop.
    code = proc.run_gpu(python, layout.GPU_CHECKS_MODULE, checker_args(run_dir, args), log, timeout=limit + 60)
    result = read_result(result_path)
    files = [name for name in (TXT, layout.CUDA_CHECK_JSON, layout.CUDA_CHECK_LOG) if (run_dir / name).exists()]
    lines = log_lines(log)
    hung = any(line.startswith("Timeout (") for line in lines)  # faulthandler's watchdog fired
    if getattr(args, "level", None) == "long":  # written by this run only: a quick re-run does not claim them
        files += [
            name for name in (layout.BURN_SAMPLES, layout.BURN_PLOT, layout.DCGM_JSON) if (run_dir / name).exists()
        ]
    out = outcome_from(result, code, lines[-1][:300] if lines else "", limit, files, hung)
    out.figures["overrides"] = overrides(args)  # tasks/verdict.py: a changed check is not a full PASS
    return across_nodes(run_dir, args, python, out, settings)


def across_nodes(run_dir: Path, args, python: Path, out: Outcome, settings: dict) -> Outcome:
    """In a job of several nodes (the train stage's options under m40, or the scheduler's environment),
    one all-reduce over every node's GPUs once this node's own checks pass (tasks/multinode.py)."""
    if out.status != StageStatus.PASS:
        return out  # the checker's own failure reason, not a rendezvous problem
    try:
        job = multinode.resolve(args, os.environ)
    except ValueError as e:
        return Outcome(StageStatus.FAIL, str(e), out.figures, out.files)
    nproc = out.figures.get("gpus_checked") or 0
    if job is None or job.nnodes < 2 or nproc < 1:
        return out
    ok, reason, figures = multinode.allreduce_across_nodes(
        run_dir, job, python, nproc, mib=settings["sizes"]["allreduce_mib"], timeout=settings["allreduce_timeout_s"]
    )
    files = out.files + [n for n in (multinode.CHECK_RESULT, layout.ALLREDUCE_NODES_LOG) if (run_dir / n).exists()]
    return Outcome(
        out.status if ok else StageStatus.FAIL, out.reason if ok else reason, {**out.figures, **figures}, files
    )


# The options that change a setting of configs/cuda_check.yaml, recorded by that setting's key.
OVERRIDE_KEYS = (("check_mem_share", "memory_share"), ("check_speed_share", "speed_share"), ("check_seed", "seed"))


def overrides(args, defaults: dict | None = None) -> list[str]:
    """The settings this run changed from configs/cuda_check.yaml, as "key=value" (an option given with
    the config's own value changes nothing and is not listed)."""
    defaults = config.load_cuda_check() if defaults is None else defaults
    return [
        f"{key}={value}"
        for name, key in OVERRIDE_KEYS
        if (value := getattr(args, name, None)) is not None and value != defaults.get(key)
    ]


def read_result(path: Path) -> dict | None:
    """The checker's cuda_check.json, or None where it left none (or one jsonfile cannot read: not a JSON object)."""
    try:
        return jsonfile.read(path)
    except jsonfile.Unreadable:
        return None


def log_lines(path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return []


def outcome_from(
    result: dict | None, code: int, log_tail: str, timeout_s: float, files: list, hung: bool = False
) -> Outcome:
    """The stage's Outcome from the checker's JSON result (None if it wrote none) and exit code."""
    if result is None:
        if code == 124:
            why = f"the checker did not finish within {timeout_s:g} s"
        elif hung:
            why = f"the checker hung and stopped itself after {timeout_s:g} s (stack in {layout.CUDA_CHECK_LOG})"
        else:
            why = f"the checker exited with code {code} and wrote no {layout.CUDA_CHECK_JSON}"
        tail = f" (last output: {log_tail})" if log_tail else ""
        return Outcome(StageStatus.FAIL, f"{why}{tail}; see {layout.CUDA_CHECK_LOG}", {}, files)
    said = file_says(result)
    figures = dict(said.figures)
    versions = result.get("versions")
    if "torch_identity" not in figures and isinstance(versions, dict) and versions.get("torch_file"):
        # a checker that wrote no identity: the torch its versions name, as found here
        figures["torch_identity"] = identity.of_torch(versions["torch_file"], str(versions.get("torch")))
    reason = result.get("reason") or ""
    if not said.failure and code == 0:
        return Outcome(StageStatus.PASS, reason, figures, files)  # a pass's reason notes what was not judged
    if not reason:
        reason = f"the checker exited with code {code} after writing its result; see {layout.CUDA_CHECK_LOG}"
    return Outcome(StageStatus.FAIL, reason, figures, files)


def checks_of(result: dict) -> list:
    """cuda_check.json's checks; ValueError naming a check whose `gpu` is neither None (a check across GPUs) nor
    a GPU index (cuda_rules.gpu_index_problem), which the checker never writes."""
    checks = result.get("checks", [])
    for c in checks:
        gpu = c.get("gpu")
        if gpu is not None and (why := cuda_rules.gpu_index_problem(gpu)):
            raise ValueError(f"check {text.one_line(c.get('name'))[:60]} names {why}")
    return checks


def thresholds(settings: dict) -> dict | None:
    """The pass limits the checker applied: its speed and memory shares and its numeric tolerances."""
    out = {k: settings[k] for k in ("speed_share", "memory_share") if k in settings}
    out.update({f"tolerances.{k}": v for k, v in (settings.get("tolerances") or {}).items()})
    return out or None


def unjudged(check: dict) -> bool:
    """A per-GPU SKIP that could not judge its GPU: a model without datasheet figures, health counters NVML
    cannot read, no triton for the compile check, an NVLink state NVML cannot read. Recorded as
    `unjudged_checks`, it makes the run PARTIAL. Not a SKIP whose check found nothing to judge and says so
    (`nothing_to_judge`: no NVLink link on a PCIe card), nor one of a check across GPUs (one GPU: no pair)."""
    data = check.get("data") or {}
    return check.get("status") == "SKIP" and check.get("gpu") is not None and not data.get("nothing_to_judge")


def file_says(result: dict) -> FileSays:
    """What cuda_check.json says: a pass (the checker's exit code 0) or what instead, and the figures this stage's
    record takes from it (figures_from). tasks/verdict.py holds a passing record to them."""
    code, reason = result.get("exit_code"), result.get("reason")
    failure = "" if code == 0 else f"exit code {code}" + (f": {reason}" if reason else "")
    return FileSays(failure, figures_from(result))


def figures_from(result: dict) -> dict:
    """Flat key numbers for the evidence table and summary.json, from cuda_check.json alone (no other file read:
    tasks/verdict.py computes them again from the sealed file)."""
    counts = result.get("counts", {})
    versions = result.get("versions", {})
    fig: dict = {
        "checks_pass": counts.get("PASS", 0),
        "checks_fail": counts.get("FAIL", 0),
        "checks_skip": counts.get("SKIP", 0),
        "checks_warn": counts.get("WARN", 0),
        "gpus_checked": result.get("gpus_checked", 0),
        "check_s": result.get("total_s"),
        "seed": result.get("seed"),
        "torch": versions.get("torch"),
        "cuda_build": versions.get("cuda"),
        # which torch the checker imported (tasks/verdict.py compares it with install's and train's)
        "torch_identity": result.get("torch_identity") or None,  # None: left out (the stage may derive it)
        "device": "cuda" if result.get("gpus_checked") else "cpu",
        "nproc": result.get("gpus_checked", 0),
        "thresholds": thresholds(result.get("settings") or {}),
    }
    failed: list[str] = []
    not_judged: dict[str, list[int]] = {}
    for c in checks_of(result):
        data, gpu, name = c.get("data") or {}, c.get("gpu"), c.get("name")
        if c.get("status") == "FAIL":
            failed.append(name if gpu is None else f"gpu{gpu} {name}")
        if unjudged(c):
            not_judged.setdefault(name, []).append(gpu)
        if name == "driver" and data.get("driver_cuda"):
            fig["driver_cuda"] = data["driver_cuda"]
        elif name == "speed.matmul_bf16" and data.get("tflops"):
            fig[f"gpu{gpu}_bf16_tflops"] = round(data["tflops"], 1)
            if data.get("share"):
                fig[f"gpu{gpu}_bf16_pct_datasheet"] = round(100 * data["share"], 1)
        elif name == "speed.copy" and data.get("tbs"):
            fig[f"gpu{gpu}_copy_tbs"] = round(data["tbs"], 3)
            if data.get("share"):
                fig[f"gpu{gpu}_copy_pct_datasheet"] = round(100 * data["share"], 1)
        elif name == "sdpa.causal" and data.get("backend"):
            fig[f"gpu{gpu}_sdpa_backend"] = data["backend"]
        elif name == "allreduce" and data.get("busbw_gbs"):
            fig["allreduce_busbw_gbs"] = round(data["busbw_gbs"], 1)
        fig.update(burn_rules.figures(name, gpu, data))
    fig.update(phases.figures(result.get("phases")))  # where the checker's seconds went (its log's `phases:` line)
    if failed:
        fig["failed_checks"] = ", ".join(failed)
    if not_judged:  # tasks/verdict.py: PARTIAL, the claim not shown on these GPUs
        fig["unjudged_checks"] = ", ".join(f"{cuda_rules.gpu_span(gpus)} {name}" for name, gpus in not_judged.items())
    return {k: v for k, v in fig.items() if v is not None}
