"""Accelerator choices in one place: precision, gradient scaling, backend flags, attention path.

Everything that runs the model (training, inference, explain, perturb) takes these decisions
from here, so a GPU run and a CPU run differ only where this module says they do:

- `resolve_precision`: the compute dtype under autocast. "auto" is bfloat16 on CUDA (float16
  with gradient scaling on GPUs without bfloat16) and float32 elsewhere; "bf16" asks for
  bfloat16 autocast on any device (CPU included, the same code path as on the GPU); "fp32"
  turns autocast off.
- `configure_backends`: the process-wide `torch.backends` flags for that precision. fp32 runs
  use IEEE fp32 matmuls (no TF32), so "fp32" means what it says and numerical checks hold.
- `varlen_support` / `choose_attention`: the start-up capability check for packed flash
  attention (`torch.nn.attention.varlen.varlen_attn`). Where it cannot run — torch too old, not
  CUDA, a float32 compute dtype, a GPU older than sm80, an unsupported head size, or a probe
  call that fails — the model uses padded SDPA and ONE warning names the reason. CPU runs use
  padded SDPA by design and are not warned about.
- `reference_varlen_attn`: a pure-PyTorch implementation of `varlen_attn`'s contract. It is a
  test substitute (slow, a Python loop over cells), never used by the product's paths; tests
  put it in place of the kernel to check the packed path on machines without a GPU, and
  `benches/gpu_check.py` compares the real kernel against it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn as _kernel
except ImportError:  # pragma: no cover - depends on the installed torch
    _kernel = None

PRECISIONS = ("auto", "bf16", "fp32")
HALF = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- precision


@dataclass(frozen=True)
class Precision:
    """The compute dtype on one device: an autocast context and a gradient scaler for it."""

    device: torch.device
    dtype: torch.dtype  # float32 = no autocast

    @property
    def name(self) -> str:
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def grad_scaler(self) -> torch.amp.GradScaler:
        # Only float16 can underflow gradients; with bfloat16 or float32 the scaler is a no-op.
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)


def resolve_precision(device: torch.device | str, precision: str = "auto") -> Precision:
    """"auto": bf16 autocast on CUDA (fp16 + grad scaling without bf16), fp32 elsewhere;
    "bf16": bf16 autocast on any device; "fp32": no autocast."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return Precision(device, torch.float32)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return Precision(device, torch.float16)
    return Precision(device, torch.bfloat16)


def configure_backends(precision: Precision) -> None:
    """Process-wide backend flags for `precision` (no-op off CUDA)."""
    if precision.device.type != "cuda":
        return
    # Under autocast the matmuls run in half precision anyway; the fp32 ones left (fp32 mode)
    # stay IEEE so that fp32 numerics match the CPU's.
    torch.backends.cuda.matmul.allow_tf32 = precision.dtype != torch.float32
    torch.backends.cudnn.allow_tf32 = precision.dtype != torch.float32
    # Batch shapes change every step (token-budget batches); autotuning per shape costs more
    # than it gains.
    torch.backends.cudnn.benchmark = False
    # varlen_attn picks cuDNN or flash among the enabled SDPA backends; the padded path may
    # also use memory-efficient attention (it takes the boolean key mask, flash does not).
    torch.backends.cuda.enable_flash_sdp(True)
    torch.backends.cuda.enable_mem_efficient_sdp(True)


def compile_model(model: torch.nn.Module, backend: str = "inductor") -> torch.nn.Module:
    """`torch.compile` for packed batches: shapes dynamic from the start (every batch has its own
    token count and cell count), and data-dependent sizes traced rather than split off (the
    masked-gene loss projects only the masked positions, `hidden[labels != -100]`)."""
    import torch._dynamo

    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    return torch.compile(model, dynamic=True, backend=backend)


def compile_encoder(model: torch.nn.Module, backend: str = "inductor") -> torch.nn.Module:
    """`torch.compile` the encoder (`model.bert`) in place, for inference; returns `model`.

    Every inference path (predict, embed, explain's and perturb's evaluations, gene scores)
    calls the encoder, through `model(...)` or `model.encode(...)`, so compiling it covers them
    all while the small heads and pooling stay eager, and the model keeps its type and
    parameter names (no `_orig_mod` wrapper). Compiling twice is a no-op."""
    import torch._dynamo

    if getattr(model.bert, "_compiled_call_impl", None) is None:
        torch._dynamo.config.capture_dynamic_output_shape_ops = True
        model.bert.compile(dynamic=True, backend=backend)
    return model


# ----------------------------------------------------------------------------- capability check


def varlen_support(device: torch.device | str, dtype: torch.dtype, head_dim: int) -> str | None:
    """None when packed flash attention can run here, else the reason it cannot (one sentence)."""
    device = torch.device(device)
    if _kernel is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (it needs torch >= 2.10)"
    if device.type != "cuda":
        return f"the device is {device.type}; the varlen kernel runs on CUDA only"
    if dtype not in HALF:
        return f"the compute dtype is {str(dtype).removeprefix('torch.')}; the varlen kernel needs bfloat16 or float16"
    if head_dim % 8 or head_dim > 256:
        return f"head size {head_dim} is not a multiple of 8 up to 256, which the flash kernel needs"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"{torch.cuda.get_device_name(device)} is sm{major}{minor}; flash attention needs sm80 or newer"
    if not torch.backends.cuda.is_flash_attention_available():
        return "this torch build has no flash attention kernels"
    if not (torch.backends.cuda.flash_sdp_enabled() or torch.backends.cuda.cudnn_sdp_enabled()):
        return "both the flash and cuDNN SDPA backends are disabled (torch.backends.cuda)"
    return None


_probed: dict[tuple, str | None] = {}
_warned: set[str] = set()


def _probe(device: torch.device, dtype: torch.dtype, heads: int, head_dim: int) -> str | None:
    """Run the kernel once forward and backward on a tiny packed batch; the error if it fails."""
    key = (str(device), dtype, heads, head_dim)
    if key not in _probed:
        try:
            q = torch.randn(3, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
            cu = torch.tensor([0, 1, 3], device=device, dtype=torch.int32)
            _kernel(q, q, q, cu, cu, 2, 2).sum().backward()
            _probed[key] = None
        except Exception as err:  # noqa: BLE001 - any failure means: do not use the kernel
            _probed[key] = f"a probe call failed ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
    return _probed[key]


def warn_once(message: str) -> None:
    """Warn with `message` once per process (the same fallback reason is not repeated)."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def choose_attention(model: torch.nn.Module, precision: Precision, *, training: bool = False,
                     requested: str = "auto") -> tuple[str, str | None]:
    """Fix the model's attention path for this run; returns (impl, reason padded SDPA is used).

    `requested` "sdpa" forces the padded path; "varlen" or "auto" take the kernel where it can
    run. A fallback on CUDA, or from an explicit "varlen", warns once with the reason; training
    on the kernel with attention-probability dropout warns that this dropout is skipped.
    """
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // heads
    if requested == "sdpa":
        model.set_attn_impl("sdpa")
        return "sdpa", "padded SDPA was requested"
    reason = varlen_support(precision.device, precision.dtype, head_dim)
    if reason is None:
        reason = _probe(precision.device, precision.dtype, heads, head_dim)
    if reason is not None:
        model.set_attn_impl("sdpa")
        if precision.device.type == "cuda" or requested == "varlen":
            warn_once(f"packed flash attention is off, using padded SDPA instead: {reason}.")
        return "sdpa", reason
    # "auto": the kernel for every half-precision call; a float32 call (e.g. outside autocast)
    # takes padded SDPA, since the kernel has no float32 and would fail inside.
    model.set_attn_impl("auto")
    if training and cfg.attention_probs_dropout_prob > 0:
        warn_once(f"the varlen flash kernel has no attention-probability dropout, so "
                  f"attention_probs_dropout_prob={cfg.attention_probs_dropout_prob} is not applied "
                  "(hidden-state dropout is); set it to 0 to silence this.")
    return "varlen", None


# ----------------------------------------------------------------------------- reference kernel


def check_varlen_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_q: torch.Tensor,
                        cu_seq_k: torch.Tensor, max_q: int, max_k: int) -> None:
    """The input contract the flash kernel documents or assumes; ValueError naming what breaks it.

    Packed [T, heads, head_dim] tensors of one dtype on one device with a unit-stride last
    dimension; cu_seqlens int32, [N+1], starting at 0, non-decreasing, ending at T; max_q/max_k
    at least the longest sequence (the kernel sizes its grid from them and reads nothing past).
    The dtype (half precision on the real kernel) is left to `varlen_support`, so that the
    reference can also run in float32.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be packed [T, heads, head_dim], got shape {tuple(t.shape)}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension (stride {t.stride(-1)})")
        if t.dtype != query.dtype or t.device != query.device:
            raise ValueError(f"{name} must match query's dtype and device")
    if key.shape != value.shape or key.shape[1:] != query.shape[1:]:
        raise ValueError(f"query {tuple(query.shape)}, key {tuple(key.shape)} and value {tuple(value.shape)} disagree")
    for name, cu, total, longest in (("cu_seq_q", cu_seq_q, query.shape[0], max_q),
                                     ("cu_seq_k", cu_seq_k, key.shape[0], max_k)):
        if cu.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, not {cu.dtype}")
        if cu.dim() != 1 or cu.numel() < 2 or cu.device != query.device:
            raise ValueError(f"{name} must be a 1-D [N+1] tensor on the query's device")
        lengths = cu[1:] - cu[:-1]
        if int(cu[0]) != 0 or int(cu[-1]) != total or bool((lengths < 0).any()):
            raise ValueError(f"{name} must rise from 0 to the {total} packed tokens")
        if int(lengths.max()) > longest:
            raise ValueError(f"{name} holds a sequence of {int(lengths.max())} tokens, longer than the max {longest}")
    if cu_seq_q.numel() != cu_seq_k.numel():
        raise ValueError("cu_seq_q and cu_seq_k must describe the same number of sequences")


def reference_varlen_attn(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_q: torch.Tensor,
                          cu_seq_k: torch.Tensor, max_q: int, max_k: int, *, return_aux=None,
                          scale: float | None = None, window_size: Sequence[int] = (-1, -1)) -> torch.Tensor:
    """`torch.nn.attention.varlen.varlen_attn`'s result, computed plainly (a test substitute).

    Same positional signature and keywords `scale` and `window_size` ((-1, -1) full, (-1, 0)
    causal, as in torch >= 2.11, where `is_causal` became `window_size`). Each sequence attends
    only to itself: softmax(q kᵀ · scale) v per sequence and head, the softmax in float32, the
    output in the input dtype. Written with explicit matmuls and a per-cell loop so that it
    shares no code with the padded SDPA path it is compared against.
    """
    check_varlen_inputs(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k)
    if return_aux is not None:
        raise NotImplementedError("the reference does not return the log-sum-exp")
    window = tuple(window_size)
    if window not in ((-1, -1), (-1, 0)):
        raise NotImplementedError(f"window_size {window}: only full (-1, -1) and causal (-1, 0)")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    bounds_q, bounds_k = cu_seq_q.tolist(), cu_seq_k.tolist()
    pieces = []
    for i in range(len(bounds_q) - 1):
        q = query[bounds_q[i]:bounds_q[i + 1]].transpose(0, 1).float()  # [H, Lq, D]
        k = key[bounds_k[i]:bounds_k[i + 1]].transpose(0, 1).float()
        v = value[bounds_k[i]:bounds_k[i + 1]].transpose(0, 1).float()
        scores = (q @ k.transpose(1, 2)) * scale
        if window == (-1, 0):  # causal: query i sees keys 0..i (equal lengths, as in self-attention)
            lq, lk = scores.shape[-2:]
            allowed = torch.ones(lq, lk, dtype=torch.bool, device=scores.device).tril()
            scores = scores.masked_fill(~allowed, float("-inf"))
        pieces.append((scores.softmax(-1) @ v).transpose(0, 1).to(query.dtype))
    return torch.cat(pieces)
