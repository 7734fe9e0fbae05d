"""The whole chain as one portable PEFT LoRA adapter (``chainlora.export_adapter``).

After k knots a layer computes ``W0·x + Σ_i s_i·B_i·A_i·x`` (+ ``Σ_i s_i·b_i`` with a LoRA bias), the sum over
the tied links and the current one. That sum *is* one LoRA of rank ``Σ_i r_i``::

    A = [A_1; A_2; …; A_m]              (Σr × in)    the links' A stacked
    B = [s_1·B_1, s_2·B_2, …, s_m·B_m]  (out × Σr)   the links' B, each scaled by its own s_i
    b = Σ_i s_i·b_i                                  the LoRA bias

    B·A = Σ_i s_i·B_i·A_i   exactly, and PEFT's own scaling is made 1 (lora_alpha = r, rsLoRA off).

So ``PeftModel.from_pretrained(original_base, folder)`` computes what the chained model computes, with any
PEFT version and no chainlora installed. The adapter is built from the links themselves (the tied ones kept by
``tie_knot``, see ``chainlora.links``, and the current one), never from the model's base weights: it applies to the *original* pretrained
weights W0, whatever happened to the training copy of the base (fp32 master, rounding to bf16, …).

With ``rank=R`` every layer's update ``ΔW = B·A`` is truncated to its best rank-R approximation (Eckart–Young),
computed from the factors (QR of B and Aᵀ, SVD of the small Σr × Σr core; no out × in matrix is formed); the
report gives each layer's relative Frobenius error ``‖ΔW - ΔW_R‖ / ‖ΔW‖ = sqrt(Σ_{j>R} σ_j²) / sqrt(Σ_j σ_j²)``.
The bias is never truncated.

On a bitsandbytes-quantized base (``chainlora.quantized``) a layer's tied links sit in its residual ``U·V``, so
its chain is ``[residual (scaling 1), current link]`` and the adapter applies to the original *quantized* base
(on the unquantized base it computes the same chain over W0 instead of ``deq(W_q)``). After ``requantize`` knots
the links themselves are exported, with a warning: the original base + adapter then differs from the trained
(re-quantized) model by the re-quantization errors.

``export_run_adapter(run_dir)`` does the same after the fact from a run folder (its ``adapter/`` or the chain
state of a checkpoint), for ``chainlora export RUN_DIR --adapter [--rank R]``.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from torch import nn

from chainlora import distributed, quantized, rundir
from chainlora.errors import ChainLoRAError, KnotError
from chainlora.io import atomic_dir
from chainlora.links import TiedLink, layer_chain, lora_layers, quantization, truncate
from chainlora.state import CHAIN_STATE_FILE

__all__ = ["ExportReport", "chain_links", "export_adapter", "export_run_adapter", "stack_links", "truncate"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_README = "README.md"  # where the base model comes from and how to load the adapter onto it
PREFIX = "base_model.model."  # how PEFT names a LoRA layer in a saved adapter: PREFIX + module path
REQUANTIZED = (
    "the adapter holds the links, and the original base + adapter differs from the trained (re-quantized) model "
    "by the re-quantization errors"
)


@dataclass
class _Meta:
    """What the adapter config needs besides the weights (taken from the run's LoRA config)."""

    task_type: str | None = None
    base_model_name_or_path: str | None = None
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    link_ranks: dict[str, tuple[int, ...]] | None = None  # the original chain's, when read from our adapter


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_adapter` wrote. ``relative_errors[layer]`` is ``‖ΔW - ΔW_exported‖_F / ‖ΔW‖_F``:
    0 without ``rank``, the norm of the dropped singular values over the norm of all of them with it."""

    path: Path
    layers: int  # LoRA layers in the adapter
    links: int  # links per layer in the chain (tied + current)
    link_ranks: dict[str, tuple[int, ...]]  # rank of every link of every layer (module path → ranks)
    ranks: dict[str, int]  # rank of every layer in the written adapter
    truncated_to: int | None  # the ``rank`` asked for, None for an exact export
    relative_errors: dict[str, float] = field(default_factory=dict)
    parameters: int = 0  # numbers stored in the adapter
    bytes: int = 0  # size of adapter_model.safetensors

    @property
    def max_relative_error(self) -> float:
        return max(self.relative_errors.values(), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary (per-layer errors only for a truncated export)."""
        ranks = set(self.ranks.values())
        summary: dict[str, Any] = {
            "path": str(self.path),
            "layers": self.layers,
            "links": self.links,
            "rank": ranks.pop() if len(ranks) == 1 else dict(self.ranks),
            "truncated_to": self.truncated_to,
            "parameters": self.parameters,
            "bytes": self.bytes,
            "max_relative_error": self.max_relative_error,
        }
        if self.truncated_to is not None:
            summary["relative_errors"] = dict(self.relative_errors)
        return summary


# ------------------------------------------------------------------------------------- collect the chain


def chain_links(model: nn.Module) -> dict[str, list[TiedLink]]:
    """Every link of every LoRA layer of ``model`` as a :class:`~chainlora.links.TiedLink`: the tied ones, then
    the current one (as it would be tied now). Keys are module paths inside the base transformers model (as PEFT's ``target_modules`` see them).

    Raises :class:`ChainLoRAError` for what one LoRA adapter cannot hold: no LoRA layer (a plain model, or one
    already merged by ``merge_chain``), DoRA or other variants, embedding/conv LoRA, several active adapters,
    or knots tied with ``keep_links=False`` (the links are gone, so ``W0 + Σ links`` cannot be rebuilt).
    """
    try:
        layers = list(lora_layers(model))
    except KnotError as error:
        raise ChainLoRAError(f"cannot export the chain as one LoRA adapter: {error}") from error
    if not layers:
        raise ChainLoRAError(
            "no LoRA layer in this model: nothing to export (export before merge_chain(); a model without "
            "peft LoRA has no chain)"
        )
    adapters = {adapter for _, _, adapter in layers}
    if len(adapters) > 1:
        raise ChainLoRAError(f"several active LoRA adapters {sorted(adapters)}: export one chain at a time")
    config = getattr(model, "peft_config", {}).get(adapters.pop())
    if config is not None and getattr(config, "modules_to_save", None):
        raise ChainLoRAError(
            f"modules_to_save={config.modules_to_save} (fully trained modules) are not part of a LoRA chain; "
            "export_adapter covers LoRA layers only"
        )
    root = _base_model(model)
    paths = {id(module): name for name, module in root.named_modules()}
    chains: dict[str, list[TiedLink]] = {}
    requantized = []
    for name, layer, adapter in layers:
        chain = layer_chain(layer)
        tied, knots = list(chain.links), chain.knots
        if any(
            distributed.is_sharded(p) for p in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight)
        ):
            raise ChainLoRAError(
                f"{name}: the link is sharded over processes (FSDP2); export from the chain state of a "
                "checkpoint instead: export_run_adapter(checkpoint_dir)"
            )
        if quantization(layer) is not None:  # [residual, (re-quantized links), current]
            chains[paths.get(id(layer), _strip_prefix(name))] = quantized.chain_terms(layer, adapter)
            requantized += [name] if chain.requantized else []
            continue
        if len(tied) != knots:
            raise ChainLoRAError(
                f"{name}: {knots} knot(s) tied but {len(tied)} link(s) kept (tie_knot(keep_links=False)?); "
                "the adapter needs every link"
            )
        bias = layer.lora_B[adapter].bias
        current = TiedLink(
            lora_A=layer.lora_A[adapter].weight.detach().float().cpu(),
            lora_B=layer.lora_B[adapter].weight.detach().float().cpu(),
            scaling=float(layer.scaling[adapter]),
            lora_B_bias=bias.detach().float().cpu() if bias is not None else None,
        )
        chains[paths.get(id(layer), _strip_prefix(name))] = [*tied, current]
    if requantized:
        warnings.warn(
            f"{len(requantized)} layer(s) were tied with quantized_merge='requantize': {REQUANTIZED}",
            stacklevel=2,
        )
    return chains


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model under PEFT's wrappers (``PeftModel`` → ``LoraModel`` → model)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    from peft.tuners.tuners_utils import BaseTuner

    return model.model if isinstance(model, BaseTuner) else model


def _strip_prefix(name: str) -> str:
    return name[len(PREFIX) :] if name.startswith(PREFIX) else name


def _meta_of(model: nn.Module, chains: dict[str, list[TiedLink]]) -> _Meta:
    meta = _Meta()
    configs = list(getattr(model, "peft_config", {}).values())
    if configs:
        config = configs[0]
        task_type = getattr(config, "task_type", None)
        meta.task_type = getattr(task_type, "value", task_type)
        meta.base_model_name_or_path = getattr(config, "base_model_name_or_path", None)
        meta.lora_dropout = float(getattr(config, "lora_dropout", 0.0))
    fan_in_fan_out = {layer.fan_in_fan_out for _, layer, _ in lora_layers(model)}
    if len(fan_in_fan_out) > 1:
        raise ChainLoRAError("LoRA layers disagree on fan_in_fan_out: one adapter config cannot hold both")
    meta.fan_in_fan_out = fan_in_fan_out.pop()
    return meta


# ------------------------------------------------------------------------------------------- the maths


def stack_links(links: Iterable[TiedLink]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(A, B, b)`` with ``B @ A = Σ s_i·B_i·A_i`` and ``b = Σ s_i·b_i`` (fp32): one LoRA of rank Σ r_i."""
    links = list(links)
    lora_A = torch.cat([link.lora_A.float() for link in links], dim=0)
    lora_B = torch.cat([link.lora_B.float() * link.scaling for link in links], dim=1)
    biases = [link.lora_B_bias.float() * link.scaling for link in links if link.lora_B_bias is not None]
    bias = torch.stack(biases).sum(0) if biases else None
    return lora_A, lora_B, bias


# ----------------------------------------------------------------------------------------------- write


def export_adapter(
    model: nn.Module,
    path: str | Path,
    rank: int | None = None,
    *,
    base_model_name_or_path: str | None = None,
    readme: str | None = None,
    overwrite: bool = False,
) -> ExportReport:
    """Write the whole chain of ``model`` (every tied link + the current one, every LoRA layer) as one standard
    PEFT LoRA adapter folder ``path`` (``adapter_config.json`` + ``adapter_model.safetensors``, and ``readme`` as
    its ``README.md`` when given).

    Invariant: ``PeftModel.from_pretrained(original_base, path)`` computes the chained model's function,
    ``W0 + Σ_i s_i·B_i·A_i`` (fp32 rounding only; ≤ 1e-5 on the tiny test models), whatever the training copy
    of the base went through. ``rank`` caps every layer's rank by SVD truncation (see :func:`truncate`).
    ``base_model_name_or_path`` defaults to the LoRA config's. A ``path`` holding another adapter (an
    ``adapter_config.json`` with other content) or other files is refused unless ``overwrite``; the folder is
    written atomically. Raises :class:`ChainLoRAError` for what one LoRA adapter cannot represent.
    """
    chains = chain_links(model)
    meta = _meta_of(model, chains)
    if base_model_name_or_path is not None:
        meta.base_model_name_or_path = base_model_name_or_path
    return _write_adapter(chains, meta, Path(path), rank, overwrite=overwrite, readme=readme)


def _write_adapter(
    chains: dict[str, list[TiedLink]],
    meta: _Meta,
    path: Path,
    rank: int | None,
    *,
    overwrite: bool,
    readme: str | None = None,
) -> ExportReport:
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ChainLoRAError(f"export rank must be a positive integer, got {rank!r}")
    if not any(
        link.lora_B.count_nonzero() or (link.lora_B_bias is not None and link.lora_B_bias.count_nonzero())
        for links in chains.values()
        for link in links
    ):
        raise ChainLoRAError("nothing to export: every link of the chain is zero (B = 0); train first")
    _check_target(path, overwrite)

    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    errors: dict[str, float] = {}
    has_bias = any(link.lora_B_bias is not None for links in chains.values() for link in links)
    for name, links in chains.items():
        lora_A, lora_B, bias = stack_links(links)
        if not (torch.isfinite(lora_A).all() and torch.isfinite(lora_B).all()):
            raise ChainLoRAError(f"{name}: the chain is not finite; refusing to export it")
        error = 0.0
        if rank is not None and rank < lora_A.shape[0]:
            lora_A, lora_B, error = truncate(lora_A, lora_B, rank)
        ranks[name], errors[name] = lora_A.shape[0], error
        tensors[f"{PREFIX}{name}.lora_A.weight"] = lora_A.contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = lora_B.contiguous()
        if has_bias:
            tensors[f"{PREFIX}{name}.lora_B.bias"] = (
                bias if bias is not None else torch.zeros(lora_B.shape[0])
            ).contiguous()

    config = _lora_config(ranks, meta, has_bias)
    link_ranks = meta.link_ranks or {
        name: tuple(link.lora_A.shape[0] for link in links) for name, links in chains.items()
    }
    info = {"format": "chainlora-adapter-v1", "link_ranks": link_ranks, "truncated_to": rank}
    with atomic_dir(path, overwrite=True) as tmp:
        config.save_pretrained(str(tmp))
        save_file(
            tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt", "chainlora": json.dumps(info)}
        )
        if readme is not None:
            (tmp / ADAPTER_README).write_text(readme)
        existing = path / ADAPTER_CONFIG
        written = json.loads((tmp / ADAPTER_CONFIG).read_text())
        if existing.is_file() and not overwrite and json.loads(existing.read_text()) != written:
            raise ChainLoRAError(
                f"{path} already holds a different adapter (its {ADAPTER_CONFIG} differs); pass "
                "overwrite=True (--overwrite) to replace it, or choose another folder"
            )
    return ExportReport(
        path=path,
        layers=len(chains),
        links=max(len(ranks) for ranks in link_ranks.values()),
        link_ranks=link_ranks,
        ranks=ranks,
        truncated_to=rank,
        relative_errors=errors,
        parameters=sum(t.numel() for t in tensors.values()),
        bytes=(path / ADAPTER_WEIGHTS).stat().st_size,
    )


def _check_target(path: Path, overwrite: bool) -> None:
    """Refuse (unless ``overwrite``) a file, or a folder with files that are not an adapter config."""
    if overwrite or not path.exists():
        return
    if not path.is_dir():
        raise ChainLoRAError(f"{path} exists and is not a folder; pass overwrite=True to replace it")
    others = [
        p.name for p in path.iterdir() if p.name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_README)
    ]
    if others:
        raise ChainLoRAError(
            f"{path} already holds other files ({', '.join(sorted(others)[:3])}…); pass overwrite=True to "
            "replace the folder, or choose another one"
        )
    if (path / ADAPTER_WEIGHTS).exists() and not (path / ADAPTER_CONFIG).exists():
        raise ChainLoRAError(f"{path} holds adapter weights without a config; pass overwrite=True")


def _lora_config(ranks: dict[str, int], meta: _Meta, has_bias: bool) -> LoraConfig:
    """A config whose scaling is exactly 1 in every layer (``lora_alpha = r``, no rsLoRA): the links' own
    scalings are already folded into B. Layers whose rank differs from the most common one get exact
    (regex-escaped) ``rank_pattern``/``alpha_pattern`` entries."""
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    common = max(counts, key=lambda r: (counts[r], r))
    pattern = {re.escape(name): r for name, r in sorted(ranks.items()) if r != common}
    return LoraConfig(
        r=common,
        lora_alpha=common,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        use_rslora=False,
        target_modules=sorted(ranks),
        lora_bias=has_bias,
        lora_dropout=meta.lora_dropout,
        fan_in_fan_out=meta.fan_in_fan_out,
        task_type=meta.task_type,
        base_model_name_or_path=meta.base_model_name_or_path,
        inference_mode=True,
    )


# ------------------------------------------------------------------------------------ from a run folder


def read_adapter(folder: str | Path) -> tuple[dict[str, list[TiedLink]], _Meta]:
    """The chain held by a PEFT LoRA adapter folder: one link per layer, with the scaling PEFT would use
    (``lora_alpha / r`` or ``/ √r`` with rsLoRA, ``rank_pattern``/``alpha_pattern`` honoured)."""
    from peft.utils.other import get_pattern_key

    folder = Path(folder)
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise ChainLoRAError(
            f"{folder}: only plain LoRA adapters can be read (peft_type={config.get('peft_type')})"
        )
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    chains: dict[str, list[TiedLink]] = {}
    for key in sorted(tensors):
        if not key.endswith(".lora_A.weight"):
            continue
        name = _strip_prefix(key[: -len(".lora_A.weight")])
        lora_A, lora_B = tensors[key].float(), tensors[f"{key[: -len('lora_A.weight')]}lora_B.weight"].float()
        r = lora_A.shape[0]
        rank_key = get_pattern_key(config.get("rank_pattern", {}).keys(), name)
        alpha_key = get_pattern_key(config.get("alpha_pattern", {}).keys(), name)
        r_config = config.get("rank_pattern", {}).get(rank_key, config["r"])
        if r_config != r:
            raise ChainLoRAError(f"{folder}: {name} has rank {r} but its config says {r_config}")
        alpha = config.get("alpha_pattern", {}).get(alpha_key, config["lora_alpha"])
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        bias = tensors.get(f"{key[: -len('lora_A.weight')]}lora_B.bias")
        chains[name] = [TiedLink(lora_A, lora_B, scaling, bias.float() if bias is not None else None)]
    if not chains:
        raise ChainLoRAError(f"{folder}: no LoRA weights in {ADAPTER_WEIGHTS}")
    meta = _meta_from_config(config)
    meta.link_ranks = _link_ranks_in(folder)
    return chains, meta


def read_chain_state(folder: str | Path) -> tuple[dict[str, list[TiedLink]], _Meta]:
    """The chain saved by ``chainlora.state.save_chain_state`` in ``folder`` (a checkpoint), with the
    ``adapter_config.json`` saved beside it (for the current link's scaling, α/r or α/√r, and the metadata)."""
    from peft.utils.other import get_pattern_key

    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).is_file():
        raise ChainLoRAError(
            f"{folder} has a chain state but no {ADAPTER_CONFIG} (needed for the link scaling)"
        )
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    tensors = load_file(str(folder / CHAIN_STATE_FILE))
    chains: dict[str, list[TiedLink]] = {}
    for key in sorted(k for k in tensors if k.endswith("/knots")):
        layer = key[: -len("/knots")]
        name = _strip_prefix(layer)
        knots = int(tensors[key])
        residual: list[TiedLink] = []
        if f"{layer}/residual_U" in tensors:  # a quantized base: the residual, then re-quantized links if any
            U, V, c = (tensors.get(f"{layer}/residual_{k}") for k in ("U", "V", "bias"))
            if U.shape[1] or c is not None:
                residual.append(TiedLink(V.float(), U.float(), 1.0, c.float() if c is not None else None))
            if f"{layer}/quant/weight" not in tensors:
                knots = 0  # every tied link is in the residual
            else:
                warnings.warn(f"{name}: tied with quantized_merge='requantize': {REQUANTIZED}", stacklevel=2)
        tied = [
            TiedLink(
                tensors[f"{layer}/link{i}/lora_A"].float(),
                tensors[f"{layer}/link{i}/lora_B"].float(),
                float(tensors[f"{layer}/link{i}/scaling"]),
                tensors.get(f"{layer}/link{i}/lora_B_bias"),
            )
            for i in range(knots)
            if f"{layer}/link{i}/lora_A" in tensors
        ]
        if len(tied) != knots:
            raise ChainLoRAError(f"{folder}: {name} tied {knots} knot(s) but kept {len(tied)} link(s)")
        tied = residual + tied
        lora_A = tensors[f"{layer}/lora_A"].float()
        r = lora_A.shape[0]
        alpha_key = get_pattern_key(config.get("alpha_pattern", {}).keys(), name)
        alpha = config.get("alpha_pattern", {}).get(alpha_key, config["lora_alpha"])
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        bias = tensors.get(f"{layer}/lora_B_bias")
        current = TiedLink(
            lora_A, tensors[f"{layer}/lora_B"].float(), scaling, bias.float() if bias is not None else None
        )
        chains[name] = [*tied, current]
    if not chains:
        raise ChainLoRAError(f"{folder / CHAIN_STATE_FILE}: no LoRA layer in the chain state")
    return chains, _meta_from_config(config)


def _meta_from_config(config: dict[str, Any]) -> _Meta:
    return _Meta(
        task_type=config.get("task_type"),
        base_model_name_or_path=config.get("base_model_name_or_path"),
        lora_dropout=float(config.get("lora_dropout", 0.0)),
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
    )


def find_chain_source(run_dir: str | Path) -> Path:
    """Where a run's chain can be read, first found: ``run_dir/adapter`` (written by ``chainlora train``),
    ``run_dir`` itself when it is an adapter or checkpoint folder, ``run_dir/chain``, then the newest
    ``checkpoint-N`` (anywhere under ``run_dir``) holding a chain state and its adapter config."""
    run_dir = Path(run_dir)
    candidates = [run_dir / rundir.ADAPTER_DIR, run_dir, run_dir / "chain"]
    checkpoints = sorted(run_dir.glob("**/checkpoint-*"), key=rundir.checkpoint_step, reverse=True)
    for folder in [*candidates, *checkpoints]:
        if (
            (folder / ADAPTER_WEIGHTS).is_file()
            and (folder / ADAPTER_CONFIG).is_file()
            and not (folder / CHAIN_STATE_FILE).is_file()
        ):
            return folder
        if (folder / CHAIN_STATE_FILE).is_file() and (folder / ADAPTER_CONFIG).is_file():
            return folder
    raise ChainLoRAError(
        f"{run_dir}: no chain to export: expected adapter/ (written by chainlora train), or a checkpoint with "
        f"{CHAIN_STATE_FILE} and {ADAPTER_CONFIG} (kept with keep_checkpoints)"
    )


def export_run_adapter(
    run_dir: str | Path,
    rank: int | None = None,
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    base_model_name_or_path: str | None = None,
    readme: str | None = None,
) -> dict[str, Any]:
    """Export the chain of a finished (or interrupted) run as one PEFT adapter; returns ``ExportReport.to_dict()``
    plus ``source`` (the folder read, see :func:`find_chain_source`).

    ``out`` defaults to ``run_dir/adapter`` (``run_dir/adapter-r{rank}`` with ``rank``). When the source is
    already ``run_dir/adapter`` and no ``rank`` is asked, nothing is rewritten: the report describes it.
    A checkpoint is the chain at *that* step, not the dev-selected final state: prefer the ``adapter/`` that
    ``chainlora train`` writes. ``base_model_name_or_path`` and ``readme`` are as in :func:`export_adapter`.
    """
    run_dir = Path(run_dir)
    source = find_chain_source(run_dir)
    is_chain_state = (source / CHAIN_STATE_FILE).is_file()
    chains, meta = read_chain_state(source) if is_chain_state else read_adapter(source)
    if base_model_name_or_path is not None:
        meta.base_model_name_or_path = base_model_name_or_path
    default = rundir.ADAPTER_DIR if rank is None else f"{rundir.ADAPTER_DIR}-r{rank}"
    target = Path(out) if out is not None else run_dir / default
    if not is_chain_state and rank is None and target.resolve() == source.resolve():
        link_ranks = meta.link_ranks or {name: (links[0].lora_A.shape[0],) for name, links in chains.items()}
        report = ExportReport(
            path=source,
            layers=len(chains),
            links=max(len(ranks) for ranks in link_ranks.values()),
            link_ranks=link_ranks,
            ranks={name: links[0].lora_A.shape[0] for name, links in chains.items()},
            truncated_to=None,
            relative_errors={name: 0.0 for name in chains},
            parameters=sum(t.numel() for t in load_file(str(source / ADAPTER_WEIGHTS)).values()),
            bytes=(source / ADAPTER_WEIGHTS).stat().st_size,
        )
    else:
        report = _write_adapter(chains, meta, target, rank, overwrite=overwrite, readme=readme)
    return {**report.to_dict(), "source": str(source)}


def _link_ranks_in(folder: Path) -> dict[str, tuple[int, ...]] | None:
    """The ranks of the original links, recorded by :func:`export_adapter` (None for another adapter)."""
    from safetensors import safe_open

    with safe_open(str(folder / ADAPTER_WEIGHTS), "pt") as f:
        info = json.loads((f.metadata() or {}).get("chainlora", "{}"))
    ranks = info.get("link_ranks")
    return {name: tuple(r) for name, r in ranks.items()} if ranks else None


# ------------------------------------------------------------------------------- onto the original base


@torch.no_grad()
def merge_links(model: nn.Module, chains: dict[str, list[TiedLink]]) -> nn.Module:
    """Merge ``chains`` (module path → links, as :func:`chain_links` gives them) into the plain transformers model
    ``model``, in fp32: ``W ← W + Σ_i s_i·B_i·A_i`` and ``b ← b + Σ_i s_i·b_i`` per layer, rounded once to W's
    dtype. On the original base this is the chained model merged, computed like PEFT applying the adapter
    :func:`export_adapter` writes (the same stacked factors)."""
    from transformers.pytorch_utils import Conv1D

    for name, links in chains.items():
        layer = model.get_submodule(name)
        lora_A, lora_B, bias = stack_links(links)
        delta = lora_B @ lora_A  # (out, in)
        if isinstance(layer, Conv1D):  # weight stored (in, out)
            delta = delta.T
        weight = layer.weight
        weight.copy_(weight.float() + delta.to(weight.device))
        if bias is not None:
            if layer.bias is None:
                raise ChainLoRAError(
                    f"{name}: the chain has a LoRA bias but the layer has no bias to merge into"
                )
            layer.bias.copy_(layer.bias.float() + bias.to(layer.bias.device))
    return model
