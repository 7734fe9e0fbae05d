"""Save and restore the whole chain (merged base weights, tied links, current link, ranks) for resume.

A PEFT checkpoint holds only the current link's A and B; after a knot the *base* weights have moved too, and
after a rank step-down the link has another shape. The chain state file (``chainlora_chain.safetensors``) holds
everything that the knots changed, for the LoRA-targeted layers only (small next to the model): each layer's
base weight (its fp32 master when kept), current link and :class:`~chainlora.links.LayerChain`, so resuming
mid-chain is exact. A resized link is rebuilt with ``chain.extend_link``.

On a bitsandbytes-quantized base (``chainlora.quantized``) the quantized weight is the same on every load of
the model, so a layer keeps its residual instead (``residual_U``, ``residual_V``, ``residual_bias``; always
written, rank 0 included), and, after ``requantize`` knots, the re-quantized weight itself (``quant/...``: the
packed data and its quant state, or int8 data and scales) and the base bias. The file's metadata names each
quantized layer's scheme; a model quantized otherwise (nf4 vs fp4 vs int8, or not at all) is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from chainlora import distributed, quantized
from chainlora.chain import KnotRecord, extend_link, master_copy, set_peft_rank
from chainlora.errors import ChainLoRAError, ConfigError
from chainlora.io import atomic_path
from chainlora.links import TiedLink, layer_chain, layer_chains, lora_layers, quantization

CHAIN_STATE_FILE = "chainlora_chain.safetensors"
FORMAT = "chainlora-chain-v1"


def _chain_items(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every ``(key, tensor)`` of the chain file, in a fixed order: the one definition of its layout.

    Per LoRA layer: base weight (the fp32 master when kept) and bias, current A/B (and B's bias), the number of
    knots, and each tied link. Tensors are as this process holds them (an FSDP2 shard stays a shard).
    """
    for name, layer, adapter, chain in layer_chains(model):
        base = layer.get_base_layer()
        if quantization(layer) is not None:
            yield from _quantized_items(name, layer, chain)
        else:
            master = chain.master_weight
            yield f"{name}/base_weight", master if master is not None else base.weight
            yield f"{name}/master", torch.tensor(master is not None)
            if base.bias is not None:
                yield f"{name}/base_bias", base.bias
        yield f"{name}/lora_A", layer.lora_A[adapter].weight
        yield f"{name}/lora_B", layer.lora_B[adapter].weight
        if layer.lora_B[adapter].bias is not None:
            yield f"{name}/lora_B_bias", layer.lora_B[adapter].bias
        yield f"{name}/knots", torch.tensor(chain.knots)
        for i, link in enumerate(chain.links):  # whole, on the CPU already
            yield f"{name}/link{i}/lora_A", link.lora_A
            yield f"{name}/link{i}/lora_B", link.lora_B
            yield f"{name}/link{i}/scaling", torch.tensor(link.scaling, dtype=torch.float64)
            if link.lora_B_bias is not None:
                yield f"{name}/link{i}/lora_B_bias", link.lora_B_bias


def _quantized_items(name: str, layer: Any, chain: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """A quantized layer's share of the chain file: its residual, and what requantize knots changed."""
    wrapper = quantized.residual_of(layer)
    if wrapper is None:
        raise ChainLoRAError(f"{name}: no residual; call chainlora.quantized.attach_residuals(model) first")
    yield f"{name}/residual_U", wrapper.residual_U
    yield f"{name}/residual_V", wrapper.residual_V
    if wrapper.residual_bias is not None:
        yield f"{name}/residual_bias", wrapper.residual_bias
    if chain.requantized:
        base = layer.get_base_layer()
        for key, tensor in quantized.quantized_weight_tensors(base).items():
            yield f"{name}/quant/{key}", tensor
        if base.bias is not None:
            yield f"{name}/base_bias", base.bias


def _is_sharded_chain(model: nn.Module) -> bool:
    return any(distributed.is_sharded(layer.get_base_layer().weight) for _, layer, _ in lora_layers(model))


def chain_state_dict(model: nn.Module, *, keep: bool = True) -> dict[str, torch.Tensor]:
    """The chain as whole tensors on the CPU, keyed ``<layer name>/<what>`` (see :func:`_chain_items`).

    FSDP2 shards are gathered one tensor at a time (a collective: every process must call it); a process with
    ``keep=False`` takes part in the gathers and keeps nothing (returns ``{}``).
    """
    tensors = {}
    for key, tensor in _chain_items(model):
        whole = distributed.full_tensor(tensor.detach())
        if keep:
            tensors[key] = whole.contiguous().cpu()
    return tensors


def save_chain_state(
    model: nn.Module, directory: str | Path, knots: Sequence[KnotRecord] = (), *, main: bool = True
) -> Path | None:
    """Write ``directory/chainlora_chain.safetensors`` atomically (temp + fsync + rename); ``main`` says whether
    this process writes. With FSDP2 shards **every process must call it** (the gathers are collectives); with
    replicated weights the other processes return at once. The file is the same either way."""
    if not main and not _is_sharded_chain(model):
        return None
    tensors = chain_state_dict(model, keep=main)
    if not main:
        return None
    path = Path(directory) / CHAIN_STATE_FILE
    metadata = {"format": FORMAT, "knots": json.dumps([asdict(k) for k in knots])}
    schemes = {name: quantization(layer) for name, layer, _ in lora_layers(model) if quantization(layer)}
    if schemes:
        metadata["quantization"] = json.dumps(schemes)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


@torch.no_grad()
def load_chain_state(model: nn.Module, directory: str | Path) -> list[KnotRecord]:
    """Restore the chain saved by :func:`save_chain_state` into ``model`` (same architecture and LoRA targets);
    returns the knot records. Every process of a distributed run calls it.

    Replicated weights: links are resized to the saved rank first (no optimizer may hold them yet). FSDP2
    shards: each tensor is read in turn and each process keeps its own slice; the saved rank must equal the
    model's (a sharded link cannot be resized).
    """
    path = Path(directory) / CHAIN_STATE_FILE
    if not path.is_file():
        raise ChainLoRAError(f"{path} not found: this checkpoint has no chain state to resume from")
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ChainLoRAError(f"{path}: not a {FORMAT} file (format={metadata.get('format')!r})")
        keys = set(f.keys())
        layers = list(lora_layers(model))
        saved = {key.split("/")[0] for key in keys}
        if any(name not in saved for name, _, _ in layers) or len(saved) != len(layers):
            raise ChainLoRAError(
                f"{path}: saved chain covers {len(saved)} layers, the model has {len(layers)} LoRA layers"
            )
        schemes = json.loads(metadata.get("quantization", "{}"))
        for name, layer, _ in layers:
            if schemes.get(name) != quantization(layer):
                saved_on, model_is = (
                    schemes.get(name) or "unquantized",
                    quantization(layer) or "unquantized",
                )
                raise ChainLoRAError(
                    f"{path}: {name} was saved on a {saved_on} base, this model's is {model_is}"
                )
        if schemes:
            quantized.attach_residuals(model)
        for name, layer, adapter in layers:
            _restore_layer(f, keys, name, layer, adapter, path)
    ranks = {layer.r[adapter] for _, layer, adapter in layers}
    if len(ranks) == 1:
        set_peft_rank(model, ranks.pop())
    return [KnotRecord(**k) for k in json.loads(metadata.get("knots", "[]"))]


def _restore_layer(f: Any, keys: set[str], name: str, layer: Any, adapter: str, path: Path) -> None:
    """One layer of :func:`load_chain_state`: ``f`` is the open safetensors file."""
    saved_rank = f.get_tensor(f"{name}/lora_A").shape[0]
    base = layer.get_base_layer()
    if saved_rank != layer.r[adapter]:
        if distributed.is_sharded(base.weight):
            raise ConfigError(
                f"{path}: {name} was saved with rank {saved_rank}, the sharded model has rank "
                f"{layer.r[adapter]}; build the LoRA model with the saved rank before FSDP shards it"
            )
        extend_link(layer, adapter, saved_rank, "gaussian", None)
    chain = layer_chain(layer)
    if quantization(layer) is not None:
        _restore_quantized(f, keys, name, layer, chain)
    else:
        weight = f.get_tensor(f"{name}/base_weight")
        if bool(f.get_tensor(f"{name}/master")):
            chain.master_weight = master_copy(base.weight)  # placed (and sharded) as tie_knot places it
            distributed.copy_full_(chain.master_weight, weight)
        distributed.copy_full_(base.weight, weight)
        if base.bias is not None:
            distributed.copy_full_(base.bias, f.get_tensor(f"{name}/base_bias"))
    distributed.copy_full_(layer.lora_A[adapter].weight, f.get_tensor(f"{name}/lora_A"))
    distributed.copy_full_(layer.lora_B[adapter].weight, f.get_tensor(f"{name}/lora_B"))
    if layer.lora_B[adapter].bias is not None:
        distributed.copy_full_(layer.lora_B[adapter].bias, f.get_tensor(f"{name}/lora_B_bias"))
    chain.knots = int(f.get_tensor(f"{name}/knots"))
    links = sum(1 for k in keys if k.startswith(f"{name}/link") and k.endswith("/lora_A"))
    chain.links = [
        TiedLink(
            lora_A=f.get_tensor(f"{name}/link{i}/lora_A"),
            lora_B=f.get_tensor(f"{name}/link{i}/lora_B"),
            scaling=float(f.get_tensor(f"{name}/link{i}/scaling")),
            lora_B_bias=(
                f.get_tensor(f"{name}/link{i}/lora_B_bias") if f"{name}/link{i}/lora_B_bias" in keys else None
            ),
        )
        for i in range(links)
    ]


def _restore_quantized(f: Any, keys: set[str], name: str, layer: Any, chain: Any) -> None:
    """A quantized layer's residual and, after requantize knots, its re-quantized weight and base bias."""
    bias = f.get_tensor(f"{name}/residual_bias") if f"{name}/residual_bias" in keys else None
    residual = quantized.residual_of(layer)
    assert residual is not None  # load_chain_state attached the residuals
    residual.set_residual_(f.get_tensor(f"{name}/residual_U"), f.get_tensor(f"{name}/residual_V"), bias)
    prefix = f"{name}/quant/"
    base = layer.get_base_layer()
    if any(k.startswith(prefix) for k in keys):
        tensors = {k[len(prefix) :]: f.get_tensor(k) for k in keys if k.startswith(prefix)}
        if base.bias is not None:
            tensors["bias"] = f.get_tensor(f"{name}/base_bias")
        quantized.restore_quantized_weight(base, tensors)
        chain.requantized = True
    elif chain.requantized:  # saved before this model's first requantize knot: back to the original weight
        assert chain.original_weight is not None  # kept by the first requantize knot
        quantized.restore_quantized_weight(base, chain.original_weight)
        chain.requantized = False
