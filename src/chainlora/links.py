"""The LoRA layers a chain lives on, and the state each of them keeps across knots: one owner for that state.

A knot changes more than the current link's A and B. On every LoRA layer it ties, it leaves a
:class:`LayerChain`:

* ``master_weight``: the fp32 copy of a half-precision base weight in which the knots accumulate exactly
  (``tie_knot(precise=...)``); on the CPU (it is read only at a knot), or beside an FSDP2 shard;
* ``links``: every tied link ``s·B·A`` (+ ``s·b``) as a :class:`TiedLink`, whole, fp32, on the CPU
  (``tie_knot(keep_links=True)``), so that the chain can be exported as one adapter;
* ``knots``: how many knots this layer has tied.

Nothing reads or writes that state except through :func:`layer_chain` (one layer) and :func:`layer_chains` (a
whole model): ``chain`` writes it at a knot, ``state`` saves and restores it, ``adapter`` exports it,
``distributed`` keeps it the same on every process.

Invariants: ``len(links) == knots`` unless knots were tied with ``keep_links=False``; the base weight is
``W0 + Σ links`` (rounded to its dtype; exactly ``master_weight`` when there is one).
"""

from __future__ import annotations

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
    links: list[TiedLink] = field(default_factory=list)  # the tied links, oldest first
    knots: int = 0  # knots tied on this layer


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear, str]]:
    """Yield ``(module name, LoRA layer, adapter name)`` for every active LoRA link in ``model``.

    Only PEFT's plain ``lora.Linear`` over a floating-point ``nn.Linear`` can be tied: merging into a quantized
    base is lossy and a DoRA/variant link is not ``s·B·A``, so both are refused with a :class:`KnotError`.
    """
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            if type(module) is not LoraLinear or adapter in getattr(module, "lora_variant", {}):
                raise KnotError(
                    f"{name}: only plain LoRA on nn.Linear can be tied, not {type(module).__name__}"
                )
            weight = module.get_base_layer().weight
            if not weight.is_floating_point():
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
