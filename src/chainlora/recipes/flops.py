"""Training FLOPs, counted analytically from the model's matmul shapes and the tokens it processed.

Per token, for a weight of N = in·out elements (one multiply-add = 2 FLOPs)::

    forward                 2N   every matmul
    backward, input grad    2N   only when the matmul's input depends on a trainable parameter
    backward, weight grad   2N   only for a trainable weight

so a frozen base matmul costs 2N (below every trainable parameter) or 4N, a trained one 6N (full fine-tuning
of every weight gives the usual 6·N·tokens). A LoRA link of rank r on an ``in → out`` layer adds A (in → r) and
B (r → out), both trained: forward 2r(in+out), weight grads 2r(in+out), B's input grad 2r·out (always: A's
weight grad needs it) and A's input grad 2r·in (when the base layer needs its input grad). That is why a
lower-rank link is cheaper, as in the paper's Table 4 (the frozen base dominates, so savings are modest).

Attention scores (per layer, with d = the queries' width = heads·head_dim and T the sequence length):
QKᵀ and P·V cost 2·T·d per token each in the forward pass (the full T×T square, no causal halving), and twice
that in the backward pass (gradients of both operands) when the layer's attention inputs need gradients.

A training run counts each sequence on its real tokens (:func:`sequence_flops`: padding excluded), so the total
of the same examples does not depend on how they are batched, accumulated or split over processes.

"Needs an input gradient" is decided by *stages* in forward order: (layer i, 0) q/k/v projections, (i, 1)
attention scores, (i, 2) output projection, (i, 3) MLP input projections, (i, 4) MLP output projection, then
the LM head. A matmul needs its input gradient iff some trainable parameter sits at an earlier stage (the
residual stream carries every earlier stage to every later one; q/k/v at one stage do not feed each other).
Other trainable parameters (norms, embeddings, in full fine-tuning) count at the start of their layer, or
before layer 0 outside the layers. Not counted: norms, activations, softmax, the loss, the optimizer update
(all O(N) per token, not O(N·token)). Evaluation passes are not training FLOPs and are not counted.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from peft.tuners.lora import LoraLayer
from torch import nn

Stage = tuple[int, int]
BEFORE_LAYERS: Stage = (-1, 0)

_LAYER = re.compile(r"\.(?:layers|h|layer|blocks|decoder_layers)\.(\d+)\.")
_SUBSTAGE = [
    (0, re.compile(r"(q_proj|k_proj|v_proj|qkv_proj|query_key_value|c_attn|Wqkv|query|key|value)$")),
    (2, re.compile(r"(o_proj|out_proj|attn\.c_proj|attention\.dense|attention\.output\.dense)$")),
    (3, re.compile(r"(gate_proj|up_proj|gate_up_proj|fc1|c_fc|w1|w3|dense_h_to_4h|intermediate\.dense)$")),
    (4, re.compile(r"(down_proj|fc2|mlp\.c_proj|w2|dense_4h_to_h|output\.dense)$")),
]
_QUERY = re.compile(r"(q_proj|query)$")


@dataclass(frozen=True)
class Matmul:
    """One weight matmul ``in → out`` at a forward stage; ``lora_rank`` > 0 when a LoRA link wraps it."""

    name: str
    in_features: int
    out_features: int
    stage: Stage
    trainable: bool  # the weight itself is trained
    lora_rank: int = 0

    @property
    def params(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class FlopModel:
    """What the FLOP count needs from a model: its matmuls, attention widths, and the earliest trained stage."""

    matmuls: tuple[Matmul, ...]
    attention: tuple[tuple[int, int], ...]  # (layer index, query width d) per attention layer, stage (i, 1)
    first_trainable: Stage | None  # earliest stage holding a trainable parameter (None: nothing trains)

    def needs_input_grad(self, stage: Stage) -> bool:
        return self.first_trainable is not None and self.first_trainable < stage


def matmul_flops(m: Matmul, tokens: int, *, input_grad: bool) -> int:
    """Forward + backward FLOPs of one (possibly LoRA-wrapped) matmul over ``tokens`` tokens."""
    n = m.params
    total = 2 * n * (1 + int(input_grad) + int(m.trainable))
    if m.lora_rank:
        r = m.lora_rank
        a, b = m.in_features * r, r * m.out_features
        total += 2 * (a + b)  # forward through A then B
        total += 2 * (a + b)  # weight grads of A and B
        total += 2 * b  # input grad of B (A's weight grad needs it)
        total += 2 * a * int(input_grad)  # input grad of A, only if the layer input needs a gradient
    return total * tokens


def attention_flops(d: int, seq_len: int, tokens: int, *, backward: bool) -> int:
    """QKᵀ and P·V of one layer: 2·T·d per token each forward, both operands' gradients backward."""
    forward = 2 * (2 * seq_len * d)
    return (forward + (2 * forward if backward else 0)) * tokens


def step_flops(fm: FlopModel, sequences: int, seq_len: int) -> int:
    """Training FLOPs (forward + backward) of one micro-batch of ``sequences`` × ``seq_len`` (padded) tokens."""
    tokens = sequences * seq_len
    total = sum(matmul_flops(m, tokens, input_grad=fm.needs_input_grad(m.stage)) for m in fm.matmuls)
    for layer, d in fm.attention:
        total += attention_flops(d, seq_len, tokens, backward=fm.needs_input_grad((layer, 1)))
    return total


def sequence_flops(fm: FlopModel, lengths: Iterable[int]) -> int:
    """Training FLOPs of a micro-batch counted on its real tokens: each sequence of ``lengths`` as a batch of its
    own (padding excluded), so the count is a sum over sequences, independent of the batching."""
    return sum(
        count * step_flops(fm, 1, int(length)) for length, count in Counter(lengths).items() if length > 0
    )


def _stage_of(name: str, num_layers: int, is_head: bool) -> Stage:
    if is_head:
        return (num_layers, 0)
    match = _LAYER.search("." + name + ".")
    if match is None:
        return BEFORE_LAYERS
    for sub, pattern in _SUBSTAGE:
        if pattern.search(name):
            return (int(match.group(1)), sub)
    return (int(match.group(1)), 0)


def _clean(name: str) -> str:
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def flop_model(model: nn.Module) -> FlopModel:
    """Read the matmuls (with the current LoRA ranks) and trainable stages of a live model, PEFT or not."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layer_ids = {
        int(m.group(1)) for name, _ in model.named_modules() if (m := _LAYER.search("." + name + "."))
    }
    num_layers = max(layer_ids, default=-1) + 1
    matmuls: list[Matmul] = []
    attention: dict[int, int] = {}
    stage_of_module: dict[int, Stage] = {}  # id of each counted nn.Linear (base, LoRA A and B) -> its stage
    for name, module in model.named_modules():
        if id(module) in stage_of_module:
            continue
        clean = _clean(name)
        if isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), nn.Linear):
            linear = module.get_base_layer()
            adapters = [a for a in module.active_adapters if a in module.lora_A]
            rank = sum(module.r[a] for a in adapters)
            parts = [linear, *(module.lora_A[a] for a in adapters), *(module.lora_B[a] for a in adapters)]
        elif isinstance(module, nn.Linear):
            linear, rank, parts = module, 0, [module]
        else:
            continue
        stage = _stage_of(clean, num_layers, linear is head or module is head)
        stage_of_module.update((id(part), stage) for part in parts)
        trainable = linear.weight.requires_grad
        matmuls.append(Matmul(clean, linear.in_features, linear.out_features, stage, trainable, rank))
        if stage[1] == 0 and _QUERY.search(clean):
            attention[stage[0]] = linear.out_features
    # every place a trainable parameter is used counts (a tied embedding is both before layer 0 and the head)
    trained = [
        stage_of_module.get(id(module)) or _param_stage(_clean(name), num_layers)
        for name, module in model.named_modules()
        if any(p.requires_grad for p in module.parameters(recurse=False))
    ]
    return FlopModel(tuple(matmuls), tuple(sorted(attention.items())), min(trained, default=None))


def _param_stage(name: str, num_layers: int) -> Stage:
    """Stage of a trainable non-matmul parameter (norm, embedding): the start of its layer, else before all."""
    match = _LAYER.search("." + name + ".")
    return (int(match.group(1)), 0) if match else BEFORE_LAYERS
