"""COLA on a bitsandbytes-quantized base (QLoRA): knots that never round a link into the 4-bit / 8-bit weight.

A bitsandbytes base layer (``bnb.nn.Linear4bit`` nf4/fp4, ``bnb.nn.Linear8bitLt`` int8) cannot absorb a link
exactly: writing ``W + s·B·A`` back into 4 bits rounds the update into the quantization grid (what the ReLoRA
tools do). Here a knot leaves the quantized weight alone and appends the finished link to a frozen low-rank
*residual* beside it::

    y = base_q(x) + x·Vᵀ·Uᵀ (+ c) + s·B·A·x          V = [A_1; …; A_k]              (R × in)
                                                       U = [s_1·B_1, …, s_k·B_k]      (out × R)
                                                       c = Σ s_i·b_i  (only with a LoRA bias)

The residual lives in :class:`ResidualLinear`, a small module inserted between PEFT's bitsandbytes LoRA layer
and the bitsandbytes layer (``lora_layer.base_layer = ResidualLinear(bnb_layer)``, by :func:`attach_residuals`)
and recorded in the layer's chain state (``chainlora.links.LayerChain.residual``). Its inner module is called
``base_layer`` too, so PEFT's ``get_base_layer()`` still reaches the bitsandbytes layer. U, V and c are
*buffers*: not trainable, moved by ``.to()``, in ``model.state_dict()``, absent from PEFT's adapter files (no
``lora_`` in their names). ``chain.tie_knot`` calls :func:`tie_layer` for every quantized LoRA layer.

Invariants (``tests/test_quantized.py``):

* **function-preserving knot**: right after a knot (``quantized_merge="residual"``) B = 0 and the residual holds
  exactly what the link added: outputs are unchanged up to fp32 rounding of ``(x·Aᵀ)·(s·B)ᵀ`` vs
  ``((x·Aᵀ)·Bᵀ)·s``. The quantized weight is bit-identical.
* **reference**: after any number of knots the model computes ``x·deq(W_q)ᵀ + Σ_i s_i·B_i·A_i·x``, the fp32
  COLA chain on the dequantized base (4-bit; int8 in training mode on the CPU, see :func:`dequantize_weight`).
* **export**: residual + current link are ONE plain PEFT LoRA of rank ``R + r`` (``chainlora.export_adapter``);
  ``PeftModel.from_pretrained(quantized_base, folder)`` computes the trained model.

Options: ``max_residual_rank`` re-compresses the residual by a truncated SVD when it outgrows the cap and reports
``‖dropped‖/‖residual‖`` per layer (that knot is then *not* function-preserving, by exactly that amount);
``quantized_merge="requantize"`` does dequantize → add → re-quantize in place (the ReLoRA way, lossy) and reports
the error it introduced per layer. :func:`merge_dequantized` builds a plain bf16/fp32 model, the error of the
cast stated.

CPU caveat (bitsandbytes 0.50): on a CPU with AVX512-BF16, ``Linear4bit.forward`` in eval mode without grad
*permanently* repacks the weight for a bf16 kernel (block scales rounded to bf16; outputs move by ~1e-3 even in
training mode afterwards; it fails with ``shape '[32, 0]' is invalid`` when in_features < 64).
:func:`disable_cpu_bf16_repack` switches this off right after loading, and refuses a weight already repacked.
"""

from __future__ import annotations

import math
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from chainlora import distributed
from chainlora.errors import ChainLoRAError, ConfigError, KnotError
from chainlora.links import TiedLink, layer_chain, quantization, truncate

__all__ = [
    "BITSANDBYTES",
    "QUANTIZED_MERGES",
    "QUANT_SCHEMES",
    "LayerKnot",
    "MergeReport",
    "RequantizeError",
    "ResidualLinear",
    "attach_residuals",
    "bitsandbytes_version",
    "bnb_config",
    "check_merge_options",
    "dequantize_weight",
    "disable_cpu_bf16_repack",
    "merge_dequantized",
    "quantized_lora_layers",
    "requantize_",
    "residual_memory_bytes",
    "residual_of",
    "tie_layer",
]

# PEFT's bitsandbytes LoRA classes and bitsandbytes' layers exist only when bitsandbytes imports, and carry
# attributes (lora_A, quant_state, state.SCB …) typed nowhere: Any.
LoraBnbLayer = Any
BnbLinear = Any
QUANT_SCHEMES: tuple[str, ...] = ("nf4", "fp4", "int8")
QUANTIZED_MERGES: tuple[str, ...] = ("residual", "requantize")
BITSANDBYTES = "bitsandbytes==0.50.2"  # the version tested here (the `quantized` extra pins it)


# ------------------------------------------------------------------------------------------- bitsandbytes


def _bnb() -> Any:
    """``bitsandbytes``, or a one-line :class:`ConfigError` saying how to install it."""
    try:
        import bitsandbytes
    except ImportError as err:  # also raised for a broken native library
        raise ConfigError(
            f"quantize: bitsandbytes is not installed ({err}); pip install 'chainlora[quantized]' "
            f"(or pip install '{BITSANDBYTES}')"
        ) from None
    return bitsandbytes


def bitsandbytes_version() -> str | None:
    """The installed bitsandbytes version, None when it is not installed (without importing it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bitsandbytes")
    except PackageNotFoundError:
        return None


def bnb_config(scheme: str, compute_dtype: torch.dtype = torch.float32, *, double_quant: bool = False) -> Any:
    """The ``transformers.BitsAndBytesConfig`` of ``scheme`` (nf4, fp4 or int8).

    Raises :class:`ConfigError` for an unknown scheme or a missing bitsandbytes, before anything is loaded.
    ``compute_dtype``: what 4-bit layers dequantize to and multiply in (fp32 for exact tests).
    """
    if scheme not in QUANT_SCHEMES:
        raise ConfigError(f"quantize: unknown scheme {scheme!r}; expected one of {', '.join(QUANT_SCHEMES)}")
    _bnb()
    from transformers import BitsAndBytesConfig

    if scheme == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=scheme,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
    )


def _quant_state(module: BnbLinear) -> Any:
    return getattr(module.weight, "quant_state", None) or getattr(module, "quant_state", None)


def disable_cpu_bf16_repack(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its bf16 CPU kernel; returns the layers changed.

    bitsandbytes 0.50 does this on the first eval-mode, no-grad forward on an AVX512-BF16 CPU and never undoes
    it: block scales are rounded to bf16 (the dequantized weight moves by up to ~2e-4) and every later forward,
    training mode included, computes in bf16. Call it right after loading. Raises :class:`ChainLoRAError` for a
    weight already repacked (its exact values are gone: reload the model).
    """
    changed = 0
    for name, module in model.named_modules():
        if quantization(module) not in ("nf4", "fp4") or hasattr(module, "lora_A"):
            continue
        if getattr(_quant_state(module), "packing_format_for_cpu", False):
            raise ChainLoRAError(
                f"{name}: bitsandbytes already repacked this 4-bit weight for its bf16 CPU kernel (an eval-mode "
                "forward without grad); its block scales were rounded to bf16: reload the model"
            )
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


@torch.no_grad()
def dequantize_weight(module: BnbLinear) -> torch.Tensor:
    """The weight a bitsandbytes layer multiplies by, in fp32 (out × in); exact, nothing is rounded.

    4-bit: ``dequantize_4bit`` (the very tensor ``MatMul4Bit`` uses in training). int8: ``CB·SCB/127`` (what
    the CPU training path ``MatMul8bitFp`` uses; the eval/GPU int8 path also quantizes the *activations*, so
    it is not ``x·deq(W)ᵀ`` and no dequantized weight reproduces it exactly).
    """
    bnb = _bnb()
    weight = module.weight
    if quantization(module) != "int8":
        state = _quant_state(module)
        if getattr(state, "packing_format_for_cpu", False):
            raise ChainLoRAError(
                "4-bit weight is repacked for the bf16 CPU kernel; see disable_cpu_bf16_repack"
            )
        return bnb.functional.dequantize_4bit(weight.data, state).float()
    scb = module.state.SCB if module.state.SCB is not None else weight.SCB
    if scb is None:
        raise ChainLoRAError("int8 weight has no scales (SCB): it was never quantized (move it to a device)")
    return bnb.functional.int8_vectorwise_dequant(weight.data, scb.to(weight.device)).float()


@dataclass(frozen=True)
class RequantizeError:
    """What re-quantizing ``W + Δ`` into the layer's own format changed: ``error = ‖deq(Q(W+Δ)) − (W+Δ)‖_F``
    (W the dequantized weight before, Δ the update, both fp32), ``relative_to_update = error/‖Δ‖_F`` (the share
    of the update lost to rounding: 0 is exact, ~1 means the rounding is as large as the update) and
    ``relative_to_weight = error/‖W+Δ‖_F``."""

    error: float
    update_norm: float
    weight_norm: float

    @property
    def relative_to_update(self) -> float:
        return self.error / self.update_norm if self.update_norm > 0 else 0.0

    @property
    def relative_to_weight(self) -> float:
        return self.error / self.weight_norm if self.weight_norm > 0 else 0.0


@torch.no_grad()
def requantize_(module: BnbLinear, delta: torch.Tensor) -> RequantizeError:
    """``W_q ← Q(deq(W_q) + delta)`` in place, in the layer's own format (quant type, block size, double
    quantization and storage for 4-bit; row-wise absmax from fp16 for int8, as ``Int8Params`` does), and the
    error it introduced, computed from the new dequantized weight. The Parameter object is kept (its ``.data``
    and quant state are replaced), so an optimizer or DDP holding it stays valid. Lossy by design."""
    bnb = _bnb()
    target = dequantize_weight(module) + delta.to(module.weight.device, torch.float32)
    weight = module.weight
    if quantization(module) != "int8":
        old = _quant_state(module)
        data, state = bnb.functional.quantize_4bit(
            target.to(old.dtype),
            blocksize=old.blocksize,
            compress_statistics=bool(weight.compress_statistics),
            quant_type=old.quant_type,
            quant_storage=weight.quant_storage,
        )
        weight.data = data
        weight.quant_state = state
        module.quant_state = state
    else:
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(target.to(torch.float16))
        weight.data = cb
        weight.CB, weight.SCB = cb, scb  # the next forward moves them into module.state (init_8bit_state)
        module.state.CB, module.state.SCB = None, None
        module.state.reset_grads()
    error = float((dequantize_weight(module) - target).norm())
    return RequantizeError(
        error=error, update_norm=float(delta.float().norm()), weight_norm=float(target.norm())
    )


@torch.no_grad()
def quantized_weight_tensors(module: BnbLinear) -> dict[str, torch.Tensor]:
    """A bitsandbytes layer's quantized weight as tensors (4-bit: packed data + ``QuantState.as_dict(packed=
    True)``; int8: CB + SCB): what a requantize knot changed, for the chain state file."""
    weight = module.weight
    if quantization(module) != "int8":
        state = {f"state/{k}": v for k, v in _quant_state(module).as_dict(packed=True).items()}
        return {"weight": weight.data, **state}
    return {"weight": weight.data, "SCB": module.state.SCB if module.state.SCB is not None else weight.SCB}


@torch.no_grad()
def restore_quantized_weight(module: BnbLinear, tensors: dict[str, torch.Tensor]) -> None:
    """Put a weight saved by :func:`quantized_weight_tensors` back, bit for bit (and the bias, under ``bias``)."""
    if "bias" in tensors and module.bias is not None:
        module.bias.copy_(tensors["bias"])
    weight = module.weight
    device = weight.device
    data = tensors["weight"].to(device)
    if quantization(module) != "int8":
        from bitsandbytes.functional import QuantState

        state_dict = {k.removeprefix("state/"): v for k, v in tensors.items() if k.startswith("state/")}
        state = QuantState.from_dict(state_dict, device=device)
        weight.data = data
        weight.quant_state = state
        module.quant_state = state
    else:
        weight.data = data
        weight.CB, weight.SCB = data, tensors["SCB"].to(device)
        module.state.CB, module.state.SCB = None, None
        module.state.reset_grads()


# ------------------------------------------------------------------------------------------- the residual


class ResidualLinear(nn.Module):
    """``y = base_layer(x) + (x·Vᵀ)·Uᵀ + c``: a quantized layer plus a frozen low-rank residual.

    ``residual_U`` (out × R), ``residual_V`` (R × in) and ``residual_bias`` (out, or None) are buffers in
    ``dtype`` (default: the LoRA link's dtype, fp32 under PEFT's ``autocast_adapter_dtype``, so folding a link
    in is exact). R = 0 adds nothing and costs nothing. The residual never sees dropout (like a merged weight).
    The inner layer is named ``base_layer`` so PEFT's ``get_base_layer()`` walks through this wrapper.
    """

    residual_U: torch.Tensor
    residual_V: torch.Tensor
    residual_bias: torch.Tensor | None

    def __init__(
        self,
        base_layer: nn.Module,
        in_features: int,
        out_features: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("residual_U", torch.zeros(out_features, 0, dtype=dtype, device=device))
        self.register_buffer("residual_V", torch.zeros(0, in_features, dtype=dtype, device=device))
        self.register_buffer("residual_bias", None)

    @property
    def rank(self) -> int:
        return int(self.residual_V.shape[0])

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if self.residual_V.shape[0] == 0 and self.residual_bias is None:
            return y
        h = nn.functional.linear(x.to(self.residual_V.dtype), self.residual_V)
        return y + nn.functional.linear(h, self.residual_U, self.residual_bias).to(y.dtype)

    @torch.no_grad()
    def set_residual_(self, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Replace the factors (cast to this residual's dtype and device); shapes (out × R) and (R × in)."""
        if U.shape[0] != self.out_features or V.shape[1] != self.in_features or U.shape[1] != V.shape[0]:
            raise ChainLoRAError(
                f"residual factors {tuple(U.shape)}·{tuple(V.shape)} do not fit a "
                f"{self.out_features}×{self.in_features} layer"
            )
        like = self.residual_V
        self.residual_U = U.to(like.device, like.dtype).contiguous()
        self.residual_V = V.to(like.device, like.dtype).contiguous()
        self.residual_bias = bias.to(like.device, like.dtype).contiguous() if bias is not None else None

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``U·V`` in fp32 (out × in): the dense update the residual adds."""
        return self.residual_U.float() @ self.residual_V.float()

    def as_link(self) -> TiedLink:
        """The residual as one link of scaling 1 (fp32, CPU): ``B = U``, ``A = V``, ``b = c``."""
        bias = self.residual_bias
        return TiedLink(
            lora_A=self.residual_V.detach().float().cpu(),
            lora_B=self.residual_U.detach().float().cpu(),
            scaling=1.0,
            lora_B_bias=bias.detach().float().cpu() if bias is not None else None,
        )

    def extra_repr(self) -> str:
        bias = ", bias" if self.residual_bias is not None else ""
        return f"rank={self.rank}, dtype={self.residual_V.dtype}{bias}"


def quantized_lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraBnbLayer, str]]:
    """``(module name, LoRA layer, adapter)`` of every active LoRA link over a bitsandbytes layer (no checks:
    ``chainlora.links.lora_layers`` refuses what a knot cannot tie)."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and quantization(module) is not None:
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    yield name, module, adapter


def residual_of(layer: LoraBnbLayer) -> ResidualLinear | None:
    """The :class:`ResidualLinear` of a quantized LoRA layer (None before :func:`attach_residuals`)."""
    residual = layer_chain(layer).residual
    return residual if isinstance(residual, ResidualLinear) else None


def _residual(layer: LoraBnbLayer) -> ResidualLinear:
    wrapper = residual_of(layer)
    if wrapper is None:
        raise ChainLoRAError(
            "no residual under this LoRA layer: call chainlora.quantized.attach_residuals first"
        )
    return wrapper


def _unload_module(
    layer: LoraBnbLayer, merge: bool, safe_merge: bool = False, adapter_names: Sequence[str] | None = None
) -> nn.Module:
    """PEFT's ``unload()``/``merge_and_unload()`` hook for a layer with a residual (PEFT calls
    ``target.unload_and_optionally_merge_module`` when it exists): keep the residual (PEFT would return the bare
    bitsandbytes layer and silently drop every tied link). ``merge=True`` folds the current link into the
    residual: exact, unlike PEFT's 4-bit merge."""
    wrapper = _residual(layer)
    if merge:
        for adapter in adapter_names or layer.active_adapters:
            if adapter in layer.lora_A:
                _fold_into_residual(layer, adapter, wrapper, safe=safe_merge)
    return wrapper


def attach_residuals(model: nn.Module, *, dtype: torch.dtype | None = None) -> int:
    """Insert an empty :class:`ResidualLinear` under every quantized LoRA layer (idempotent) and record it in
    the layer's chain state; returns how many were added. Call it after ``get_peft_model`` and before DDP
    wrapping or ``torch.compile`` (a knot then changes buffers only, never the module tree). Also installs the
    unload hook (see :func:`_unload_module`) and switches off bitsandbytes' lossy bf16 CPU repacking."""
    disable_cpu_bf16_repack(model)
    added = 0
    for _, layer, adapter in quantized_lora_layers(model):
        chain = layer_chain(layer)
        if isinstance(layer.base_layer, ResidualLinear):
            chain.residual = layer.base_layer
        elif chain.residual is None:
            A = layer.lora_A[adapter].weight
            chain.residual = ResidualLinear(
                layer.base_layer,
                layer.in_features,
                layer.out_features,
                dtype=dtype or A.dtype,
                device=A.device,
            )
            layer.base_layer = chain.residual
            added += 1
        layer.unload_and_optionally_merge_module = types.MethodType(_unload_module, layer)
    return added


def residual_memory_bytes(model: nn.Module) -> int:
    """Bytes held by every residual's buffers (U, V, bias)."""
    return sum(
        b.numel() * b.element_size()
        for module in model.modules()
        if isinstance(module, ResidualLinear)
        for b in module.buffers(recurse=False)
    )


# ------------------------------------------------------------------------------------------------- knot


@dataclass(frozen=True)
class LayerKnot:
    """One quantized layer's share of a knot. ``residual_rank``: R after the knot. ``compression_error``: the
    relative Frobenius error ``sqrt(Σ dropped σ²)/sqrt(Σ σ²)`` of the re-compression to ``max_residual_rank``
    (0 when not capped). ``requantize``: the error of the re-quantization (requantize mode only)."""

    residual_rank: int
    compression_error: float = 0.0
    requantize: RequantizeError | None = None


def check_merge_options(quantized_merge: str, max_residual_rank: int | None) -> None:
    """Refuse an unknown ``quantized_merge`` or a ``max_residual_rank`` that is not a positive integer."""
    if quantized_merge not in QUANTIZED_MERGES:
        raise ConfigError(
            f"quantized_merge: unknown mode {quantized_merge!r}; expected {' or '.join(QUANTIZED_MERGES)}"
        )
    if max_residual_rank is not None and (
        not isinstance(max_residual_rank, int)
        or isinstance(max_residual_rank, bool)
        or max_residual_rank <= 0
    ):
        raise ConfigError(f"max_residual_rank must be a positive integer, got {max_residual_rank!r}")


def link_factors(layer: LoraBnbLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The current link as residual factors in fp32: ``(U, V, c) = (s·B, A, s·b)``, fresh tensors (never views
    of the parameters, which the next link re-initialises in place); gathered whole under FSDP2."""
    s = float(layer.scaling[adapter])
    full = distributed.full_tensor  # FSDP2: gather A (r×in) and B (out×r); a collective, cheap
    A = full(layer.lora_A[adapter].weight.detach()).float().clone()
    B = full(layer.lora_B[adapter].weight.detach()).float()
    bias = layer.lora_B[adapter].bias
    return B * s, A, (full(bias.detach()).float() * s if bias is not None else None)


@torch.no_grad()
def link_norm_sq(layer: LoraBnbLayer, adapter: str) -> float:
    """``‖s·B·A‖² + ‖s·b‖²`` from r×r Gram matrices in fp64 (as ``chain.link_delta_norm_sq``), on the gathered
    factors: under FSDP2 the base weight is a shard of *packed* 4-bit data whose rows are not output rows.
    Non-finite factors give a non-finite result."""
    U, V, c = link_factors(layer, adapter)
    U, V = U.double(), V.double()
    norm_sq = float(((U.T @ U) * (V @ V.T)).sum())
    norm_sq += float(c.double().square().sum()) if c is not None else 0.0
    return norm_sq if norm_sq < torch.finfo(torch.float32).max ** 2 else math.inf


@torch.no_grad()
def effective_weight_norm(layer: LoraBnbLayer) -> float:
    """``‖deq(W_q) + U·V‖_F``: the norm of the weight the layer computes with, before its current link (for
    ``max_relative_delta``; one transient fp32 out×in matrix; not under FSDP2)."""
    bnb_layer = layer.get_base_layer()
    if distributed.is_sharded(bnb_layer.weight):
        raise ConfigError("max_relative_delta needs the whole quantized weight; not supported with FSDP2")
    weight = dequantize_weight(bnb_layer)
    wrapper = residual_of(layer)
    if wrapper is not None and wrapper.rank:
        weight += wrapper.delta_weight().to(weight.device)
    return float(weight.norm())


def check_layer(name: str, layer: LoraBnbLayer, adapter: str, quantized_merge: str) -> None:
    """Refuse, before a knot changes anything, what this layer cannot take: a requantize knot with a LoRA bias
    and no base bias, or a change of ``quantized_merge`` within a chain (the export could not tell which links
    went into the weight)."""
    chain = layer_chain(layer)
    wrapper = residual_of(layer)
    if quantized_merge == "requantize":
        if layer.lora_B[adapter].bias is not None and layer.get_base_layer().bias is None:
            raise KnotError(f"{name}: a LoRA bias needs a bias in the base layer to re-quantize into")
        if wrapper is not None and (wrapper.rank or wrapper.residual_bias is not None):
            raise ConfigError(
                f"{name}: quantized_merge 'requantize' after 'residual' knots; keep one mode per chain"
            )
    elif chain.requantized:
        raise ConfigError(
            f"{name}: quantized_merge 'residual' after 'requantize' knots; keep one mode per chain"
        )


@torch.no_grad()
def _fold_into_residual(
    layer: LoraBnbLayer, adapter: str, wrapper: ResidualLinear, *, cap: int | None = None, safe: bool = False
) -> float:
    """Append the current link to the residual (concatenate factors), then re-compress to ``cap`` if larger;
    returns the compression error (0 when nothing was dropped)."""
    U_new, V_new, c_new = link_factors(layer, adapter)
    if safe and not (torch.isfinite(U_new).all() and torch.isfinite(V_new).all()):
        raise KnotError("refusing to fold a non-finite link into the residual")
    device = wrapper.residual_V.device
    U = torch.cat([wrapper.residual_U.float(), U_new.to(device)], dim=1)
    V = torch.cat([wrapper.residual_V.float(), V_new.to(device)], dim=0)
    bias = wrapper.residual_bias.float() if wrapper.residual_bias is not None else None
    if c_new is not None:
        bias = c_new.to(device) if bias is None else bias + c_new.to(device)
    error = 0.0
    if cap is not None and V.shape[0] > cap:
        V, U, error = truncate(V, U, cap)  # (A_R, B_R, err): the best rank-cap factors of U·V
    wrapper.set_residual_(U, V, bias)
    return error


def tie_layer(
    layer: LoraBnbLayer,
    adapter: str,
    *,
    quantized_merge: str = "residual",
    max_residual_rank: int | None = None,
) -> LayerKnot:
    """Step 1 of a knot on one quantized LoRA layer (``chain.tie_knot`` does the checks before, and keeps the
    link, extends the chain and resets the optimizer after): ``residual`` appends ``(s·B, A, s·b)`` to the
    layer's residual (exact; re-compressed by SVD past ``max_residual_rank``, error reported);
    ``requantize`` writes ``Q(deq(W_q) + s·B·A)`` into the layer (lossy, error reported) and adds ``s·b`` to
    the float base bias."""
    wrapper = _residual(layer)
    if quantized_merge == "residual":
        error = _fold_into_residual(layer, adapter, wrapper, cap=max_residual_rank)
        return LayerKnot(residual_rank=wrapper.rank, compression_error=error)
    U, V, c = link_factors(layer, adapter)
    bnb_layer = layer.get_base_layer()
    chain = layer_chain(layer)
    if chain.original_weight is None:  # so that a state saved before this knot can still be restored
        tensors = quantized_weight_tensors(bnb_layer)
        if bnb_layer.bias is not None:
            tensors["bias"] = bnb_layer.bias
        chain.original_weight = {k: v.detach().cpu().clone() for k, v in tensors.items()}
    report = requantize_(bnb_layer, U @ V)
    if c is not None:  # check_layer made sure the base layer has a bias
        bnb_layer.bias.data.add_(c.to(bnb_layer.bias.device, bnb_layer.bias.dtype))
    chain.requantized = True
    return LayerKnot(residual_rank=wrapper.rank, requantize=report)


def chain_terms(layer: LoraBnbLayer, adapter: str) -> list[TiedLink]:
    """The chain of a quantized LoRA layer as links over its *original* quantized weight, for the adapter
    export: the residual (scaling 1; absent while empty), the links re-quantized into the weight (requantize
    mode: the original base + these differs from the trained weight by the re-quantization errors), and the
    current link (gathered whole under FSDP2)."""
    terms: list[TiedLink] = []
    wrapper = residual_of(layer)
    if wrapper is not None and (wrapper.rank or wrapper.residual_bias is not None):
        terms.append(wrapper.as_link())
    chain = layer_chain(layer)
    if chain.requantized:
        if (
            len(chain.links) != chain.knots
        ):  # one mode per chain (check_layer): every knot re-quantized a link
            raise ChainLoRAError(
                f"{chain.knots} requantize knot(s) but {len(chain.links)} link(s) kept (keep_links=False?): "
                "the adapter needs every link"
            )
        terms += chain.links
    U, V, c = link_factors(layer, adapter)
    terms.append(
        TiedLink(lora_A=V.cpu(), lora_B=U.cpu(), scaling=1.0, lora_B_bias=c.cpu() if c is not None else None)
    )
    return terms


# ------------------------------------------------------------------------------------------ merged model


@dataclass(frozen=True)
class MergeReport:
    """:func:`merge_dequantized`: ``relative_errors[layer] = ‖cast(W) − W‖_F / ‖W‖_F`` with W the exact fp32
    merged weight (``deq(W_q) + U·V + s·B·A`` for a quantized layer) and cast the target dtype (0 for fp32).
    ``layers``: LoRA layers merged; ``dequantized``: other bitsandbytes layers turned into ``nn.Linear``."""

    dtype: str
    layers: int
    dequantized: int
    relative_errors: dict[str, float]

    @property
    def max_relative_error(self) -> float:
        return max(self.relative_errors.values(), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "layers": self.layers,
            "dequantized_layers": self.dequantized,
            "max_relative_error": self.max_relative_error,
        }


@torch.no_grad()
def merge_dequantized(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> tuple[nn.Module, MergeReport]:
    """The whole chain merged into a plain, unquantized transformers model in ``dtype``.

    Every LoRA layer becomes ``nn.Linear`` with its exact fp32 weight cast once: ``deq(W_q) + U·V + s·B·A`` over
    a quantized base (bias ``b + c + s·b_B``), ``W + s·B·A`` (from the fp32 master when kept) over a float one;
    every other bitsandbytes layer becomes ``nn.Linear`` with ``deq(W_q)``; the remaining floating-point weights
    are cast to ``dtype``; the quantization config is dropped, so ``save_pretrained`` writes an ordinary
    checkpoint. The error of the cast is reported per layer; in fp32 the merged model computes the trained
    model (4-bit) up to summation order. ``model`` is consumed.
    """
    from peft.tuners.lora import LoraLayer

    attach_residuals(model)
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    errors: dict[str, float] = {}
    replacements: list[tuple[str, nn.Linear]] = []
    for name, layer in root.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        adapters = [a for a in layer.active_adapters if a in layer.lora_A]
        base = layer.get_base_layer()
        if quantization(layer) is not None:
            weight = dequantize_weight(base)
            wrapper = residual_of(layer)
            extra_bias = wrapper.residual_bias if wrapper is not None else None
            if wrapper is not None and wrapper.rank:
                weight += wrapper.delta_weight().to(weight.device)
        else:
            master = layer_chain(layer).master_weight
            weight = (master if master is not None else base.weight).detach().float().to(base.weight.device)
            weight = weight.T.clone() if layer.fan_in_fan_out else weight.clone()
            extra_bias = None
        bias = base.bias.detach().float().clone() if base.bias is not None else None
        if extra_bias is not None:
            bias = extra_bias.float() if bias is None else bias + extra_bias.float().to(bias.device)
        for adapter in adapters:
            U, V, c = link_factors(layer, adapter)
            weight += (U @ V).to(weight.device)
            if c is not None:
                bias = c if bias is None else bias + c.to(bias.device)
        if not torch.isfinite(weight).all():
            raise KnotError(f"refusing final merge: the chain of {name} is not finite")
        linear = _plain_linear(weight, bias, dtype)
        errors[name] = float((linear.weight.float() - weight).norm() / weight.norm().clamp_min(1e-30))
        replacements.append((name, linear))
    for name, linear in replacements:
        _set_submodule(root, name, linear)
    others = [(n, m) for n, m in root.named_modules() if quantization(m) is not None]
    for name, module in others:
        bias = module.bias.detach().float() if module.bias is not None else None
        _set_submodule(root, name, _plain_linear(dequantize_weight(module), bias, dtype))
    quantizer = getattr(root, "hf_quantizer", None)
    if quantizer is not None:  # transformers' own clean-up: hf_quantizer, config.quantization_config, flags
        quantizer.remove_quantization_config(root)
    elif hasattr(root.config, "quantization_config"):
        del root.config.quantization_config
    for param in root.parameters():  # parameters only: buffers such as RoPE's inv_freq stay as loaded (fp32)
        if param.is_floating_point():
            param.data = param.data.to(dtype)
    root.config.dtype = dtype
    return root, MergeReport(str(dtype).removeprefix("torch."), len(replacements), len(others), errors)


def _plain_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    linear = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, dtype=dtype, device=weight.device
    )
    linear.weight.data.copy_(weight)
    if bias is not None:
        linear.bias.data.copy_(bias)
    linear.requires_grad_(False)
    return linear


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)
