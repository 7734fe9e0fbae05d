"""COLA on several processes: DDP replicas, FSDP2 shards, and the set-ups a knot refuses.

**DDP** (``torchrun`` / ``accelerate launch`` with the HF ``Trainer``): every process holds the whole model
and DDP all-reduces the gradients, so every process holds bit-identical links. Every process ties the same knot at
the same step (the schedule is a function of the step), merges the same ``s·B·A``, draws the same new A (from
``callback.knot_generator(seed, link)``) and clears its own optimizer state. :func:`sync_replicas` then checks a
fingerprint of the chained tensors across processes (one small ``all_gather``) and, should the replicas differ,
broadcasts them from rank 0 with a warning.

**FSDP2** (``fully_shard``; accelerate ``fsdp_version: 2``): parameters are ``DTensor`` shards (W and B by
rows, A by rows of its r). A knot never gathers W: each process gathers only A (r×in; and B, out×r, only when
B is not laid out like W's rows, e.g. a transposed ``Conv1D`` weight) and adds its own block of ``s·B·A`` to
its own shard of W (:func:`sharded_link_delta`); the new A is drawn whole on every process from the same
generator and each keeps its slice; B's shards are zeroed. Finiteness and norms are reduced over all
processes first, so every process takes the same decision. Memory per knot and layer: A (r×in) and one fp32 block the size of the local W shard,
both transient; with ``keep_links`` each process also keeps the tied link whole on CPU (r×(in+out)).

**Refused**, with a :class:`~chainlora.errors.ConfigError` before training starts (the callback's
``on_train_begin``) and again in ``tie_knot``:

* a change of rank (rank step-down) with more than one process: DDP's reducer and FSDP's shards hold the
  original parameters, so a link of a new rank would silently stop being synchronized;
* FSDP1 (``FullyShardedDataParallel``, flat parameters): use FSDP2;
* DeepSpeed: ZeRO keeps its own fp32 copy of the trainable weights, which a knot cannot reset;
* an FSDP2 model whose LoRA parameters are not sharded ``DTensor``s at the knot (unsharded mid-step);
* on a bitsandbytes-quantized base (``chainlora.quantized``), FSDP2 with an int8 base (FSDP2 replaces
  bitsandbytes' ``Int8Params`` by a plain ``Parameter``, which loses its scales) or with
  ``quantized_merge='requantize'`` (each process holds a block of the *packed* 4-bit data, which cannot be
  re-quantized in place). The residual is replicated (buffers): DDP and FSDP2 (nf4/fp4) both work, and
  :func:`sync_replicas` fingerprints it with the rest of the chain.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

try:  # torch >= 2.5 with torch.distributed: the public DTensor API (FSDP2)
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
except ImportError:  # older torch, or a build without torch.distributed: nothing is ever sharded

    class DTensor(torch.Tensor):  # type: ignore[no-redef]
        """Stand-in: no tensor is an instance, so every sharded code path is skipped."""


from chainlora.errors import ConfigError
from chainlora.links import chain_length, layer_chains, lora_layers, quantization
from chainlora.schedules import KnotSchedule

if TYPE_CHECKING:
    from peft.tuners.lora import Linear as LoraLinear


logger = logging.getLogger("chainlora")

__all__ = [
    "check_knot_supported",
    "check_rank_schedule",
    "check_training_setup",
    "copy_full_",
    "cpu_fp32_copy",
    "full_tensor",
    "is_sharded",
    "item",
    "sharded_link_delta",
    "sync_replicas",
    "world_size",
]


# ------------------------------------------------------------------------------------------ tensors


def world_size() -> int:
    """Processes in the default ``torch.distributed`` group (1 when none is initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_sharded(tensor: torch.Tensor | None) -> bool:
    """True for a ``DTensor`` (an FSDP2/tensor-parallel parameter): its data is spread over processes."""
    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: all-gathered when sharded (a collective: every process must call it), else itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def cpu_fp32_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A detached fp32 copy of the whole tensor on CPU (gathered first when sharded: a collective)."""
    return full_tensor(tensor.detach()).float().cpu().clone()


def item(tensor: torch.Tensor) -> float:
    """``float(tensor)`` of a scalar, reduced over processes when it is a partial ``DTensor`` (a collective).

    ``float()`` of a partial ``DTensor`` silently returns this process's share only; a knot's decisions
    (finite? too large?) must be the same on every process, so they go through here.
    """
    return float(tensor.full_tensor() if isinstance(tensor, DTensor) else tensor)


@torch.no_grad()
def copy_full_(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst ← src`` where ``src`` is the whole tensor (the same on every process) and ``dst`` may be a shard.

    Each process copies its own slice of ``src``; there is no communication.
    """
    if isinstance(dst, DTensor):
        src = src.to(device=dst.to_local().device, dtype=dst.dtype)
        dst.copy_(distribute_tensor(src, dst.device_mesh, dst.placements, src_data_rank=None))
    else:
        dst.copy_(src)


def _local_index(tensor: DTensor, dim: int) -> torch.Tensor:
    """Global indices along ``dim`` of a 2-D ``DTensor`` of the entries this process holds (no communication).

    Only ``Replicate`` and ``Shard(0)``/``Shard(1)`` placements are understood (FSDP2, HSDP, row/column-wise
    tensor parallel); anything else is refused rather than merged at the wrong place.
    """
    placements = []
    for p in tensor.placements:
        if p.is_replicate():
            placements.append(Replicate())
        elif type(p) is Shard:  # not a subclass such as _StridedShard (FSDP2 + tensor parallel)
            placements.append(Shard(0) if p.dim % tensor.ndim == dim else Replicate())
        else:
            raise ConfigError(f"a knot cannot merge into a parameter placed as {tensor.placements}")
    index = torch.arange(tensor.shape[dim], device=tensor.to_local().device)
    return distribute_tensor(index, tensor.device_mesh, placements, src_data_rank=None).to_local()


def _lora_B_rows(
    lora_B: torch.Tensor, weight: DTensor, index: torch.Tensor, transposed: bool
) -> torch.Tensor:
    """``B[index]`` in fp32. B's local shard when B is laid out like W by rows only (then it holds exactly W's
    local rows, all r columns), else B gathered whole (out×r). The choice depends only on the layouts, which
    are the same on every process, so all processes take part in the gather or none does."""
    if isinstance(lora_B, DTensor):
        rows_only = all(p.is_replicate() or (type(p) is Shard and p.dim % 2 == 0) for p in weight.placements)
        same = lora_B.placements == weight.placements and lora_B.shape[0] == weight.shape[0]
        if same and rows_only and not transposed:
            return lora_B.to_local().float()
        lora_B = lora_B.full_tensor()
    return lora_B.float()[index]


@torch.no_grad()
def sharded_link_delta(layer: LoraLinear, adapter: str) -> tuple[DTensor, torch.Tensor | None]:
    """The link's update ``s·B·A`` laid out like the sharded base weight, and the bias update ``s·b``.

    Each process computes only its own block of ``s·B·A`` (rows and columns of its shard of W, in fp32) from
    the gathered A (r×in) and B's local rows; W itself is never gathered. The result is a ``DTensor`` with W's
    placements, so ``W + delta`` and ``delta.square().sum()`` are W-shaped operations on the local shards.
    """
    weight = layer.get_base_layer().weight
    scaling = layer.scaling[adapter]
    lora_A = full_tensor(layer.lora_A[adapter].weight).float()  # (r, in): the one gather a knot needs
    lora_B = layer.lora_B[adapter].weight  # (out, r), sharded by rows like W
    rows, cols = _local_index(weight, 0), _local_index(weight, 1)
    if layer.fan_in_fan_out:  # W is (in, out): its block of (B·A)ᵀ
        block = lora_A[:, rows].T @ _lora_B_rows(lora_B, weight, cols, transposed=True).T
    else:
        block = _lora_B_rows(lora_B, weight, rows, transposed=False) @ lora_A[:, cols]
    delta = DTensor.from_local(
        block * scaling,
        weight.device_mesh,
        weight.placements,
        run_check=False,
        shape=weight.shape,
        stride=weight.stride(),
    )
    bias = layer.lora_B[adapter].bias
    return delta, (bias.float() * scaling if bias is not None else None)


# -------------------------------------------------------------------------------------------- checks

RANK_CHANGE = (
    "a change of LoRA rank ({what}) is not supported with {n} processes: DDP and FSDP hold the original "
    "LoRA parameters, so a link of a new rank would silently stop being synchronized. Give every link the "
    "same rank (drop `ranks` from the schedule), or train on one process."
)
FSDP1 = (
    "FSDP1 (FullyShardedDataParallel, flat parameters) is not supported for COLA knots: use FSDP2 "
    "(accelerate config `fsdp_version: 2`, or torch.distributed.fsdp.fully_shard)."
)
DEEPSPEED = (
    "DeepSpeed is not supported for COLA knots: ZeRO keeps its own fp32 copy of the LoRA weights, which a knot "
    "cannot reset (the next step would undo it). Use DDP or FSDP2."
)
FSDP2_INT8 = (
    "{name}: an int8 (bitsandbytes Linear8bitLt) base cannot be sharded by FSDP2 (it replaces Int8Params by a "
    "plain Parameter, which has no scales): use DDP, or quantize nf4/fp4"
)
FSDP2_REQUANTIZE = (
    "quantized_merge 'requantize' is not supported with FSDP2 (each process holds a block of the packed 4-bit "
    "weight, which cannot be re-quantized in place): use the exact residual (quantized_merge 'residual') or DDP"
)


def _check_engine(model: nn.Module, quantized_merge: str = "residual") -> None:
    """Refuse wrappers a knot cannot work under (FSDP1, DeepSpeed ZeRO-3, FSDP2 caught unsharded, FSDP2 with an
    int8 base or with ``quantized_merge='requantize'``)."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise ConfigError(DEEPSPEED)
    if not dist.is_available():
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    try:
        from torch.distributed.fsdp import FSDPModule

        fsdp2: tuple[type, ...] = (FSDPModule,)
    except ImportError:  # torch < 2.6: no public FSDP2
        fsdp2 = ()
    modules = list(model.modules())
    if any(isinstance(m, FullyShardedDataParallel) for m in modules):
        raise ConfigError(FSDP1)
    if any(isinstance(m, fsdp2) for m in modules):
        for name, layer, adapter in lora_layers(model):
            scheme = quantization(layer)
            if scheme == "int8":
                raise ConfigError(FSDP2_INT8.format(name=name))
            if scheme is not None and quantized_merge == "requantize":
                raise ConfigError(FSDP2_REQUANTIZE)
            params = [layer.lora_A[adapter].weight, layer.lora_B[adapter].weight]
            if scheme is None:  # a quantized weight's shard is packed data: only the links must be sharded
                params.append(layer.get_base_layer().weight)
            if not all(isinstance(p, DTensor) for p in params):
                raise ConfigError(
                    f"{name}: FSDP2 parameters are not sharded DTensors here; a knot must run between optimizer "
                    "steps (after FSDP reshards), not inside forward/backward"
                )


def check_knot_supported(
    model: nn.Module,
    layers: Iterable[tuple[str, LoraLinear, str]],
    rank: int | None,
    *,
    quantized_merge: str = "residual",
) -> None:
    """Called by ``tie_knot`` before it changes anything: the engine is supported and, with several processes
    or sharded parameters, the rank does not change."""
    _check_engine(model, quantized_merge)
    if rank is None:
        return
    changing = {layer.r[adapter] for _, layer, adapter in layers if layer.r[adapter] != rank}
    if changing and (world_size() > 1 or any(is_sharded(layer.lora_A[a].weight) for _, layer, a in layers)):
        raise ConfigError(RANK_CHANGE.format(what=f"{sorted(changing)} → {rank}", n=world_size()))


def scheduled_ranks(schedule: KnotSchedule, first_link: int) -> Iterator[tuple[int, int]]:
    """``(link, rank)`` for the scheduled links from ``first_link`` on that name a rank."""
    for link in range(first_link, schedule.max_links + 1):
        rank = schedule.rank_of_link(link)
        if rank is not None:
            yield link, rank


def check_rank_schedule(
    schedule: KnotSchedule, ranks: int | Iterable[int], *, processes: int | None = None, first_link: int = 1
) -> None:
    """Refuse, with more than one process, a schedule whose links from ``first_link`` on change the rank.

    ``ranks``: the LoRA layers' current rank(s); ``processes`` defaults to the ``torch.distributed`` world size
    (a recipe can call this before any process group exists, with ``TrainingArguments.world_size``).
    """
    processes = world_size() if processes is None else processes
    if processes <= 1:
        return
    current = {ranks} if isinstance(ranks, int) else set(ranks)
    for link, rank in scheduled_ranks(schedule, first_link):
        if current != {rank}:
            what = f"link {link} has rank {rank}, the LoRA layers {sorted(current)}"
            raise ConfigError(RANK_CHANGE.format(what=what, n=processes))


def check_training_setup(
    model: nn.Module, schedule: KnotSchedule, args: Any = None, *, quantized_merge: str = "residual"
) -> None:
    """Fail before the first step on a distributed set-up a knot cannot handle (see the module docstring).

    Run by the callback's ``on_train_begin``, after a resume restored the chain: only the links still to come
    count, so a run resumed after its last rank change trains on several processes.
    """
    if args is not None and (
        getattr(args, "deepspeed", None) or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    ):
        raise ConfigError(DEEPSPEED)
    _check_engine(model, quantized_merge)
    current = {layer.r[adapter] for _, layer, adapter in lora_layers(model)}
    check_rank_schedule(schedule, current, first_link=chain_length(model) + 1)


# --------------------------------------------------------------------------------------------- DDP


def _chain_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The replicated (not sharded) tensors a knot writes: base weight, bias, fp32 master, A, B, B's bias; on a
    quantized base the residual's factors, and the quantized weight's scales once re-quantized."""
    tensors = []
    for _, layer, adapter, chain in layer_chains(model):
        base = layer.get_base_layer()
        candidates = [
            base.weight,
            base.bias,
            chain.master_weight,
            layer.lora_A[adapter].weight,
            layer.lora_B[adapter].weight,
            layer.lora_B[adapter].bias,
        ]
        if chain.residual is not None:
            candidates += list(chain.residual.buffers(recurse=False))
        if chain.requantized:
            candidates += _quantization_scales(base)
        tensors += [t for t in candidates if t is not None and not isinstance(t, DTensor)]
    return tensors


def _quantization_scales(base: nn.Module) -> list[torch.Tensor | None]:
    """The scales that go with a re-quantized bitsandbytes weight's data: 4-bit block absmax (and its own
    absmax with double quantization); int8 row scales (SCB)."""
    state = getattr(base.weight, "quant_state", None)
    if state is not None:
        nested = getattr(state, "state2", None)
        return [state.absmax, getattr(state, "offset", None), nested.absmax if nested is not None else None]
    int8_state = getattr(base, "state", None)
    return [getattr(int8_state, "SCB", None), getattr(base.weight, "SCB", None)]


@torch.no_grad()
def sync_replicas(model: nn.Module, src: int = 0) -> bool:
    """After a knot with several replicated processes (DDP): check that every process holds the same chain.

    Compares a fingerprint (float64 sum and norm of every chained tensor; one ``all_gather`` of 2 numbers per
    tensor). Returns True when all agree; otherwise broadcasts the chained tensors from ``src``, logs a warning
    and returns False. A no-op (True) on one process and for sharded (FSDP2) tensors, which are not replicas.
    """
    if world_size() <= 1:
        return True
    tensors = _chain_tensors(model)
    if not tensors:
        return True
    device = _collective_device()  # the fp32 masters live on the CPU, the rest on the accelerator
    fingerprint = torch.stack(
        [torch.stack([t.double().sum(), t.double().norm()]).to(device) for t in tensors]
    ).flatten()
    gathered = [torch.empty_like(fingerprint) for _ in range(world_size())]
    dist.all_gather(gathered, fingerprint)
    if all(torch.equal(g, gathered[src]) for g in gathered):
        return True
    spread = max(float((g - gathered[src]).abs().max()) for g in gathered)
    logger.warning(
        "chainlora: the %d processes disagree on the chain after a knot (fingerprint spread %.3g); "
        "broadcasting it from rank %d",
        world_size(),
        spread,
        src,
    )
    for t in tensors:
        if t.device == device:
            dist.broadcast(t.data, src)
        else:  # e.g. a CPU master under NCCL: send it through the collective device
            moved = t.data.to(device)
            dist.broadcast(moved, src)
            t.data.copy_(moved)
    return False


def _collective_device() -> torch.device:
    """Where this process group's collectives run: the current CUDA device under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
