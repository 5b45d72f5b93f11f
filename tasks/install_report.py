"""The install stage's reports: torch_version.txt (what was tried, what was installed, from where) and
requirements-gpu.txt (the freeze, each line pinned to the exact file installed where known).

Written from the stage's context and attempts (tasks/install.py); nothing here runs a command.
"""

from __future__ import annotations

import re

from tasks import layout, records
from tasks.identity import normalize
from tasks.installers import Installed, redact_url

REPORT = layout.STAGE_FILES["install"][0]  # torch_version.txt


def _fmt_facts(facts: dict) -> list[str]:
    devices = facts.get("devices") or []
    dev = (
        "; ".join(
            f"{d.get('index')}: {d.get('name')} (sm_{''.join(map(str, d.get('capability') or []))})" for d in devices
        )
        or "none"
    )
    archs = facts.get("arch_list")
    return [
        f"  torch              {facts.get('torch_version')}",
        f"  torch.version.cuda {facts.get('cuda')}",
        f"  cuDNN              {facts.get('cudnn')}",
        f"  git_version        {facts.get('git_version')}",
        f"  triton             {facts.get('triton') or 'not installed'}",
        f"  torchvision        {facts.get('torchvision') or 'not installed'}",
        f"  cuda available     {facts.get('cuda_available')}   (built with CUDA: {facts.get('cuda_built')})",
        f"  devices            {dev}",
        f"  arch list          {' '.join(archs) if isinstance(archs, list) else archs}",
        f"  python             {facts.get('python')} ({facts.get('executable')})",
        f"  torch location     {facts.get('torch_file')}",
    ]


def _fmt_files(files: list) -> list[str]:
    if not files:
        return ["  (none downloaded)"]
    out = []
    for f in files:
        f = f if isinstance(f, Installed) else Installed(**f)
        out.append(f"  {f.name} {f.version}\n      {redact_url(f.url)}\n      sha256={f.sha256 or '?'}")
    return out


def write_report(
    ctx,
    *,
    status: str,
    reason: str,
    attempts: list,
    chosen: dict | None,
    facts: dict | None,
    freeze: str,
    noop: bool,
    seconds: float,
) -> None:
    """torch_version.txt; `ctx` is install's Context, `attempts` its Attempts (channel, tries, facts)."""
    lines = [
        f"install: {status.upper()}" + (f" — {reason}" if reason else ""),
        f"written {records.now_iso()}; venv {ctx.venv}",
        "",
        *_chosen_lines(ctx, chosen, noop),
    ]
    if ctx.machine is not None:
        lines.append(f"machine      {ctx.machine.describe()}")
    if ctx.auto_lines:
        lines += ["", "channel choice (auto):", *(f"  {ln}" for ln in ctx.auto_lines)]
    lines += ["", f"attempts ({len(attempts)}, {seconds:.1f} s in all):"]
    for i, a in enumerate(attempts, 1):
        lines += _attempt_lines(i, a)
    if noop:
        lines.append("  (no-op: .venv-gpu already held this install and it verified again; nothing was run)")
    if facts:
        lines += ["", "torch (verified in .venv-gpu's own Python):", *_fmt_facts(facts)]
    if chosen:
        lines += ["", "wheels installed (URL, sha256):", *_fmt_files(chosen.get("files") or [])]
    lines += ["", "commands run:", *(f"  $ {c}" for c in ctx.log.commands)]
    if freeze:
        lines += ["", "pip freeze of .venv-gpu:", *(f"  {ln}" for ln in freeze.splitlines())]
    (ctx.run_dir / REPORT).write_text(redact_url("\n".join(lines) + "\n"))


def _chosen_lines(ctx, chosen: dict | None, noop: bool) -> list[str]:
    """The channel, source and installer that .venv-gpu holds (with the interpreter a provisioned one reuses)."""
    if not chosen:
        return [f"pip config   {ctx.env_line}"]
    ch = ctx.catalog.get(chosen["channel"])
    lines = [
        f"channel      {chosen['channel']} (kind {chosen['entry']['kind']})"
        + (f" — {ch.note}" if ch and ch.note else ""),
        f"source       {redact_url(chosen['source'])}",
        f"installer    {chosen['installer']}",
        f"pip config   {ctx.env_line}",
        f"installed    {chosen['installed']}" + ("  (this run: no-op, verified again)" if noop else ""),
    ]
    if chosen.get("provisioned"):
        p = chosen["provisioned"]
        lines += [
            f"reuses torch of {p['executable']} (Python {p['version']}), unmodified; "
            f".venv-gpu is built from {p['base_executable']} and its {layout.VENV_PROVISIONED_PTH} lists:"
        ]
        lines += [f"    {d}" for d in p["site_dirs"]]
    return lines


def _attempt_lines(i: int, a) -> list[str]:
    """Attempt number `i`: its line, its channel's note, each source tried, and what a failed one installed."""
    lines = [
        f"  {i}. {a.line()}  [{a.seconds:.1f} s; source {redact_url(a.source) or '-'}; installer {a.installer or '-'}]"
    ]
    if a.channel.note:
        lines.append(f"     note: {a.channel.note}")
    for j, t in enumerate(a.tries, 1):
        lines.append(f"     source {j}/{len(a.channel.sources)}: {t.line()}")
    if not a.ok and a.facts and "torch_version" in a.facts:
        lines.append(
            f"     it installed torch {a.facts['torch_version']} (torch.version.cuda {a.facts.get('cuda')}, "
            f"cuda available {a.facts.get('cuda_available')}); discarded with the staging venv"
        )
    if not a.ok and a.files:
        lines.append(f"     files it installed into the staging venv (discarded), {len(a.files)}:")
        lines += [f"       {f.name} {f.version} {redact_url(f.url)} sha256={f.sha256 or '?'}" for f in a.files]
    return lines


def write_requirements(ctx, marker: dict, freeze: str) -> None:
    """requirements-gpu.txt: the freeze, each line pinned to the exact file installed where known."""
    by_name: dict[str, dict] = {}
    for f in marker.get("files") or []:
        by_name.setdefault(normalize(f["name"]), f)
    head = [
        f"# .venv-gpu: channel {marker['channel']}, torch {marker['torch_version']}, installed {marker['installed']}",
        "# Reproduce: python -m venv .venv-gpu && .venv-gpu/bin/python -m pip install --no-deps "
        "--only-binary=:all: -r requirements-gpu.txt",
    ]
    if marker.get("provisioned"):
        head.append(
            f"# (torch and the packages commented out below are reused from {marker['provisioned']['executable']}:"
            " `nox -s install -p system -- --from-python` it rebuilds that part)"
        )
    body, kept = [], []
    for line in freeze.splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$", line.strip())
        f = by_name.get(normalize(m.group(1))) if m else None
        if m and f and f["url"] and f["version"] == m.group(2):
            url = f["url"] + (f"#sha256={f['sha256']}" if f.get("sha256") else "")
            body.append(f"{f['name']} @ {url}")
        elif marker.get("provisioned"):
            kept.append(line)
        else:
            body.append(line)
    if kept:
        body += [
            f"# provided by {marker['provisioned']['executable']} (not downloaded, reused through "
            f"{layout.VENV_PROVISIONED_PTH}):",
            *(f"# {ln}" for ln in kept),
        ]
    (ctx.run_dir / layout.REQUIREMENTS_GPU).write_text(redact_url("\n".join(head + body) + "\n"))
