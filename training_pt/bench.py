"""Benchmark GPT-2 training speed on one GPU, in one process: HF's defaults vs our smoke config vs compiled.

    python -m training_pt.bench [--config configs/submission_local_gpu_gpt2.yaml] [--compile] [--steps 20]
                                  [--warmup 5] [--batch-size 32] [--compile-mode default] [--out DIR]
                                  [--set key=value ...] [--device cpu]

Rows (configs/bench.yaml says what each one is): hf-default (the baseline), smoke (the YAML as it is),
smoke-eager (when the YAML compiles), and with --compile the `compiled` row (the YAML, compiled, at a
larger batch). Every row trains the same way on the same text: forward, backward, gradient clipping,
AdamW, one sync per step to read the loss. Warm-up steps (torch.compile happens there) are timed apart.
A row that fails (out of memory, a compile error) is reported in the table and the others still run.
Writes bench.json and bench.md into --out and prints the table last.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import os
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

from tasks import layout
from tasks.config import ConfigError, gpu_spec_for, load_yaml
from training_pt import bench_options
from training_pt import train as T  # the config, tokenizer, data, model and FLOPs code we measure


def load_bench_settings(path: Path) -> dict:
    try:
        data = load_yaml(path, empty_ok=True)
    except ConfigError as e:
        raise SystemExit(f"bench: {e}") from None
    for key in ("timed_steps", "warmup_steps", "compile_batch_size"):
        if not isinstance(data.get(key), int) or data[key] < 1:
            raise SystemExit(f"bench: {path}: {key} must be a positive integer")
    targets = data.get("targets") or {}
    for model, t in targets.items():
        for key in ("smoke_tok_s", "smoke_vs_baseline", "compiled_tok_s"):
            if not isinstance(t.get(key), (int, float)):
                raise SystemExit(f"bench: {path}: targets.{model}.{key} must be a number")
    data["targets"] = targets
    return data


@contextlib.contextmanager
def no_compile_caches():
    """Compile from scratch: a row that prefers another SDPA kernel differs from the others only in the
    kernel picked while tracing, which the compile caches' keys may not see."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    saved = inductor_config.fx_graph_cache, getattr(functorch_config, "enable_autograd_cache", None)
    inductor_config.fx_graph_cache = False
    if saved[1] is not None:
        functorch_config.enable_autograd_cache = False
    try:
        yield
    finally:
        inductor_config.fx_graph_cache = saved[0]
        if saved[1] is not None:
            functorch_config.enable_autograd_cache = saved[1]


def free_memory() -> None:
    gc.collect()
    torch._dynamo.reset()  # each compiled row compiles afresh, with static shapes
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def time_steps(step, batches, warmup: int, steps: int, device: torch.device) -> dict:
    """Run `warmup` then `steps` steps; the second group is timed. `step(x, y)` returns the loss tensor."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    t0 = time.perf_counter()
    first = None
    for _ in range(warmup):
        loss = step(*batches.next()).item()
        first = first if first is not None else loss
    sync()
    t1 = time.perf_counter()
    losses = []
    for _ in range(steps):
        losses.append(step(*batches.next()).item())  # one sync per step, as train.py
    sync()
    t2 = time.perf_counter()
    first = first if first is not None else losses[0]
    if not all(math.isfinite(v) for v in losses):
        raise RuntimeError(f"non-finite loss in the timed steps: {losses}")
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "warmup_s": t1 - t0,
        "timed_s": t2 - t1,
        "first_loss": first,
        "last_loss": losses[-1],
        "peak_alloc_gib": peak,
    }


def hf_default_row(cfg: dict, device: torch.device, batches, warmup: int, steps: int) -> dict:
    """The baseline: GPT2Config() defaults (sizes as the YAML's), SDPA, bf16 autocast, HF's loss, torch AdamW."""
    from transformers import AutoModelForCausalLM, GPT2Config

    sizes = {
        k: cfg["model"]["config"][k]
        for k in ("n_layer", "n_head", "n_embd", "n_positions")
        if k in cfg["model"]["config"]
    }
    conf = GPT2Config(**sizes)  # everything else: HF's defaults (dropout 0.1, gelu_new, vocab 50257, use_cache)
    torch.set_float32_matmul_precision("highest")  # PyTorch's default: no TF32
    torch.manual_seed(cfg["seed"])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(conf, attn_implementation="sdpa")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["train"]["lr"])
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def step(x, y):
        with autocast:
            loss = model(input_ids=x, labels=x).loss  # HF shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["train"]["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    layers, heads, head_dim = T.attention_shape(model)
    fpt = T.flops_per_token(T.matmul_params(model, "gpt2"), layers, heads, head_dim, cfg["train"]["block_size"])
    kernel = T.attention_kernel(device, model, cfg["train"]["block_size"], "auto")
    out = time_steps(step, batches, warmup, steps, device)  # the model is freed when this returns
    return {**out, "flops_per_token": fpt, "compile": "off", "attention": kernel}


def ours_row(cfg: dict, device: torch.device, batches, warmup: int, steps: int) -> dict:
    """Our settings from the YAML, built and stepped by train.py's own code."""
    t = cfg["train"]
    torch.set_float32_matmul_precision("high" if t["tf32"] else "highest")
    torch.manual_seed(cfg["seed"])
    model, _ = T.build_model(cfg, device, print)
    net = T.NextTokenLoss(model)
    step_net = (
        torch.compile(net, mode=None if t["compile_mode"] == "default" else t["compile_mode"]) if t["compile"] else net
    )
    opt = torch.optim.AdamW(
        T.param_groups(model, t["weight_decay"]),
        lr=t["lr"],
        betas=(t["beta1"], t["beta2"]),
        fused=t["fused_adamw"] and device.type == "cuda",
    )
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if t["autocast"] == "bfloat16"
        else contextlib.nullcontext()
    )

    def step(x, y):
        with autocast, T.sdpa_backend(t["sdpa_backend"]):
            loss = step_net(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    layers, heads, head_dim = T.attention_shape(model)
    fpt = T.flops_per_token(T.matmul_params(model, cfg["model"]["family"]), layers, heads, head_dim, t["block_size"])
    kernel = T.attention_kernel(device, model, t["block_size"], t["sdpa_backend"])
    with no_compile_caches() if t["compile"] and t["sdpa_backend"] != "auto" else contextlib.nullcontext():
        out = time_steps(step, batches, warmup, steps, device)
    return {**out, "flops_per_token": fpt, "compile": t["compile_mode"] if t["compile"] else "off", "attention": kernel}


def run_row(
    name: str,
    fn,
    cfg: dict,
    device: torch.device,
    tokens: torch.Tensor,
    warmup: int,
    steps: int,
    peak_tflops: float | None,
) -> dict:
    t = cfg["train"]
    row = {"variant": name, "batch_size": t["batch_size"], "block_size": t["block_size"], "compile": "?"}
    print(
        f"bench: {name}: batch {t['batch_size']} x {t['block_size']}, {warmup} warm-up + {steps} timed steps",
        flush=True,
    )
    batches = T.Batches(tokens, t["batch_size"], t["block_size"], cfg["seed"], device)
    try:
        out = fn(cfg, device, batches, warmup, steps)
    except torch.OutOfMemoryError:
        row["error"] = f"out of memory at batch_size={t['batch_size']}"
    except Exception as e:
        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    else:
        tok_s = t["batch_size"] * t["block_size"] * steps / out["timed_s"]
        row.update(
            out,
            tok_s=tok_s,
            ms_per_step=1000 * out["timed_s"] / steps,
            mfu=T.mfu(out["flops_per_token"], tok_s, peak_tflops) if peak_tflops else None,
        )
    free_memory()
    print(
        f"bench: {name}: " + (row.get("error") or f"{row['tok_s']:,.0f} tok/s, warm-up {row['warmup_s']:.1f} s"),
        flush=True,
    )
    return row


def verdicts(rows: dict, target: dict | None) -> dict:
    """PASS/MISS per target (None: no target for this GPU, or the row did not run)."""
    if not target:
        return {}
    base, smoke = rows.get("hf-default", {}), rows.get("smoke", {})
    compiled = [r for name, r in rows.items() if name.startswith("compiled") and "tok_s" in r]
    comp = max(compiled, key=lambda r: r["tok_s"]) if compiled else {}  # the best benchmark-mode row
    out = {}
    if "tok_s" in smoke:
        out["smoke_tok_s"] = smoke["tok_s"] >= target["smoke_tok_s"]
        if "tok_s" in base:
            out["smoke_vs_baseline"] = smoke["tok_s"] / base["tok_s"] >= target["smoke_vs_baseline"]
    if "tok_s" in comp:
        out["compiled_tok_s"] = comp["tok_s"] >= target["compiled_tok_s"]
    return out


def table(rows: list[dict], base_tok_s: float | None) -> str:
    head = (
        "| variant | compile | attention | batch x T | tok/s | MFU | ms/step | warm-up s | peak alloc GiB | "
        "vs hf-default | loss first -> last |\n|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"
    )
    lines = [head]
    for r in rows:
        bt = f"{r['batch_size']} x {r['block_size']}"
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['compile']} | | {bt} | failed: {r['error']} | | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        peak = f"{r['peak_alloc_gib']:.1f}" if r.get("peak_alloc_gib") is not None else "n/a"
        ratio = f"{r['tok_s'] / base_tok_s:.2f}x" if base_tok_s else "n/a"
        lines.append(
            f"| {r['variant']} | {r['compile']} | {r.get('attention', '')} | {bt} | {r['tok_s']:,.0f} | {mfu} | "
            f"{r['ms_per_step']:.1f} | "
            f"{r['warmup_s']:.1f} | {peak} | {ratio} | {r['first_loss']:.2f} -> {r['last_loss']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = bench_options.parser(__doc__.split("\n\n")[0])
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    settings = load_bench_settings(args.bench_config)
    steps = args.steps or settings["timed_steps"]
    warmup = args.warmup if args.warmup is not None else settings["warmup_steps"]
    out_dir = args.out or layout.RUNS_DIR / f"bench_{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        cfg = T.load_config(args.config, args.overrides)
    except T.TrainError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    if cfg["model"]["family"] != "gpt2":
        print("bench: the benchmark compares GPT-2 settings; --config must have model.family gpt2", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "bench: no CUDA device; the benchmark needs one GPU (--device cpu only tests the script)", file=sys.stderr
        )
        return 2
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if not cfg["hub"]:
        os.environ["HF_HUB_OFFLINE"] = "1"
    import transformers

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    spec = gpu_spec_for(gpu) if device.type == "cuda" else None
    total_gib = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else 0.0
    target = settings["targets"].get(spec.model) if spec else None
    peak_text = (
        f"{spec.model}, {spec.bf16_tflops:g} TFLOP/s bf16" if spec and spec.bf16_tflops else "no datasheet peak: no MFU"
    )
    print(
        f"bench: {gpu} ({peak_text}); "
        f"torch {torch.__version__}, transformers {transformers.__version__}; out {out_dir}",
        flush=True,
    )

    tokens = T.tokenize(T.gpt2_tokenizer(cfg["tokenizer"]["files_dir"]), T.load_documents(cfg["data"])[0])

    plan = [("hf-default", hf_default_row, cfg), ("smoke", ours_row, cfg)]
    if cfg["train"]["compile"]:
        eager = copy.deepcopy(cfg)
        eager["train"]["compile"] = False
        plan.append(("smoke-eager", ours_row, eager))
    if args.compile:
        comp = copy.deepcopy(cfg)
        comp["train"]["compile"] = True
        if args.compile_mode:
            comp["train"]["compile_mode"] = args.compile_mode
        if args.batch_size:
            comp["train"]["batch_size"] = args.batch_size
        elif total_gib >= 40:
            comp["train"]["batch_size"] = settings["compile_batch_size"]
        plan.append(("compiled", ours_row, comp))
        if comp["train"]["sdpa_backend"] != "cudnn" and device.type == "cuda":
            cudnn = copy.deepcopy(comp)
            cudnn["train"]["sdpa_backend"] = "cudnn"
            plan.append(("compiled-cudnn", ours_row, cudnn))
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    peak = spec.bf16_tflops if spec else None
    context = {
        "gpu": gpu,
        "gpu_model": spec.model if spec else None,
        "peak_bf16_tflops": peak,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "config": str(args.config),
        "overrides": args.overrides,
        "timed_steps": steps,
        "warmup_steps": warmup,
        "targets": target,
    }
    rows: list[dict] = []
    lines: list[str] = []
    for name, fn, c in plan:
        if only and name not in only:
            continue
        rows.append(run_row(name, fn, c, device, tokens, warmup, steps, peak))
        lines = write_report(out_dir, rows, context, spec, args.bench_config.name)  # kept if a later row hangs
    print("\n" + "\n".join(lines), flush=True)
    return 0 if all("error" not in r for r in rows) else 1


def write_report(out_dir: Path, rows: list[dict], context: dict, spec, settings_name: str) -> list[str]:
    """bench.json and bench.md for the rows so far; returns bench.md's lines."""
    by_name = {r["variant"]: r for r in rows}
    base = by_name.get("hf-default", {}).get("tok_s")
    target = context["targets"]
    result = {
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **context,
        "rows": rows,
        "verdicts": verdicts(by_name, target),
    }
    peak = context["peak_bf16_tflops"]
    where = f"{spec.model}, {peak:g} TFLOP/s dense bf16" if spec and peak else "no datasheet peak"
    lines = [
        f"GPT-2 training speed on one {context['gpu']} ({where}), torch {context['torch']} "
        f"(CUDA {context['cuda']}), transformers {context['transformers']}; {context['warmup_steps']} warm-up + "
        f"{context['timed_steps']} timed steps per row, one process, one GPU.",
        "",
        table(rows, base),
        "",
    ]
    if target:
        v = result["verdicts"]

        def word(key):
            return "n/a" if key not in v else ("PASS" if v[key] else "MISS")

        lines.append(
            f"Targets ({spec.model}): smoke >= {target['smoke_tok_s']:,} tok/s: {word('smoke_tok_s')}; "
            f"smoke >= {target['smoke_vs_baseline']}x hf-default: {word('smoke_vs_baseline')}; "
            f"best compiled row >= {target['compiled_tok_s']:,} tok/s: {word('compiled_tok_s')}"
        )
    else:
        lines.append(f"No speed targets for {context['gpu']} in {settings_name}: numbers only.")
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out_dir / "bench.md").write_text("\n".join(lines) + "\n")
    return lines


if __name__ == "__main__":
    sys.exit(main())
