"""The model: a Hugging Face causal LM built on the device, the causal SDPA attention, the loss module
DDP and compile wrap, and the FLOPs/MFU arithmetic. Runs in .venv-gpu (imports torch)."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from training_pt import ce_kernel, chunked_loss, gelu_mlp, tuned_gemm
from training_pt.configurator import EXIT_INPUT, TrainError, check_type

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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


def preload(family: str, compiles: bool) -> None:
    """Import now what build_model imports first, transformers and the family's model code (~3-5 s), and for
    a compiled run what torch.compile imports at its first call (Dynamo and Inductor, ~2-5 s)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    MODEL_FOR_CAUSAL_LM_MAPPING[config_class(family)]  # the mapping imports the model's module on lookup
    if compiles:
        import torch._dynamo  # noqa: F401
        import torch._inductor.compile_fx  # noqa: F401


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
    """The HF model on `device` in model.dtype, in training mode, plus the real vocab size (before padding)."""
    import transformers

    m = cfg["model"]
    register_causal_sdpa()
    dtype = DTYPES[m["dtype"]]
    dtype_kw = {"dtype": dtype} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": dtype}
    check_model_config(m["family"], dict(m["config"]))
    build = load_pretrained if m["pretrained"] else init_from_config
    model, vocab_real = build(cfg, device, log, dtype_kw)
    model.config.use_cache = False  # no KV cache in training: it only costs memory and copies
    if (residual := residual_dtype(cfg)) != m["dtype"]:
        cast_embeddings(model, DTYPES[residual])
    if cfg["train"]["mlp"] == "fused":
        fused, why = gelu_mlp.fuse(model, device, compute_dtype(cfg))
        if not fused:
            log(f"train.mlp fused: the plain MLP instead ({why})")
    if cfg["train"]["gemm"] == "tuned":
        tuned, why = tuned_gemm.tune(model, device, compute_dtype(cfg))
        if not tuned:
            log(f"train.gemm tuned: torch's GEMMs instead ({why})")
    if m["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, vocab_real


def residual_dtype(cfg: dict) -> str:
    """The residual stream's dtype, in words: the weights' dtype, or bfloat16 where train.residual_dtype asks
    for it under bf16 autocast (without autocast nothing else is bf16, so the setting has nothing to do)."""
    t = cfg["train"]
    cast = t["residual_dtype"] == "bfloat16" and t["autocast"] == "bfloat16"
    return "bfloat16" if cast else cfg["model"]["dtype"]


def compute_dtype(cfg: dict) -> torch.dtype:
    """The dtype the matmuls run in: bf16 under bf16 autocast, else the weights'."""
    return torch.bfloat16 if cfg["train"]["autocast"] == "bfloat16" else DTYPES[cfg["model"]["dtype"]]


def cast_embeddings(model, dtype: torch.dtype) -> int:
    """Make every embedding lookup of the base model return `dtype`, so the residual stream it starts is in
    `dtype` (train.residual_dtype). Autocast leaves embeddings alone: with fp32 weights the residual stream is
    fp32 and every residual add, LayerNorm and their gradients move fp32 tensors; Megatron-LM keeps it in
    bf16 unless asked (--fp32-residual-connection). Returns how many embeddings it hooked."""
    embeddings = [m for m in model.base_model.modules() if isinstance(m, torch.nn.Embedding)]
    for embedding in embeddings:
        embedding.register_forward_hook(lambda module, args, out: to_under_autocast(out, dtype))
    return len(embeddings)


def to_under_autocast(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`out` in `dtype` while autocast is on (its matmuls then take bf16), as it is otherwise: a forward
    outside autocast (an evaluation, say) would meet fp32 weights with bf16 inputs."""
    return out.to(dtype) if torch.is_autocast_enabled(out.device.type) else out


def load_pretrained(cfg: dict, device: torch.device, log, dtype_kw: dict):
    """model.pretrained: a local folder, or a hub id (from the cache only unless hub: true)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    m = cfg["model"]
    source = Path(m["pretrained"]).expanduser()
    where = str(source) if source.is_dir() else m["pretrained"]
    if not source.is_dir() and not cfg["hub"]:
        log(
            f"model.pretrained {m['pretrained']!r} is not a local folder; "
            "looking in the Hugging Face cache only (hub: false)"
        )
    try:
        conf = AutoConfig.from_pretrained(where, local_files_only=not cfg["hub"])
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
    for key, value in m["config"].items():
        if key != "vocab_size":
            setattr(conf, key, value)
    with torch.device(device):
        model = AutoModelForCausalLM.from_pretrained(
            where,
            config=conf,
            attn_implementation=m["attn_implementation"],
            local_files_only=not cfg["hub"],
            **dtype_kw,
        )
    model.to(device)
    want = padded(vocab_real, m["pad_vocab_multiple"])
    if want != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(want)
    return model, vocab_real


def init_from_config(cfg: dict, device: torch.device, log, dtype_kw: dict):
    """A random init from model.config, built on the device directly (fast, no CPU copy of a big model)."""
    import transformers
    from transformers import AutoModelForCausalLM

    m = cfg["model"]
    conf = config_class(m["family"])(**m["config"])
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
    with torch.device(device):
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
    return model, vocab_real


class NextTokenLoss(torch.nn.Module):
    """The model's decoder and LM head, and the mean next-token cross-entropy (what DDP and compile wrap).

    plain (fused=False): the loss takes the bf16 logits as they are (log-softmax accumulates in fp32 inside
    the kernel) and averages the per-token losses in fp32: HF's own loss first copies the B x T x V logits
    to fp32 and keeps a second fp32 B x T x V tensor for the backward (2 x 13.2 GB at B=64, T=1024, V=50304).
    fused: the LM head and the loss in one step whose forward also computes the gradients, `chunk` tokens
    at a time (0: the kernel's default), with the Triton loss kernel where it works on this GPU
    (training_pt/chunked_loss.py, ce_kernel.py); compile_net swaps `loss_fn` for the version whose torch
    kernel is compiled.
    """

    def __init__(self, lm, fused: bool = False, chunk: int = 0):
        super().__init__()
        self.lm, self.fused, self.chunk, self.loss_fn = lm, fused, chunk, chunked_loss.linear_cross_entropy
        head = lm.get_output_embeddings()
        if fused and getattr(head, "bias", None) is not None:
            raise TrainError(EXIT_INPUT, "train.loss fused needs an LM head without a bias; set train.loss: plain")
        self.triton, self.why_not_triton = ce_kernel.works(head.weight.device) if fused else (False, "")
        self.tuned = fused and tuned_gemm.in_use(lm)  # the LM head's GEMMs too (train.gemm)

    def describe(self) -> str:
        """The loss path in words, for the training log and the bench table."""
        if not self.fused:
            return "plain"
        kernel = "Triton kernel" if self.triton else f"torch kernel ({self.why_not_triton})"
        vocab = self.lm.get_output_embeddings().weight.shape[0]
        size = self.chunk or chunked_loss.default_chunk(self.triton, vocab)
        return f"fused, {kernel}, chunks of {f'up to {size} tokens' if size else 'the micro-batch'}"

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.head_loss(self.lm.base_model(input_ids=x).last_hidden_state, y)

    def head_loss(self, hidden: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        head = self.lm.get_output_embeddings()
        if self.fused:
            flat = hidden.flatten(0, 1)
            return self.loss_fn(flat, head.weight, y.flatten(), self.chunk, self.triton, tuned=self.tuned)
        logits = head(hidden)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            per_token = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        return per_token.float().mean()


def decoder_blocks(model) -> torch.nn.ModuleList:
    """The repeated transformer blocks (GPT-2's `h`, Gemma's `layers`): the base model's ModuleList."""
    for child in model.base_model.children():
        if isinstance(child, torch.nn.ModuleList):
            return child
    raise TrainError(EXIT_INPUT, f"{type(model).__name__} has no list of blocks; use train.compile_scope=model")


def compile_net(net, model, t: dict):
    """torch.compile per train.compile_scope; returns (forward, eager) where eager() undoes it.

    model: the whole step's graph (DDP included), the most fusion, the longest first compile.
    blocks: each transformer block and the LM head + loss apart. The blocks share one code object, so
    one compile serves all of them (parameters are graph inputs): a fraction of the first compile, at
    the cost of the fusions across block boundaries.
    Either way a fused loss (train.loss) is a graph break, its torch kernel compiled apart.
    """
    mode = None if t["compile_mode"] == "default" else t["compile_mode"]
    loss_module = net.module if hasattr(net, "no_sync") else net  # DDP wraps the loss module
    if not t["compile"]:
        return net, lambda: net
    blocks = decoder_blocks(model) if t["compile_scope"] == "blocks" else []
    eager_blocks = list(blocks)

    def eager():
        for i, block in enumerate(eager_blocks):
            blocks[i] = block
        vars(loss_module).pop("head_loss", None)  # back to the method
        loss_module.loss_fn = chunked_loss.linear_cross_entropy
        return net

    if loss_module.fused:
        loss_module.loss_fn = chunked_loss.compiled_linear_cross_entropy()
    if t["compile_scope"] == "model":
        return torch.compile(net, mode=mode), eager
    try:
        for i, block in enumerate(eager_blocks):
            blocks[i] = torch.compile(block, mode=mode)
        if not loss_module.fused:
            loss_module.head_loss = torch.compile(loss_module.head_loss, mode=mode)
    except Exception:
        eager()  # nothing half-compiled stays behind
        raise
    return net, eager


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


def model_flops(model, family: str, seq_len: int) -> tuple[int, str]:
    """(training FLOPs per token, the formula with this model's numbers) for MFU: the one place that counts."""
    n = matmul_params(model, family)
    layers, heads, head_dim = attention_shape(model)
    formula = f"6N + 12LHQT with N={n / 1e6:.1f}M, L={layers}, H={heads}, Q={head_dim}, T={seq_len}"
    return flops_per_token(n, layers, heads, head_dim, seq_len), formula


def mfu(flops_token: float, tokens_per_s_per_gpu: float, peak_tflops: float) -> float:
    return flops_token * tokens_per_s_per_gpu / (peak_tflops * 1e12)


def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (and embeddings), none on biases and norm gains (nanoGPT's rule)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
