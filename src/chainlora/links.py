"""The LoRA layers a chain lives on, and the state each of them keeps across knots: one owner for that state.

A knot changes more than the current link's A and B. On every LoRA layer it ties, it leaves a
:class:`LayerChain`:

* ``master_weight``: the fp32 copy of a half-precision base weight in which the knots accumulate exactly
  (``tie_knot(precise=...)``); on the CPU (it is read only at a knot), or beside an FSDP2 shard;
* ``links``: every tied link ``s·B·A`` (+ ``s·b``) as a :class:`TiedLink`, whole, fp32, on the CPU
  (``tie_knot(keep_links=True)``), so that the chain can be exported as one adapter; on a quantized base only
  the links re-quantized into the weight (the residual already holds the others, exactly: no second copy);
* ``knots``: how many knots this layer has tied;
* on a bitsandbytes-quantized base (``quantization(layer)`` is ``nf4``, ``fp4`` or ``int8``), which a knot
  never rounds a link into: ``residual``, the frozen low-rank residual beside the quantized weight that the
  tied links are folded into (a ``chainlora.quantized.ResidualLinear`` in the module tree, between the LoRA
  layer and the bitsandbytes layer), and ``requantized``, whether knots re-quantized the weight instead
  (``quantized_merge='requantize'``, lossy).

Nothing reads or writes that state except through :func:`layer_chain` (one layer) and :func:`layer_chains` (a
whole model): ``chain`` writes it at a knot, ``state`` saves and restores it, ``adapter`` exports it,
``distributed`` keeps it the same on every process.

Invariants: ``len(links) == knots`` unless knots were tied with ``keep_links=False`` or folded into a quantized
layer's residual; the base weight is
``W0 + Σ links`` (rounded to its dtype; exactly ``master_weight`` when there is one); on a quantized base the
quantized weight is untouched and the residual holds ``Σ links`` (exactly, unless ``max_residual_rank`` capped
it), or, after ``requantize`` knots, the weight is ``Q(deq(W_q) + Σ links)``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from torch import nn

from chainlora.errors import KnotError

_ATTRIBUTE = "chainlora_chain"  # where a layer's LayerChain is kept; read only through this module


@dataclass(frozen=True)
class TiedLink:
    """One link already merged into the base: ``s·B·A`` (+ ``s·b`` for a LoRA bias), kept on CPU in fp32."""

    lora_A: torch.Tensor  # (r, in_features)
    lora_B: torch.Tensor  # (out_features, r)
    scaling: float
    lora_B_bias: torch.Tensor | None = None  # (out_features,)


@dataclass
class LayerChain:
    """What the knots so far left on one LoRA layer, besides its current link (see the module docstring)."""

    master_weight: torch.Tensor | None = None  # fp32, shaped like the base weight; None: no master kept
    links: list[TiedLink] = field(default_factory=list)  # the tied links not held by a residual, oldest first
    knots: int = 0  # knots tied on this layer
    # quantized base: its chainlora.quantized.ResidualLinear (layer.base_layer)
    residual: nn.Module | None = None
    requantized: bool = False  # quantized base: knots re-quantized the weight (quantized_merge='requantize')
    original_weight: dict[str, torch.Tensor] | None = None  # requantize: the quantized weight before (CPU)


def quantization(module: nn.Module) -> str | None:
    """``'nf4'``, ``'fp4'`` or ``'int8'`` for a bitsandbytes linear layer, or a LoRA layer over one; None for
    anything else. Never imports bitsandbytes: without it imported no bitsandbytes layer can exist."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    base = module.get_base_layer() if isinstance(module, LoraLayer) else module
    if isinstance(base, bnb.nn.Linear4bit):
        state = getattr(base.weight, "quant_state", None) or getattr(base, "quant_state", None)
        return str(getattr(base.weight, "quant_type", None) or getattr(state, "quant_type", "nf4"))
    if isinstance(base, bnb.nn.Linear8bitLt):
        return "int8"
    return None


def _tieable(module: LoraLayer) -> bool:
    """PEFT's plain ``lora.Linear``, or its bitsandbytes LoRA layer (``lora.bnb.Linear4bit/Linear8bitLt``)."""
    if type(module) is LoraLinear:
        return True
    bnb_lora = sys.modules.get("peft.tuners.lora.bnb")
    kinds = tuple(
        getattr(bnb_lora, name) for name in ("Linear4bit", "Linear8bitLt") if hasattr(bnb_lora, name)
    )
    return type(module) in kinds and quantization(module) is not None


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear, str]]:
    """Yield ``(module name, LoRA layer, adapter name)`` for every active LoRA link in ``model``.

    Two kinds of layer can be tied: PEFT's plain ``lora.Linear`` over a floating-point ``nn.Linear`` (a knot
    merges into W), and PEFT's LoRA layer over a bitsandbytes 4-bit/8-bit layer (``quantization(layer)`` is not
    None: a knot folds the link into the layer's residual, ``chainlora.quantized``). Anything else (a base
    weight of another integer format, a DoRA/variant link, which is not ``s·B·A``) is refused with a
    :class:`KnotError`.
    """
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            if not _tieable(module) or adapter in getattr(module, "lora_variant", {}):
                raise KnotError(
                    f"{name}: only plain LoRA on nn.Linear (or a bitsandbytes layer) can be tied, not "
                    f"{type(module).__name__}"
                )
            weight = module.get_base_layer().weight
            if type(module) is LoraLinear and not weight.is_floating_point():
                raise KnotError(
                    f"{name}: base weight is {weight.dtype} (quantized); a knot cannot merge into it"
                )
            if module.merged:
                raise KnotError(
                    f"{name}: adapter is merged by PEFT (merge_adapter); unmerge it before a knot"
                )
            yield name, module, adapter


def layer_chain(layer: LoraLinear) -> LayerChain:
    """The chain state of ``layer``; a layer that has not tied a knot yet gets an empty one (kept on it)."""
    chain = layer.__dict__.get(_ATTRIBUTE)
    if chain is None:
        chain = LayerChain()
        setattr(layer, _ATTRIBUTE, chain)
    return chain


def layer_chains(model: nn.Module) -> Iterator[tuple[str, LoraLinear, str, LayerChain]]:
    """:func:`lora_layers` with each layer's :class:`LayerChain`: ``(name, layer, adapter, chain)``."""
    for name, layer, adapter in lora_layers(model):
        yield name, layer, adapter, layer_chain(layer)


def chain_length(model: nn.Module) -> int:
    """Number of links so far: knots tied + the current one."""
    return max((chain.knots for *_, chain in layer_chains(model)), default=0) + 1


@torch.no_grad()
def truncate(
    lora_A: torch.Tensor, lora_B: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors of ``ΔW = B @ A`` and the relative Frobenius error of dropping the rest.

    Works on the factors only (float64): ``B = Q_B R_B``, ``Aᵀ = Q_A R_A``, SVD of the small core
    ``R_B R_Aᵀ = U Σ Vᵀ``, so ``ΔW = (Q_B U) Σ (Q_A V)ᵀ``; the kept singular values are split evenly
    (``√σ``) between the new B and A. Returns ``(A_R, B_R, error)`` with
    ``error = sqrt(Σ_{j>R} σ_j²) / sqrt(Σ_j σ_j²)`` (0 for a zero ΔW). Used by the adapter export (``rank``)
    and by a quantized layer's residual (``max_residual_rank``).
    """
    q_b, r_b = torch.linalg.qr(lora_B.double())  # (out, k), (k, r)
    q_a, r_a = torch.linalg.qr(lora_A.double().T)  # (in, k'), (k', r)
    u, sigma, vh = torch.linalg.svd(r_b @ r_a.T)  # core (k, k')
    kept = min(rank, sigma.numel())
    total = float(sigma.square().sum())
    error = math.sqrt(float(sigma[kept:].square().sum()) / total) if total > 0 else 0.0
    root = sigma[:kept].sqrt()
    new_B = (q_b @ u[:, :kept]) * root  # (out, R)
    new_A = root[:, None] * (vh[:kept] @ q_a.T)  # (R, in)
    return new_A.float().contiguous(), new_B.float().contiguous(), error
