"""What the evidence README shows first: the figures that prove the verdict, the versions, what to do.

Read from the stage records and the run's own files (cuda_check.json's versions); nothing here runs
on the GPU or judges anything (tasks/verdict.py judges). Never imports torch.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tasks import jsonfile, layout
from tasks.records import StageRecord

# What to do after a FAIL at each stage: where to look, and how to go on (the reason says the cause).
WHAT_TO_DO = {
    "probe": "fix the driver or GPU the line above names (env_info.txt and nvidia_smi.txt hold what probe saw), "
    "then run `nox -s m40` again",
    "install": "follow the fix the line above names, or pick another channel: `nox -s m40 -- --channels NAME` "
    "(torch_version.txt lists every attempt and its outcome)",
    "cuda_check": "cuda_check.txt has one line per check with its value and tolerance; fix what the failing check "
    "names, then run `nox -s cuda_check` (or `nox -s m40`) again",
    "train": "training_log.txt and train_console.txt hold the run; fix what the line above names, then run "
    "`nox -s train` (or `nox -s m40`) again",
}
PARTIAL_TO_DO = (
    "run `nox -s m40` again without these: a PASS needs the default checks, training on CUDA on every "
    "GPU that probe found, and one torch throughout"
)


def figure(recs: dict[str, StageRecord], stage: str, key: str):
    rec = recs.get(stage)
    value = rec.figures.get(key) if rec else None
    return None if value in (None, "") else value


def per_gpu(recs: dict[str, StageRecord], suffix: str) -> list[tuple[int, float, float | None]]:
    """[(gpu, value, % of datasheet)] of cuda_check's `gpu<i>_<suffix>` figures."""
    rec = recs.get("cuda_check")
    figs = rec.figures if rec else {}
    out = []
    for key, value in figs.items():
        head, _, tail = key.partition("_")
        if head.startswith("gpu") and head[3:].isdigit() and tail == suffix and isinstance(value, (int, float)):
            pct_key = f"{head}_{suffix.split('_')[0]}_pct_datasheet"
            out.append((int(head[3:]), float(value), figs.get(pct_key)))
    return sorted(out)


def slowest(rows: list[tuple[int, float, float | None]], unit: str, what: str) -> str | None:
    if not rows:
        return None
    gpu, value, pct = min(rows, key=lambda r: r[1])
    text = f"{value:g} {unit}" + (f" ({pct:g}% of datasheet)" if isinstance(pct, (int, float)) else "")
    if len(rows) > 1:
        text += f", the slowest of {len(rows)} GPUs (gpu{gpu}; fastest {max(r[1] for r in rows):g})"
    return f"{text}; {what}"


def proof_rows(recs: dict[str, StageRecord]) -> list[dict]:
    """The figures that prove the verdict, one row each; a row whose figure was not recorded is left out."""
    rows = []
    passed, failed, skipped = (figure(recs, "cuda_check", k) for k in ("checks_pass", "checks_fail", "checks_skip"))
    if passed is not None:
        gpus = figure(recs, "cuda_check", "gpus_checked")
        on = f" on {gpus} GPU(s)" if gpus is not None else ""
        rows.append(
            ("CUDA checks", f"{passed} passed, {failed or 0} failed, {skipped or 0} skipped{on} (cuda_check.txt)")
        )
    for suffix, unit, what, label in (
        ("bf16_tflops", "TFLOP/s", "dense bf16 matmul", "bf16 matmul"),
        ("copy_tbs", "TB/s", "device memory copy", "memory copy"),
    ):
        if (text := slowest(per_gpu(recs, suffix), unit, what)) is not None:
            rows.append((label, text))
    if (busbw := figure(recs, "cuda_check", "allreduce_busbw_gbs")) is not None:
        rows.append(("NCCL all-reduce", f"{busbw:g} GB/s bus bandwidth"))
    rows += training_rows(recs)
    return [{"what": w, "figure": f} for w, f in rows]


def training_rows(recs: dict[str, StageRecord]) -> list[tuple[str, str]]:
    first, final, steps = (figure(recs, "train", k) for k in ("first_loss", "final_loss", "steps"))
    rows = []
    if first is not None and final is not None:
        model = figure(recs, "train", "model") or "the model"
        rows.append(("training loss", f"{model}: {first:.2f} → {final:.2f}" + (f" in {steps} steps" if steps else "")))
    tok_s, per_gpu_tok, nproc = (figure(recs, "train", k) for k in ("tok_s", "tok_s_per_gpu", "nproc"))
    if tok_s is not None:
        text = f"{tok_s:,.0f} tok/s"
        if per_gpu_tok is not None and nproc and nproc > 1:
            text += f" ({per_gpu_tok:,.0f} per GPU × {nproc})"
        rows.append(("training speed", text + f" on {figure(recs, 'train', 'device') or 'an unrecorded device'}"))
    mfu, peak = figure(recs, "train", "mfu_pct"), figure(recs, "train", "peak_tflops")
    if isinstance(mfu, (int, float)):  # "n/a" without a datasheet peak (a CPU run, a GPU not in gpus.yaml)
        peak_text = f" of {peak:g} TFLOP/s bf16 dense per GPU" if isinstance(peak, (int, float)) else ""
        rows.append(("MFU", f"{mfu:g}%" + peak_text))
    return rows


# --------------------------------------------------------------------------- versions


def checker_versions(run_dir: Path) -> dict:
    """The versions the checker read inside .venv-gpu (cuda_check.json "versions"), or {}."""
    try:
        data = jsonfile.read(run_dir / layout.CUDA_CHECK_JSON)
    except jsonfile.Unreadable:
        return {}
    versions = data.get("versions")
    return versions if isinstance(versions, dict) else {}


def tool_commit(root: Path | None = None) -> str:
    """This tool's git commit, "+ uncommitted changes" when the checkout differs from it."""
    root = root or layout.ROOT
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,  # noqa: S607
            text=True,
            timeout=20,
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain"],
            capture_output=True,  # noqa: S607
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (git not available)"
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    return head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def changed_files(paths: list[str], root: Path | None = None) -> list[str] | None:
    """Which of `paths` (relative to the checkout) differ from its git commit in content: edited, deleted or
    new (a mode changed by a copy or a mount is not a change); None where git cannot tell (no git, not a
    checkout)."""
    root = root or layout.ROOT

    def git(*args: str) -> subprocess.CompletedProcess | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)  # noqa: S607
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done if done.returncode == 0 else None

    prefix = git("rev-parse", "--show-prefix")  # the checkout inside a larger repository: its paths start there
    tracked = git("ls-files", "--error-unmatch", "--", *paths[:1])  # a copy unpacked in another repo: no checkout
    status = git("-c", "core.fileMode=false", "status", "--porcelain", "--untracked-files=all", "--", *paths)
    if prefix is None or tracked is None or status is None:
        return None
    listed = {line[3:].strip().strip('"') for line in status.stdout.splitlines() if len(line) > 3}
    return [p for p in paths if prefix.stdout.strip() + p in listed]


def identity_text(ident) -> str | None:
    """install's torch_identity in one line (tasks/verdict.py compares it with cuda_check's and train's)."""
    if not isinstance(ident, dict):
        return None
    return f"{ident.get('file')} (RECORD sha256 {str(ident.get('record_sha256'))[:16]}…)"


def versions(recs: dict[str, StageRecord], run_dir: Path, gpu_doc: dict) -> list[tuple[str, str]]:
    """(component, version) in a fixed order; a component nobody recorded is left out."""
    checker = checker_versions(run_dir)

    def first(*values):
        return next((str(v) for v in values if v not in (None, "", "none")), None)

    driver, driver_cuda = figure(recs, "probe", "driver") or gpu_doc.get("driver"), figure(recs, "probe", "driver_cuda")
    rows = [
        ("NVIDIA driver", first(f"{driver} (supports CUDA {driver_cuda})" if driver and driver_cuda else driver)),
        ("Python (.venv-gpu)", first(checker.get("python"), figure(recs, "train", "python"))),
        ("torch", first(figure(recs, "install", "torch"), checker.get("torch"), figure(recs, "train", "torch"))),
        ("torch as installed", identity_text(figure(recs, "install", "torch_identity"))),
        (
            "CUDA (torch build)",
            first(checker.get("cuda"), figure(recs, "cuda_check", "cuda_build"), figure(recs, "install", "cuda")),
        ),
        ("cuDNN", first(checker.get("cudnn"), figure(recs, "cuda_check", "cudnn"))),
        ("NCCL", first(checker.get("nccl"), figure(recs, "cuda_check", "nccl"))),
        ("triton", first(checker.get("triton"), figure(recs, "install", "triton"))),
        ("transformers", first(figure(recs, "train", "transformers"))),
        ("install channel", first(figure(recs, "install", "channel"))),
        ("this tool (git commit)", tool_commit()),
    ]
    return [(name, value) for name, value in rows if value is not None]
