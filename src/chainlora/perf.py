"""Speed settings for training and scoring, chosen from the measurements in ``bench/`` (see BENCHMARKS.md).

One place decides what a fast chainlora run uses, so the benchmarks measure exactly what the recipes run:
:func:`speed_defaults` gives a device's :class:`Speed`, and :func:`resolve_speed` makes a train config's
``auto`` settings concrete with it (``chainlora train`` records the result under ``speed`` in metrics.json).

Every automatic choice that differs between CUDA and the CPU, and how each was decided. Each is a pure function
of :class:`Capabilities` or of a device, so ``tests/test_speed_defaults.py`` checks each decision on the CPU
with made-up capabilities; ``bench/gpu_suite.py`` measures them on a GPU (BENCHMARKS.md, *GPU*: not run yet).

* **autocast** (``precision: auto``): bf16 where the device has native bf16 matmuls, else fp32. CUDA:
  ``torch.cuda.is_bf16_supported()`` (Ampere and later); CPU: AMX / AVX512-BF16, as oneDNN reports it
  (:func:`bf16_supported`). Measured ~1.4× on an AMX CPU (BENCHMARKS.md §1).
* **frozen base dtype** (``base_dtype: auto``): LoRA/COLA store the base in the autocast dtype (no weight cast
  every step, half the weight memory: 1.13× and 0.74× memory on the CPU, §1); LoRA weights, their gradients
  and the AdamW state stay fp32 (PEFT keeps adapters in fp32); full fine-tuning keeps fp32 weights. The same
  rule on every device (:func:`resolve_speed`).
* **AdamW**: ``fused=True`` wherever torch has the fused kernel: CUDA, and the CPU from torch 2.4
  (:func:`fused_adamw_supported`; the same steps as the default kernel, ``tests/test_bench_smoke.py``).
* **torch.compile** (``compile: auto``): on for CUDA, off on the CPU, where compiling takes 68–79 s and is repaid
  only after ~300 steps of 4×128 tokens (§1) (:func:`compile_by_default`). Not timed on a GPU yet. Under
  ``auto``, if compiling or a compiled step raises, the run goes on eagerly after one warning line and
  metrics.json records ``speed.compile: "failed → eager: <reason>"`` (``chainlora.recipes.trainer.RunTrainer``);
  ``compile: on`` fails loudly. A knot re-initialises the links in place, so the parameters stay the same
  objects and a compiled graph survives it without recompiling (``compiled_graph_count`` checks that).
* **fp32 master copies** of a half-precision base (``tie_knot``, so that repeated knots stay exact): on the CPU
  whatever the weight's device, since they are read only at a knot: on a GPU they take no accelerator memory
  (COLA's GPU memory = LoRA's). An FSDP2 shard keeps its master beside it (``chainlora.chain.master_device``).
* **attention**: SDPA on every device, transformers' default when ``attn_implementation`` is unset (chainlora
  never sets it); torch picks the kernel per call (flash, memory-efficient or cuDNN on CUDA; flash or math on
  the CPU).
* **prefix-batched scoring**: batches are cut where the padding saved outweighs a forward on the CPU (48 tokens,
  measured); full batches elsewhere, not measured (``chainlora.tasks.scoring.default_forward_cost``).
* **the training device**: CUDA whenever torch sees one (:func:`training_device`).
* **padded width** (``pad_to_multiple_of: null``): training batches are padded to a multiple of 8 on CUDA
  (tensor-core tiles), to their longest row elsewhere (:func:`pad_multiple`): on the CPU the rounding only adds tokens (SST-2: 36,992 vs 30,656 tokens
  an epoch, §3; chat data: 4 % more than TRL on identical batches, §8).

On every device, training batches are grouped by length (``chainlora.tasks.length_grouped_sampler``, HF's
``LengthGroupedSampler`` over the real lengths), and verbalized classification tasks train on one row per example
(``chainlora.tasks.shared_prompt.shared_prompt_view``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from chainlora.config import TrainConfig
from chainlora.config.train import Precision
from chainlora.errors import ConfigError

Batching = Literal["rows", "shared_prompt"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZERS = {
    "adamw": "adamw_torch",
    "sgd": "sgd",
    "adagrad": "adagrad",
}  # config name -> TrainingArguments.optim


def bf16_supported(device: str | torch.device) -> bool:
    """True when ``device`` runs bf16 matmuls natively (a CUDA bf16 GPU, a CPU with AMX or AVX512-BF16)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        try:
            return bool(check()) if check is not None else False
        except RuntimeError:
            return False
    return False


def fused_adamw_supported(device: str | torch.device) -> bool:
    """True when torch has a fused AdamW kernel for ``device`` (CUDA; CPU from torch 2.4)."""
    device = torch.device(device)
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        return device.type in _get_fused_kernels_supported_devices()
    except ImportError:  # older torch: only CUDA had fused kernels
        return device.type == "cuda"


@dataclass(frozen=True)
class Capabilities:
    """What the automatic choices depend on: read from torch by :func:`capabilities`, made up by tests."""

    device: str  # device type: "cuda", "cpu", ...
    bf16: bool  # native bf16 matmuls (bf16_supported)
    fused_adamw: bool  # torch has a fused AdamW kernel for the device (fused_adamw_supported)


def capabilities(device: str | torch.device) -> Capabilities:
    """``device``'s capabilities, as torch reports them."""
    device = torch.device(device)
    return Capabilities(device.type, bf16_supported(device), fused_adamw_supported(device))


def training_device() -> torch.device:
    """Where ``chainlora train`` trains: CUDA whenever torch sees it (the Trainer's ``use_cpu`` follows it)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compile_by_default(caps: Capabilities) -> bool:
    """``compile: auto``: on for CUDA only (on the CPU compiling costs 68–79 s, repaid after ~300 steps)."""
    return caps.device == "cuda"


def pad_multiple(device: str | torch.device, configured: int | None = None) -> int | None:
    """The multiple training batches are padded to: ``configured`` (``pad_to_multiple_of``) when set, else 8 on
    CUDA and none (the longest row) elsewhere."""
    if configured is not None:
        return configured
    return 8 if torch.device(device).type == "cuda" else None


@dataclass(frozen=True)
class Speed:
    """How a training run computes. :func:`speed_defaults` gives a device's fastest settings, :func:`resolve_speed`
    a train config's; ``metrics.json`` records them under ``speed`` (these fields, in this order)."""

    precision: Precision  # autocast dtype
    base_dtype: Precision  # dtype of the frozen base (LoRA weights, gradients, optimizer state stay fp32)
    optim: str  # TrainingArguments.optim: "adamw_torch_fused", "adamw_torch", "sgd" or "adagrad"
    compiled: bool = False  # torch.compile of the model (CUDA only by default, see the module docstring)
    compile: str = "off"  # how: "on", "off", "auto → on", "auto → off", or "failed → eager: <reason>"
    batching: Batching = "rows"  # one row per candidate (the harness) or per example (shared prompt)
    group_by_length: bool = True  # length-grouped training batches

    @property
    def torch_base_dtype(self) -> torch.dtype:
        """``base_dtype`` as a torch dtype, for ``chainlora.models.load(..., dtype=...)``."""
        return DTYPES[self.base_dtype]

    def describe(self) -> str:
        """One line: ``bf16 autocast, bf16 base, adamw_torch_fused, shared_prompt batches, length-grouped``."""
        return (
            f"{self.precision} autocast, {self.base_dtype} base, {self.optim}, {self.batching} batches"
            + (", length-grouped" if self.group_by_length else "")
            + (", compiled" if self.compiled else "")
        )

    def training_arguments(self) -> dict[str, object]:
        """Keyword arguments for ``transformers.TrainingArguments`` (the sampler is set by the recipe)."""
        return {
            "bf16": self.precision == "bf16",
            "fp16": self.precision == "fp16",
            "optim": self.optim,
            "torch_compile": self.compiled,
        }


def speed_defaults(device: str | torch.device | Capabilities) -> Speed:
    """The measured-fastest settings for ``device`` (see the module docstring and BENCHMARKS.md)."""
    caps = device if isinstance(device, Capabilities) else capabilities(device)
    precision: Precision = "bf16" if caps.bf16 else "fp32"
    compiled = compile_by_default(caps)
    return Speed(
        precision=precision,
        base_dtype=precision,
        optim="adamw_torch_fused" if caps.fused_adamw else "adamw_torch",
        compiled=compiled,
        compile="auto → on" if compiled else "auto → off",
    )


def resolve_speed(config: TrainConfig, caps: Capabilities | None = None) -> Speed:
    """``precision``/``base_dtype``/``compile`` ``auto`` → :func:`speed_defaults` of the training device (or of
    ``caps``); AdamW fused where torch has the kernel. Refuses a precision the device cannot run, in one line."""
    caps = caps or capabilities(training_device())
    defaults = speed_defaults(caps)
    precision = defaults.precision if config.precision == "auto" else config.precision
    if precision == "fp16" and caps.device == "cpu":
        raise ConfigError("precision: fp16 autocast needs a GPU; use bf16 or fp32 on the CPU")
    if config.method == "full":
        base_dtype = "fp32"  # the trained weights and their AdamW state stay fp32
    else:
        base_dtype = precision if config.base_dtype == "auto" else config.base_dtype
    optim = OPTIMIZERS[config.optimizer]
    if config.optimizer == "adamw" and defaults.optim == "adamw_torch_fused":
        optim = "adamw_torch_fused"
    compiled = defaults.compiled if config.compile == "auto" else config.compile == "on"
    return Speed(
        precision=precision,
        base_dtype=base_dtype,
        optim=optim,
        compiled=compiled,
        compile=defaults.compile if config.compile == "auto" else config.compile,
        group_by_length=config.group_by_length,
    )


def adamw(
    params: Iterable[torch.nn.Parameter],
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over ``params`` (materialised: a knot may swap parameters in its groups), fused when the
    parameters' device supports it (``fused=None``) or as asked."""
    params = list(params)
    if not params:
        raise ValueError("adamw: no parameters to optimize")
    if fused is None:
        fused = fused_adamw_supported(params[0].device) and all(p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, fused=fused)


@contextlib.contextmanager
def autocast(device: str | torch.device, precision: Precision) -> Iterator[None]:
    """``torch.autocast`` for ``precision`` on ``device`` (a no-op for fp32)."""
    device = torch.device(device)
    if precision == "fp32":
        yield
        return
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    with torch.autocast(device.type, dtype=dtype):
        yield


def compiled_graph_count() -> int:
    """Graphs compiled by ``torch.compile`` in this process so far (Dynamo's ``unique_graphs`` counter).

    Equal before and after a knot means the knot caused no recompilation.
    """
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
