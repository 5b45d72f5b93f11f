"""The verdict of a run, from its stage records held to each stage's own file: PASS, PARTIAL, FAIL or
INTERRUPTED.

Pure functions (no files but the rules' YAML, no torch: the caller passes the own files' text), so that
the judgement has a table test:

    FAIL / INTERRUPTED  a stage failed, was interrupted, did not finish (its record still says
                        "running"), was skipped or left no record; a passing stage's own file
                        (layout.STAGE_EVIDENCE: gpus.json, cuda_check.json, train_result.json) is
                        missing, cannot be read as a JSON object (tasks/jsonfile.py: too large, nested
                        too deep), does not say pass, or holds a figure other than the one the record
                        took from it (any error reading or comparing it is a FAIL, never a crash); or
                        install, cuda_check and train ran different torches (torch_identity differs)
    PARTIAL             every stage passed, but not the whole claim: a check changed from its
                        default (configs/verdict.yaml; train's thresholds vs the default training
                        config; steps outside 10-50), training on the CPU, fewer training processes
                        than GPUs, GPUs that NVML sees hidden from torch, stages on several hosts
                        (each record's `host`), a per-GPU check cuda_check
                        could not judge (`unjudged_checks`), a config file the verdict rests on that
                        differed from the tool's git commit (`changed_configs`), a training config
                        that is not this tool's (`config_path`), or a figure not recorded
    PASS                every stage passed under the default checks, training ran on CUDA on every
                        GPU that probe found, one and the same torch throughout

What the rule reads from the records' figures: probe `gpu_count` (NVML, or nvidia-smi); cuda_check
`gpus_checked` (torch's device count) and `unjudged_checks`; train `device`, `nproc`, `thresholds` and
`steps`; each stage's `overrides` (a list of "key=value") and `torch_identity` ({version, file,
record_sha256}) of install, cuda_check, train.

A stage's own file is read as the stage itself reads it when it writes its record (its `file_says`,
FILE_READERS): whether it says pass (probe: the gate passed; cuda_check: the checker's exit code 0;
train: status pass, exit code 0), and the figures the record takes from it. A figure the record does
not hold (an earlier version's record) is not compared. SHA256SUMS has no key: a forgery that edits
every file consistently passes; one that leaves the run disagreeing with itself never does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tasks import config, cuda_check, jsonfile, layout, probe, text, train
from tasks.records import StageRecord, StageStatus, without_credentials

WORK_STAGES = layout.WORK_STAGES
TORCH_STAGES = ("install", "cuda_check", "train")  # each records the torch it ran
PASS, PARTIAL, FAIL, INTERRUPTED = "PASS", "PARTIAL", "FAIL", "INTERRUPTED"
WORDS = (PASS, PARTIAL, FAIL, INTERRUPTED)
# Each stage's own reading of its own file (layout.STAGE_EVIDENCE): whether it says pass, and the figures the
# stage's record takes from it. The stage built its record with the same function, so a genuine run agrees.
FILE_READERS = {"probe": probe.file_says, "cuda_check": cuda_check.file_says, "train": train.file_says}
OwnFile = str | jsonfile.Unreadable  # an own file's text, or why it could not be read (evidence.own_files)


@dataclass(frozen=True)
class Verdict:
    word: str  # PASS | PARTIAL | FAIL | INTERRUPTED
    stage: str | None = None  # the stage a FAIL or INTERRUPTED names
    reason: str = ""  # one line: why it FAILed or was INTERRUPTED; PARTIAL: the deviations; PASS: ""
    deviations: tuple[str, ...] = ()  # each way the run falls short of a full PASS (PARTIAL)
    harmless: tuple[str, ...] = ()  # overrides that keep PASS, listed in the README

    @property
    def exit_code(self) -> int:
        if self.word == INTERRUPTED:
            return layout.EXIT_INTERRUPTED
        if self.word == FAIL:
            return layout.EXIT_STAGE.get(self.stage or "", layout.EXIT_STAGE["evidence"])
        return layout.EXIT_PARTIAL if self.word == PARTIAL else layout.EXIT_OK

    def line(self) -> str:
        """The verdict in one line: `PASS`, `PARTIAL: a; b`, `FAIL at train: why`."""
        if self.word == PARTIAL:
            return f"PARTIAL: {self.reason}"
        return f"{self.word} at {self.stage}: {self.reason}" if self.stage else self.word


@dataclass(frozen=True)
class Rules:
    """configs/verdict.yaml: per stage, the overrides that keep PASS ("any", or a closed [low, high])."""

    harmless: dict = field(default_factory=dict)  # {stage: {setting: "any" | [low, high]}}
    checks: dict = field(default_factory=dict)  # {"checks.min_loss_drop": 2.0, ...}: the default training checks
    judged_configs: tuple[str, ...] = ()  # config files (relative to the checkout) a verdict rests on
    training_configs: tuple[str, ...] = ()  # the training configs of this tool a PASS may train with


def load_rules(path: Path | None = None) -> Rules:
    path = path or layout.VERDICT_FILE
    table = config.load_yaml(path).get("harmless_overrides") or {}
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise config.ConfigError(f"{path}: harmless_overrides must map a stage to {{setting: any | [low, high]}}")
    for stage, settings in table.items():
        for key, rule in settings.items():
            if not (
                rule == "any"
                or (isinstance(rule, list) and len(rule) == 2 and all(isinstance(v, (int, float)) for v in rule))
            ):
                raise config.ConfigError(
                    f"{path}: harmless_overrides.{stage}.{key} must be any or [low, high], not {rule!r}"
                )
    checks = config.load_yaml(layout.TRAIN_CONFIG).get("checks") or {}
    data = config.load_yaml(path)
    lists = {}
    for key in ("judged_configs", "training_configs"):
        value = data.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise config.ConfigError(f"{path}: {key} must be a list of paths relative to the checkout, not {value!r}")
        lists[key] = tuple(value)
    return Rules(harmless=table, checks={f"checks.{k}": v for k, v in checks.items()}, **lists)


# --------------------------------------------------------------------------- the judgement


def judge(recs: dict[str, StageRecord], rules: Rules, own: Mapping[str, OwnFile]) -> Verdict:
    """The verdict of a run from its stage records (evidence's own record is ignored) and the text of each
    stage's own file (layout.STAGE_EVIDENCE) its folder holds, by file name, or why it could not be read
    (evidence.own_files)."""
    failed = stage_failure(recs) or own_file_failure(recs, own)
    harmless, deviations = judge_overrides(recs, rules)
    deviations += coverage_deviations(recs) + host_deviations(recs) + unjudged_checks(recs) + identity_gaps(recs)
    deviations += training_check_deviations(recs, rules) + config_deviations(recs, rules)
    if failed is None:
        failed = torch_disagreement(recs)
    if failed is not None:
        word, stage, reason = failed
        return Verdict(word, stage, reason, tuple(deviations), tuple(harmless))
    if deviations:
        return Verdict(PARTIAL, None, "; ".join(deviations), tuple(deviations), tuple(harmless))
    return Verdict(PASS, None, "", (), tuple(harmless))


def stage_failure(recs: dict[str, StageRecord]) -> tuple[str, str, str] | None:
    """INTERRUPTED names the stage Ctrl-C stopped; else FAIL names the first stage that failed or did
    not finish; else FAIL names the first stage skipped or without a record; None when all passed."""
    for name in WORK_STAGES:
        rec = recs.get(name)
        if rec is not None and rec.status == StageStatus.INTERRUPTED:
            return INTERRUPTED, name, rec.reason or f"{name} interrupted"
    for name in WORK_STAGES:
        rec = recs.get(name)
        if rec is not None and rec.status == StageStatus.FAIL:
            return FAIL, name, rec.reason or f"{name} failed"
        if rec is not None and rec.status == StageStatus.RUNNING:
            return FAIL, name, did_not_finish(rec)
    for name in WORK_STAGES:
        rec = recs.get(name)
        if rec is None:
            return FAIL, name, f"{name} did not run (no record in {layout.STAGES_DIR}/)"
        if rec.status == StageStatus.SKIP:
            return FAIL, name, f"{name} was skipped: {rec.reason}" if rec.reason else f"{name} was skipped"
    return None


def own_file_failure(recs: dict[str, StageRecord], own: Mapping[str, OwnFile]) -> tuple[str, str, str] | None:
    """FAIL at the first passing stage whose own file is missing or says otherwise than its record."""
    for name, file in layout.STAGE_EVIDENCE.items():
        rec = recs.get(name)
        if rec is not None and rec.status == StageStatus.PASS:
            why = own_file_disagreement(rec, file, own.get(file))
            if why:
                return FAIL, name, why
    return None


def own_file_disagreement(rec: StageRecord, file: str, content: OwnFile | None) -> str:
    """Why the stage's own file (its text, why it could not be read, None where missing) does not bear out its
    passing record; "" if it does: the file says pass as the stage reads it (FILE_READERS), with every figure the
    record holds from it. Any error reading or comparing it is that reason too: never a crash, never a pass."""
    says = f"{layout.STAGES_DIR}/{rec.stage}.json says pass but"
    if content is None:
        return f"{says} {rec.stage}'s file {file} is missing"
    try:
        said = FILE_READERS[rec.stage](own_document(content))
    except jsonfile.Unreadable as e:
        return f"{says} {file} is {e}"
    except Exception as e:  # RecursionError, MemoryError, a file the stage itself never writes
        return f"{says} {file} is not what {rec.stage} writes ({type(e).__name__}: {shown(str(e))})"
    if said.failure:
        return f"{says} {file} says {shown(said.failure)}"
    try:
        return figure_disagreement(rec, file, said.figures)
    except Exception as e:  # a figure too big or too deep to compare: no pass on its word
        return f"{says} {file} cannot be compared with it ({type(e).__name__}: {shown(str(e))})"


def own_document(content: OwnFile) -> dict:
    """The JSON object of an own file's text; jsonfile.Unreadable where it has none or could not be read."""
    if isinstance(content, jsonfile.Unreadable):
        raise content
    return jsonfile.parse(content)


def figure_disagreement(rec: StageRecord, file: str, said: dict) -> str:
    """The first figure the record holds that differs from the file's (and how many more), or ""."""
    differ = differing_figures(rec.figures, said)
    if not differ:
        return ""
    first, *more = differ
    line = f"{layout.STAGES_DIR}/{rec.stage}.json says {first}={shown(rec.figures[first])} "
    line += f"but {file} says {first}={shown(said[first])}"
    if more:
        line += f" ({'1 more figure differs' if len(more) == 1 else f'{len(more)} more figures differ'}: "
        line += f"{', '.join(more)})"
    return line


def differing_figures(recorded: dict, said: dict) -> list[str]:
    """The figures the record holds (not None: a figure not recorded is PARTIAL's business) that differ from
    those its stage reads from the file. URL credentials are compared as the record keeps them (none)."""
    said = without_credentials(said)
    return [k for k, v in said.items() if recorded.get(k) is not None and not same(recorded[k], v)]


def same(a, b) -> bool:
    """Equal, or equal as JSON (NaN is not equal to itself, yet a record copies one faithfully)."""
    return a == b or json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def shown(value) -> str:
    """A value from a file, on one line and short enough for a verdict's reason."""
    line = text.one_line(value if isinstance(value, str) else json.dumps(value, default=str))
    return line if len(line) <= 200 else line[:199] + "…"


def did_not_finish(rec: StageRecord) -> str:
    return (
        f"{rec.stage} did not finish: it started at {rec.started} and was stopped before it wrote its result "
        f"(killed: SIGKILL, the OOM killer, a job time limit? a full disk?); run it again: nox -s {rec.stage}"
    )


def judge_overrides(recs: dict[str, StageRecord], rules: Rules) -> tuple[list[str], list[str]]:
    """(harmless, deviations): every stage's overrides, each judged by configs/verdict.yaml."""
    harmless, deviations = [], []
    for name in WORK_STAGES:
        rec = recs.get(name)
        for item in (rec.figures.get("overrides") or []) if rec else []:
            key, _, value = str(item).partition("=")
            why = override_weakens(name, key.strip(), value.strip(), rules)
            if why:
                deviations.append(f"{name} ran with {item}: {why}")
            else:
                harmless.append(f"{name}: {item}")
    return harmless, deviations


def override_weakens(stage: str, key: str, value: str, rules: Rules) -> str:
    """Why `key=value` in `stage` is not the default checks ("" when it keeps PASS)."""
    settings = rules.harmless.get(stage) or {}
    # A training setting may be named by its unique leaf (`steps` for train.steps).
    rule = settings.get(
        key, next((r for k, r in settings.items() if "." not in key and k.rsplit(".", 1)[-1] == key), None)
    )
    if rule is None:
        return "a changed check or setting (only those in configs/verdict.yaml keep PASS)"
    if rule == "any":
        return ""
    low, high = rule
    try:
        number = float(value)
    except ValueError:
        return f"not a number; a PASS allows {low}-{high}"
    return "" if low <= number <= high else f"outside the {low}-{high} a PASS allows"


def coverage_deviations(recs: dict[str, StageRecord]) -> list[str]:
    """Training on CUDA on every GPU: probe's GPUs (NVML) vs torch's (cuda_check) vs train's processes."""
    out = []
    probe, check, train = (r.figures if (r := recs.get(s)) else {} for s in ("probe", "cuda_check", "train"))
    found, seen = probe.get("gpu_count"), check.get("gpus_checked")
    device, nproc = train.get("device"), train.get("nproc")
    if device is None:
        out.append("train recorded no device: training on CUDA is not shown")
    elif device != "cuda":
        out.append(f"train ran on {device}, not on CUDA (--train-device {device})")
    if not isinstance(found, int):
        out.append("probe recorded no gpu_count: training on every GPU it found is not shown")
    if not isinstance(seen, int):
        out.append("cuda_check recorded no gpus_checked: the GPUs torch saw are not shown")
    if isinstance(found, int) and isinstance(seen, int) and seen < found:
        out.append(
            f"torch saw {seen} of the {found} GPUs that {probe.get('source') or 'probe'} found "
            f"({found - seen} hidden from torch: CUDA_VISIBLE_DEVICES?)"
        )
    if not isinstance(nproc, int):
        out.append("train recorded no process count: training on every GPU is not shown")
    elif device == "cuda" and isinstance(seen, int) and nproc < seen:
        out.append(f"train ran {nproc} process(es) on {seen} GPUs that cuda_check checked (--nproc {nproc})")
    return out


def unjudged_checks(recs: dict[str, StageRecord]) -> list[str]:
    """cuda_check's per-GPU checks that ran but could not judge their GPU (`unjudged_checks`: a model with no
    datasheet figures, health counters NVML cannot read, no triton): the claim is not shown there."""
    rec = recs.get("cuda_check")
    names = rec.figures.get("unjudged_checks") if rec else None
    return [f"cuda_check could not judge {names} (its reason says why)"] if names else []


def host_deviations(recs: dict[str, StageRecord]) -> list[str]:
    """The stages that ran on another host than the first stage did (records from before the `host` field
    have none and are not compared): one run shows one machine. PARTIAL, not FAIL: a container per stage on
    one machine has a host name per container too."""
    hosts = [
        (s, rec.host)
        for s in WORK_STAGES
        if (rec := recs.get(s)) is not None and isinstance(rec.host, str) and rec.host
    ]
    first, first_host = hosts[0] if hosts else ("", "")
    others = [f"{name} on {host}" for name, host in hosts[1:] if host != first_host]
    if not others:
        return []
    return [
        f"{', '.join(others)}, but {first} ran on {first_host}: one run holds the stages of several hosts (a "
        "submission_runs/ shared between machines, or a container per stage?); run nox -s m40 in one place"
    ]


def config_deviations(recs: dict[str, StageRecord], rules: Rules) -> list[str]:
    """Config files the verdict rests on that differed from this tool's git commit while a stage ran (each
    record's `changed_configs`), and a training config that is not one of this tool's (train `config_path`):
    a PASS is a pass of the committed checks on a documented workload."""
    changed = sorted(
        {
            name
            for s in WORK_STAGES
            if (rec := recs.get(s)) is not None and isinstance(rec.figures.get("changed_configs"), list)
            for name in rec.figures["changed_configs"]
            if isinstance(name, str)
        }
    )
    out = []
    if changed:
        out.append(
            f"{', '.join(changed)} differed from this tool's git commit when the stages ran (git diff shows how): "
            "a PASS is a pass of the committed checks; commit the change, or undo it"
        )
    train = recs.get("train")
    path = train.figures.get("config_path") if train is not None else None
    if isinstance(path, str) and path not in rules.training_configs:
        out.append(
            f"train ran --train-config {path}, not a training config of this tool "
            f"({', '.join(rules.training_configs)}): its model, data and steps are not the documented workload"
        )
    return out


def identity_of(rec: StageRecord | None) -> dict | None:
    ident = rec.figures.get("torch_identity") if rec else None
    return ident if isinstance(ident, dict) else None


def describe_torch(ident: dict) -> str:
    sha = str(ident.get("record_sha256") or "?")[:12]
    return f"torch {ident.get('version')} from {ident.get('file')} (RECORD sha256 {sha})"


def torch_disagreement(recs: dict[str, StageRecord]) -> tuple[str, str, str] | None:
    """FAIL at the first stage whose torch is not install's (or cuda_check's when install recorded none)."""
    keys = ("version", "file", "record_sha256")
    known = [(s, ident) for s in TORCH_STAGES if (ident := identity_of(recs.get(s))) is not None]
    for (first, a), (name, b) in ((known[0], other) for other in known[1:]):
        if tuple(a.get(k) for k in keys) != tuple(b.get(k) for k in keys):
            return (
                FAIL,
                name,
                (
                    f"{name} ran {describe_torch(b)}, but {first} recorded {describe_torch(a)}: "
                    "not the torch that was installed and checked; look for PYTHONPATH or a second "
                    "torch, then run nox -s m40 again"
                ),
            )
    return None


def identity_gaps(recs: dict[str, StageRecord]) -> list[str]:
    missing = [s for s in TORCH_STAGES if recs.get(s) is not None and identity_of(recs.get(s)) is None]
    return (
        [f"{', '.join(missing)} recorded no torch identity: one and the same torch throughout is not shown"]
        if missing
        else []
    )


def training_check_deviations(recs: dict[str, StageRecord], rules: Rules) -> list[str]:
    """The checks train.py enforced (`thresholds`, from whatever config file) against the default
    training config's, and its step count against the range a PASS allows."""
    train = recs.get("train")
    if train is None:
        return []
    out = []
    used = train.figures.get("thresholds")
    if not isinstance(used, dict):
        out.append("train: the checks in force are not recorded (no thresholds figure)")
    else:
        for key, default in rules.checks.items():
            if used.get(key) != default:
                out.append(f"train ran with {key}={used.get(key)}, not the default {default} (--train-config)")
    steps, span = train.figures.get("steps"), (rules.harmless.get("train") or {}).get("train.steps")
    if not isinstance(steps, int):
        out.append("train recorded no step count: a smoke run of the default length is not shown")
    elif isinstance(span, list) and not span[0] <= steps <= span[1]:
        out.append(f"train ran {steps} steps: outside the {span[0]}-{span[1]} a PASS allows")
    return out
