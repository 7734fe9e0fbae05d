"""The Chain of LoRA algorithm (COLA, arXiv 2401.04151, Algorithm 1), on PEFT's LoRA layers.

One *link* is a LoRA adapter ``W·x + s·B·A·x`` (``s = α/r``, or ``α/√r`` with rsLoRA) trained with W frozen.
At a *knot* τ_i the chain is extended::

    tie the knot       W ← W + s·B·A            (computed in fp32; refused, model untouched, if not finite)
    extend the chain   A ← random, B ← 0        (optionally with a new rank: "rank step-down")
    reset              optimizer state of A, B cleared, so the next step is a true first step
                       (``optimizer_reset`` < 1: only that fraction of it, smallest magnitudes first, as ReLoRA)

Invariant (function-preserving): right after a knot B = 0, so the model computes exactly what it computed
just before it; only the split between "base" and "link" has moved. After k knots the base weight is
``W0 + Σ_i s_i·B_i·A_i``: a sum of rank-r updates, which can reach a rank-k·r update that one rank-r LoRA
cannot (the paper's Frank-Wolfe view). ``merge_chain`` folds the last link in and removes the LoRA modules,
leaving a plain model with zero inference overhead.

On a bitsandbytes-quantized base (QLoRA) "tie the knot" never rounds the link into the 4-bit/8-bit weight: it
appends ``s·B·A`` to a frozen low-rank residual beside it, exactly (``chainlora.quantized``; ``tie_knot``
dispatches per layer). The chain's per-layer state (fp32 masters, tied links, knot counts, residuals) is kept by
``chainlora.links``; where the knots go is a schedule (``chainlora.schedules``); the HF ``Trainer`` hook is
``chainlora.callback``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from chainlora import distributed, quantized
from chainlora.errors import ConfigError, KnotError
from chainlora.links import TiedLink, layer_chain, lora_layers, quantization

__all__ = [
    "Init",
    "KnotError",
    "KnotRecord",
    "check_optimizer_reset",
    "check_ranks_fit",
    "extend_link",
    "link_delta",
    "link_delta_norm_sq",
    "master_copy",
    "master_device",
    "merge_chain",
    "reset_optimizer_state",
    "set_peft_rank",
    "tie_knot",
]

Init = Literal["gaussian", "kaiming"]


@dataclass(frozen=True)
class KnotRecord:
    """What one knot did: which link it tied, the rank of the next link, and the size of the merged update."""

    link: int  # 1-based index of the link just merged into the base
    next_rank: int  # rank of the link that trains next
    delta_norm: float  # Frobenius norm of all merged updates together (weights and biases)
    layers: int  # number of LoRA layers merged
    step: int | None = None  # optimizer step at which it was tied (set by the training loop)
    # fraction of the links' optimizer state entries zeroed (1.0: full reset); None: no optimizer, or no state yet
    optimizer_state_zeroed: float | None = None
    # LoRA layers over a bitsandbytes base (chainlora.quantized); None when the model has none
    quantized_merge: str | None = None  # "residual" (exact) or "requantize" (lossy)
    residual_rank: int | None = None  # largest residual rank after the knot
    compression_errors: dict[str, float] | None = None  # max_residual_rank: ‖dropped‖/‖residual‖ per layer
    requantize_errors: dict[str, float] | None = None  # requantize: ‖deq(Q(W+Δ)) − (W+Δ)‖/‖Δ‖ per layer


# --------------------------------------------------------------------------------------------- layers


@torch.no_grad()
def link_delta(layer: LoraLinear, adapter: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The current link's update ``s·B·A`` (shaped like the base weight) and bias update ``s·b``, in fp32."""
    if distributed.is_sharded(layer.get_base_layer().weight):  # FSDP2: only this process's block of s·B·A
        return distributed.sharded_link_delta(layer, adapter)
    scaling = layer.scaling[adapter]
    delta = (layer.lora_B[adapter].weight.float() @ layer.lora_A[adapter].weight.float()) * scaling
    if layer.fan_in_fan_out:
        delta = delta.T
    bias = layer.lora_B[adapter].bias
    return delta, (bias.float() * scaling if bias is not None else None)


def master_device(weight_device: str | torch.device, *, sharded: bool = False) -> torch.device:
    """Where the fp32 master copy of a half-precision weight on ``weight_device`` lives: on the CPU, whatever the
    weight's device (it is read only at a knot, so it costs no accelerator memory: COLA memory = LoRA memory),
    except for an FSDP2 shard, whose master stays beside it (each process keeps the master of its own shard)."""
    return torch.device(weight_device) if sharded else torch.device("cpu")


def master_copy(weight: torch.Tensor) -> torch.Tensor:
    """The fp32 master copy of a half-precision base weight, on :func:`master_device`."""
    weight = weight.detach()
    if distributed.is_sharded(weight):
        return weight.float().clone()
    return weight.to(master_device(weight.device), torch.float32, copy=True)


@torch.no_grad()
def link_delta_norm_sq(layer: LoraLinear, adapter: str) -> float:
    """``‖s·B·A‖² + ‖s·b‖²`` without forming ``B·A``: ``‖B·A‖_F² = Σ (BᵀB) ∘ (A·Aᵀ)``, two r×r Gram matrices in
    fp64 (O(r²·(in + out)) instead of O(r·in·out)). Non-finite A or B give a non-finite result. FSDP2 shards:
    the norm of the local block of ``link_delta``, reduced over processes (a quantized base: of the gathered
    factors)."""
    if quantization(layer) is not None:
        return quantized.link_norm_sq(layer, adapter)
    if distributed.is_sharded(layer.get_base_layer().weight):
        delta, bias_delta = link_delta(layer, adapter)
        return distributed.item(delta.square().sum()) + (
            distributed.item(bias_delta.square().sum()) if bias_delta is not None else 0.0
        )
    scaling = float(layer.scaling[adapter])
    A, B = layer.lora_A[adapter].weight.double(), layer.lora_B[adapter].weight.double()
    norm_sq = float(((B.T @ B) * (A @ A.T)).sum()) * scaling**2
    bias = layer.lora_B[adapter].bias
    if bias is not None:
        norm_sq += float(bias.double().square().sum()) * scaling**2
    # an entry of s·B·A beyond the fp32 range (inf once merged) needs a norm beyond it too
    return norm_sq if norm_sq < torch.finfo(torch.float32).max ** 2 else math.inf


def _merge_into_base(layer: LoraLinear, delta: torch.Tensor, bias_delta: torch.Tensor | None) -> None:
    """``W ← W + delta`` in fp32. With an fp32 master copy (see ``precise``) the sum is kept exact in fp32 and
    only its rounding is written to a half-precision W, so repeated knots do not accumulate rounding error."""
    base = layer.get_base_layer()
    master = layer_chain(layer).master_weight
    with torch.no_grad():
        if master is not None:
            master.add_(delta.to(master.device))
            base.weight.copy_(master)
        else:
            base.weight.copy_(base.weight.float() + delta)
        if bias_delta is not None:
            if base.bias is None:
                raise KnotError("LoRA bias (lora_bias=True) needs a bias in the base layer to merge into")
            base.bias.copy_(base.bias.float() + bias_delta)


def _new_lora_A(shape: tuple[int, int], init: Init, generator: torch.Generator | None) -> torch.Tensor:
    """A fresh A on CPU in fp32: Gaussian std 1/r (the paper, PEFT's "gaussian") or Kaiming-uniform a=√5 (PEFT's
    default). Drawn from ``generator`` when given, so every process of a distributed run draws the same A."""
    a = torch.empty(shape)
    if init == "gaussian":
        return a.normal_(0.0, 1.0 / shape[0], generator=generator)
    if init == "kaiming":
        return nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    raise ConfigError(f"unknown LoRA init {init!r}: expected 'gaussian' or 'kaiming'")


def extend_link(
    layer: LoraLinear, adapter: str, rank: int, init: Init, generator: torch.Generator | None
) -> dict[nn.Parameter, nn.Parameter]:
    """Start the next link: A random, B = 0 (and its bias 0). Same rank: in place, the parameters stay the same
    objects (an optimizer, DDP or a compiled graph keeps working). New rank: new A, B modules; returns the map
    old parameter → new parameter so the optimizer can be pointed at them."""
    old_A, old_B = layer.lora_A[adapter], layer.lora_B[adapter]
    replaced: dict[nn.Parameter, nn.Parameter] = {}
    if rank != layer.r[adapter]:
        kwargs = {"device": old_A.weight.device, "dtype": old_A.weight.dtype}
        layer.lora_A[adapter] = nn.Linear(layer.in_features, rank, bias=False, **kwargs)
        layer.lora_B[adapter] = nn.Linear(rank, layer.out_features, bias=old_B.bias is not None, **kwargs)
        layer.r[adapter] = rank
        alpha = layer.lora_alpha[adapter]
        layer.scaling[adapter] = alpha / math.sqrt(rank) if layer.use_rslora[adapter] else alpha / rank
        for old, new in ((old_A, layer.lora_A[adapter]), (old_B, layer.lora_B[adapter])):
            for old_p, new_p in zip(old.parameters(), new.parameters(), strict=True):
                new_p.requires_grad_(old_p.requires_grad)
                replaced[old_p] = new_p
    A, B = layer.lora_A[adapter], layer.lora_B[adapter]
    with torch.no_grad():
        distributed.copy_full_(A.weight, _new_lora_A(tuple(A.weight.shape), init, generator))
        B.weight.zero_()
        if B.bias is not None:
            B.bias.zero_()
    return replaced


def reset_optimizer_state(
    optimizer: torch.optim.Optimizer,
    params: Iterable[nn.Parameter],
    replaced: dict | None = None,
    *,
    fraction: float = 1.0,
) -> float | None:
    """Reset the optimizer state of ``params`` at a knot; return the fraction of their state entries zeroed
    (measured: entries that were non-zero and are zero now, over all; 1.0 for a full reset), or None when the
    optimizer held no state for them (no step yet).

    ``fraction`` 1.0 (COLA): clear **all** state, moments *and* step counter, so the next update is exactly a
    first update, bias correction included (zeroing Adam's moments but keeping ``step`` would make it ~3× too
    large). 0 < ``fraction`` < 1: zero that fraction of each state tensor shaped like its parameter (Adam's
    moments, SGD's momentum, AdaGrad's sum), smallest magnitudes first, and keep the step counter (ReLoRA's
    magnitude pruning; entries tied with the threshold go too). 0.0: keep all state, a control that carries the
    old link's moments onto the new one. A parameter in ``replaced`` (old → new, after a rank change: another
    shape) always loses its state, and the new one is swapped into its param groups in place, so the LR
    scheduler keeps driving the same groups."""
    while hasattr(optimizer, "optimizer"):  # accelerate's AcceleratedOptimizer and similar wrappers
        optimizer = optimizer.optimizer
    replaced = replaced or {}
    zeroed = total = 0
    for p in params:
        state = optimizer.state.get(p)
        if not state:
            continue
        moments = [v for v in state.values() if torch.is_tensor(v) and v.shape == p.shape and v.numel()]
        total += sum(v.numel() for v in moments)
        if fraction >= 1.0 or p in replaced:
            zeroed += sum(v.numel() for v in moments)
            optimizer.state.pop(p)
        elif fraction > 0.0:
            for v in moments:
                zeroed += _zero_smallest(v, fraction)
    for group in optimizer.param_groups:
        group["params"] = [replaced.get(p, p) for p in group["params"]]
    if total == 0:
        return None
    return 1.0 if fraction >= 1.0 else zeroed / total


@torch.no_grad()
def _zero_smallest(tensor: torch.Tensor, fraction: float) -> int:
    """Zero the ``round(fraction·n)`` entries of ``tensor`` with the smallest magnitude (and any tied with the
    largest of them), in place; return how many non-zero entries were zeroed."""
    count = round(fraction * tensor.numel())
    if count == 0:
        return 0
    magnitude = tensor.abs()
    threshold = magnitude.flatten().float().kthvalue(count).values.to(magnitude.dtype)
    drop = magnitude <= threshold
    zeroed = int(torch.count_nonzero(tensor[drop]))
    tensor.masked_fill_(drop, 0)
    return zeroed


def check_optimizer_reset(fraction: float, *, rank_changes: bool = False, sharded: bool = False) -> None:
    """Refuse an ``optimizer_reset`` that is not in [0, 1], or that keeps state (< 1) where it cannot: across
    a rank change (the parameters change shape) or, pruning (0 < fraction < 1), on sharded FSDP2 parameters."""
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"optimizer_reset must be a number in [0, 1], got {fraction!r}")
    if fraction < 1.0 and rank_changes:
        raise ConfigError(
            f"optimizer_reset {fraction} keeps optimizer state across a knot, which a rank change cannot: the "
            "next link's parameters have another shape (use 1.0 with rank step-down)"
        )
    if 0.0 < fraction < 1.0 and sharded:
        raise ConfigError(
            f"optimizer_reset {fraction} prunes the optimizer state by magnitude, which is not supported on "
            "FSDP2-sharded parameters (use 1.0 or 0.0)"
        )


def check_ranks_fit(layers: Iterable[tuple[str, nn.Module]], ranks: Iterable[tuple[str, int]]) -> None:
    """Refuse a rank that a layer cannot hold (more than ``min(in, out)`` features), in one line naming it.

    ``layers``: ``(name, module)`` pairs with ``in_features``/``out_features`` (a LoRA layer, or the
    ``nn.Linear`` a LoRA link will wrap). ``ranks``: ``(setting, rank)`` pairs; a non-empty setting (e.g.
    ``"lora.r"``) starts the message. Layers are checked in order, each against every rank.
    """
    ranks = list(ranks)
    for name, layer in layers:
        for setting, rank in ranks:
            if rank > min(layer.in_features, layer.out_features):
                raise ConfigError(
                    f"{f'{setting}: ' if setting else ''}rank {rank} is larger than layer {name} "
                    f"({layer.out_features}×{layer.in_features})"
                )


# ----------------------------------------------------------------------------------------------- knot


def tie_knot(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    rank: int | None = None,
    init: Init = "gaussian",
    generator: torch.Generator | None = None,
    precise: bool | None = None,
    keep_links: bool = True,
    max_relative_delta: float | None = None,
    quantized_merge: str = "residual",
    max_residual_rank: int | None = None,
    optimizer_reset: float = 1.0,
) -> KnotRecord:
    """Tie one COLA knot on every active LoRA link of ``model`` and extend the chain.

    1. merge: ``W ← W + s·B·A`` (and ``b ← b + s·b_B`` with a LoRA bias), computed in fp32. Every delta is
       checked first: if any is non-finite (or larger than ``max_relative_delta``·‖W‖) a :class:`KnotError` is
       raised and nothing is changed.
    2. extend: A re-initialised (``init``: ``"gaussian"`` as in the paper, or ``"kaiming"``), B = 0; with
       ``rank`` the next link gets that rank (scaling follows α/r, or α/√r with rsLoRA).
    3. reset: all state of the links' parameters in ``optimizer`` is cleared (and, on a rank change, the new
       parameters replace the old ones in its param groups). ``optimizer_reset`` < 1 zeroes only that fraction
       of it, smallest magnitudes first (ReLoRA's pruning; 0.0 keeps it all): see
       :func:`reset_optimizer_state`. The record says what fraction was zeroed.

    Function-preserving: the model's outputs are unchanged by the knot (B = 0 afterwards).
    ``precise`` keeps an fp32 master copy of each targeted base weight so repeated merges into bf16/fp16 stay
    exact (default: on when the base weight is not fp32; 4 bytes per targeted weight element of CPU memory,
    see :func:`master_copy`).
    ``keep_links`` stores each tied link (CPU, fp32) so ``chainlora.export_adapter`` can ship the whole chain
    (not the links folded into a quantized layer's residual: the residual is their exact sum already).
    Never uses PEFT's ``merge_adapter()``, which would switch the LoRA branch off for the next link.

    A LoRA layer over a bitsandbytes 4-bit/8-bit base (QLoRA) is tied by ``chainlora.quantized.tie_layer``
    instead of step 1's merge: ``quantized_merge="residual"`` (default) appends the link to the layer's frozen
    low-rank residual, exactly (the quantized weight is untouched; ``max_residual_rank`` caps the residual by
    SVD, the error reported); ``"requantize"`` re-quantizes ``deq(W_q) + s·B·A`` into the layer (lossy, the
    error reported). The record then carries the residual rank and the errors.
    """
    if rank is not None and (not isinstance(rank, int) or rank <= 0):
        raise ConfigError(f"rank of the next link must be a positive integer, got {rank!r}")
    quantized.check_merge_options(quantized_merge, max_residual_rank)
    layers = list(lora_layers(model))
    if not layers:
        raise KnotError("no active LoRA layer found: wrap the model with peft.get_peft_model(...) first")
    if rank is not None:
        check_ranks_fit(((name, layer) for name, layer, _ in layers), [("", rank)])
    check_optimizer_reset(
        optimizer_reset,
        rank_changes=rank is not None and any(layer.r[adapter] != rank for _, layer, adapter in layers),
        sharded=any(distributed.is_sharded(layer.lora_A[adapter].weight) for _, layer, adapter in layers),
    )
    # DDP/FSDP2: no rank change, no FSDP1/DeepSpeed (FSDP2: no int8 base, no requantize)
    distributed.check_knot_supported(model, layers, rank, quantized_merge=quantized_merge)
    is_quantized = {name: quantization(layer) is not None for name, layer, _ in layers}
    if any(is_quantized.values()):
        quantized.attach_residuals(model)  # no-op when already attached (as it should be, before DDP)

    # 1. check every delta before touching anything (from r×r Gram matrices: B·A is formed once, to merge it)
    squared_norm = 0.0
    for name, layer, adapter in layers:
        norm_sq = link_delta_norm_sq(layer, adapter)
        if not math.isfinite(norm_sq):
            raise KnotError(f"refusing knot: the update of {name} is not finite (model left unchanged)")
        if is_quantized[name]:
            quantized.check_layer(name, layer, adapter, quantized_merge)
        if max_relative_delta is not None:
            if is_quantized[name]:
                weight_norm = quantized.effective_weight_norm(layer)
            else:
                weight_norm = distributed.item(layer.get_base_layer().weight.float().norm())
            if math.sqrt(norm_sq) > max_relative_delta * weight_norm:
                raise KnotError(
                    f"refusing knot: ‖ΔW‖ of {name} is {math.sqrt(norm_sq):.3g}, over {max_relative_delta}·‖W‖ "
                    f"= {max_relative_delta * weight_norm:.3g} (model left unchanged)"
                )
        squared_norm += norm_sq

    links_tied = 0
    old_params, replaced = [], {}
    tied: dict[str, quantized.LayerKnot] = {}
    for name, layer, adapter in layers:
        # 1. tie the knot
        chain = layer_chain(layer)
        if is_quantized[name]:  # into the residual beside the quantized weight (or re-quantized into it)
            tied[name] = quantized.tie_layer(
                layer, adapter, quantized_merge=quantized_merge, max_residual_rank=max_residual_rank
            )
        else:
            weight = layer.get_base_layer().weight
            use_master = precise if precise is not None else weight.dtype != torch.float32
            if use_master and chain.master_weight is None:
                chain.master_weight = master_copy(weight)
            delta, bias_delta = link_delta(layer, adapter)
            _merge_into_base(layer, delta, bias_delta)
        in_residual = is_quantized[name] and quantized_merge == "residual"  # the residual holds it exactly
        if keep_links and not in_residual:
            bias = layer.lora_B[adapter].bias
            chain.links.append(
                TiedLink(
                    lora_A=distributed.cpu_fp32_copy(layer.lora_A[adapter].weight),
                    lora_B=distributed.cpu_fp32_copy(layer.lora_B[adapter].weight),
                    scaling=float(layer.scaling[adapter]),
                    lora_B_bias=distributed.cpu_fp32_copy(bias) if bias is not None else None,
                )
            )
        chain.knots += 1
        links_tied = chain.knots
        # 2. extend the chain
        old_params += [*layer.lora_A[adapter].parameters(), *layer.lora_B[adapter].parameters()]
        replaced |= extend_link(layer, adapter, rank or layer.r[adapter], init, generator)

    if rank is not None:
        set_peft_rank(model, rank)
    # 3. reset the optimizer
    zeroed = None
    if optimizer is not None:
        zeroed = reset_optimizer_state(optimizer, old_params, replaced, fraction=optimizer_reset)
    next_rank = layers[0][1].r[layers[0][2]]
    record = KnotRecord(
        link=links_tied,
        next_rank=next_rank,
        delta_norm=math.sqrt(squared_norm),
        layers=len(layers),
        optimizer_state_zeroed=zeroed,
    )
    return _with_quantized(record, quantized_merge, tied) if tied else record


def _with_quantized(record: KnotRecord, merge: str, tied: dict[str, quantized.LayerKnot]) -> KnotRecord:
    """``record`` with what a knot did on the quantized layers: residual rank, compression/requantize errors."""
    compression = {name: t.compression_error for name, t in tied.items() if t.compression_error}
    requantize = {
        name: t.requantize.relative_to_update for name, t in tied.items() if t.requantize is not None
    }
    return dataclasses.replace(
        record,
        quantized_merge=merge,
        residual_rank=max(t.residual_rank for t in tied.values()),
        compression_errors=compression or None,
        requantize_errors=requantize or None,
    )


def set_peft_rank(model: nn.Module, rank: int) -> None:
    """Keep ``peft_config`` truthful after a rank change, so ``save_pretrained`` writes a loadable adapter."""
    for config in getattr(model, "peft_config", {}).values():
        config.r = rank
        config.rank_pattern = {}


def merge_chain(model: nn.Module, *, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Fold the current link into the base (the last knot, with no extension) and remove every LoRA module.

    Returns the plain transformers model: same parameter count as before LoRA, zero inference overhead.
    A model with LoRA layers over a bitsandbytes base is merged into its *dequantized* weights, in ``dtype``
    (``chainlora.quantized.merge_dequantized``, which also reports the error of that cast).
    """
    if any(quantization(layer) is not None for _, layer, _ in lora_layers(model)):
        return quantized.merge_dequantized(model, dtype)[0]
    for _, layer, adapter in list(lora_layers(model)):
        delta, bias_delta = link_delta(layer, adapter)
        if not distributed.item(torch.isfinite(delta).all()):
            raise KnotError("refusing final merge: the current link is not finite")
        _merge_into_base(layer, delta, bias_delta)
    return model.unload() if hasattr(model, "unload") else model
