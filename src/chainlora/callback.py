"""COLA inside any HF ``Trainer`` (or TRL ``SFTTrainer``): a callback that ties knots at scheduled steps.

The Trainer keeps its own optimizer and LR scheduler: a knot clears the links' optimizer state in place, and
the scheduler's global schedule simply continues across links (the paper's natural reading). Checkpoints get
the chain state (``chainlora_chain.safetensors``) beside the adapter, and ``trainer.train(
resume_from_checkpoint=...)`` restores it *before* the Trainer loads the adapter, so resuming mid-chain, even
after a rank step-down, continues exactly where the run stopped.

The schedule is driven through the :class:`~chainlora.schedules.KnotSchedule` protocol alone: every logged
training loss goes to ``observe`` and every dev metric to ``observe_dev`` (no-ops for a fixed schedule); an
adaptive schedule (``AutoChainSchedule``) needs ``logging_steps=1``, and its state is saved beside the chain state
(``chainlora_schedule.json``) and restored with it.

On a bitsandbytes-quantized base (QLoRA) the callback attaches each quantized layer's residual when the Trainer
is built (before DDP wraps the model), ties the knots with ``quantized_merge`` / ``max_residual_rank``, logs each
knot's residual rank and errors, and the chain state it saves and restores holds the residuals.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from chainlora import distributed, quantized
from chainlora.chain import Init, KnotError, KnotRecord, check_optimizer_reset, tie_knot
from chainlora.errors import ConfigError
from chainlora.faults import maybe_crash
from chainlora.io import write_json_atomic
from chainlora.links import chain_length, lora_layers
from chainlora.schedules import KnotSchedule
from chainlora.seeding import derived_generator
from chainlora.state import CHAIN_STATE_FILE, load_chain_state, save_chain_state

logger = logging.getLogger("chainlora")

SCHEDULE_STATE_FILE = "chainlora_schedule.json"  # state of a stateful (adaptive) schedule, beside the chain


def knot_generator(seed: int, link: int) -> torch.Generator:
    """The RNG that initialises link ``link``: a pure function of (seed, link), so every process of a
    distributed run, and a resumed run, draw the very same A."""
    return derived_generator(seed, link)


class ChainOfLoRACallback(TrainerCallback):
    """Ties a COLA knot (:func:`chainlora.tie_knot`) after each scheduled optimizer step.

    ``seed`` (default: the Trainer's ``args.seed``) seeds each new link's A; ``precise`` and
    ``max_relative_delta`` are passed to ``tie_knot``, and so are ``quantized_merge`` and ``max_residual_rank``
    (QLoRA: LoRA layers over a bitsandbytes base), and ``optimizer_reset`` (1.0: the paper's full reset of the
    links' optimizer state; < 1 zeroes only that fraction, smallest magnitudes first; 0.0 keeps it). ``knots``
    lists the knots tied so far (restored on resume). Several processes (DDP, FSDP2): every process ties the same
    knot; a rank change, FSDP1 or DeepSpeed is refused in ``on_train_begin`` (see ``chainlora.distributed``), and
    so is an ``optimizer_reset`` below 1 with a rank change still to come.
    """

    def __init__(
        self,
        schedule: KnotSchedule,
        *,
        init: Init = "gaussian",
        seed: int | None = None,
        precise: bool | None = None,
        max_relative_delta: float | None = None,
        quantized_merge: str = "residual",
        max_residual_rank: int | None = None,
        optimizer_reset: float = 1.0,
    ) -> None:
        quantized.check_merge_options(quantized_merge, max_residual_rank)
        check_optimizer_reset(optimizer_reset)
        self.optimizer_reset = optimizer_reset
        self.schedule = schedule
        self.quantized_merge = quantized_merge
        self.max_residual_rank = max_residual_rank
        self.init = init
        self.seed = seed
        self.precise = precise
        self.max_relative_delta = max_relative_delta
        self.knots: list[KnotRecord] = []
        self.last_loss: float | None = None
        self._restored_from: str | None = None

    # -- resume: restore the chain before the Trainer loads the (possibly re-ranked) adapter ---------------
    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kw
    ):
        if model is not None:
            quantized.attach_residuals(model)  # QLoRA: the residuals exist before DDP wraps the model
        if model is None or not hasattr(model, "load_adapter") or getattr(model, "_chainlora_hooked", False):
            return
        original_load_adapter = model.load_adapter

        def load_adapter(model_id, *args, **kwargs):
            if (Path(str(model_id)) / CHAIN_STATE_FILE).is_file():
                self.restore(model, model_id)
            return original_load_adapter(model_id, *args, **kwargs)

        model.load_adapter = load_adapter
        model._chainlora_hooked = True

    def restore(self, model, checkpoint_dir: str | os.PathLike) -> None:
        """Restore the chain (base weights, links, ranks, knot records) saved in ``checkpoint_dir``."""
        self.knots = load_chain_state(model, checkpoint_dir)  # every process restores
        if self.schedule.adaptive:
            schedule_file = Path(checkpoint_dir) / SCHEDULE_STATE_FILE
            if not schedule_file.is_file():
                raise ConfigError(f"{schedule_file} not found: cannot resume the adaptive knot schedule")
            self.schedule.load_state_dict(json.loads(schedule_file.read_text()))
        self._restored_from = str(checkpoint_dir)
        logger.info("chainlora: restored a chain of %d link(s) from %s", chain_length(model), checkpoint_dir)

    def on_train_begin(self, args, state, control, model=None, **kw):
        if self.schedule.adaptive and not (args.logging_strategy == "steps" and args.logging_steps == 1):
            raise ConfigError(
                "adaptive knots decide from the training loss of every step: set logging_strategy='steps' and "
                f"logging_steps=1 (got {args.logging_strategy!s}, {args.logging_steps})"
            )
        total = self.schedule.total_steps
        if state.max_steps and total != state.max_steps:
            raise ConfigError(
                f"the chain schedule was built for {total} optimizer steps but the Trainer runs {state.max_steps}"
            )
        first_rank = self.schedule.rank_of_link(1)
        if first_rank is not None and model is not None:
            ranks = {layer.r[a] for _, layer, a in lora_layers(model)}
            if state.global_step == 0 and ranks != {first_rank}:
                raise ConfigError(
                    f"schedule's first link has rank {first_rank} but the LoRA layers have {ranks}"
                )
        if state.global_step > 0 and self._restored_from is None:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if (checkpoint / CHAIN_STATE_FILE).is_file():
                self.restore(model, checkpoint)
            elif self.schedule.adaptive or any(
                self.schedule.knot_due(s) for s in range(1, state.global_step + 1)
            ):
                raise ConfigError(
                    f"resuming at step {state.global_step} after a knot (or with an adaptive schedule), but "
                    f"{checkpoint} has no chain state"
                )
        # fail now, not at the first knot
        distributed.check_training_setup(model, self.schedule, args, quantized_merge=self.quantized_merge)
        if model is not None and self.optimizer_reset < 1.0:
            layers = list(lora_layers(model))
            current = {layer.r[adapter] for _, layer, adapter in layers}
            to_come = distributed.scheduled_ranks(self.schedule, first_link=chain_length(model) + 1)
            check_optimizer_reset(
                self.optimizer_reset,
                rank_changes=any({rank} != current for _, rank in to_come),
                sharded=any(distributed.is_sharded(layer.lora_A[a].weight) for _, layer, a in layers),
            )

    # -- the knot ---------------------------------------------------------------------------------------
    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.last_loss = float(logs["loss"])
            self.schedule.observe(state.global_step, self.last_loss)  # already averaged over processes

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        """Feed the dev metric (``metric_for_best_model``, default the dev loss) to the schedule."""
        if not metrics:
            return
        name = args.metric_for_best_model or "loss"
        key = name if name.startswith("eval_") else f"eval_{name}"
        if key in metrics:
            higher = args.greater_is_better if args.greater_is_better is not None else "loss" not in name
            self.schedule.observe_dev(state.global_step, float(metrics[key]), higher_is_better=higher)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        if not self.schedule.knot_due(state.global_step, self.last_loss):
            return
        link = chain_length(model)
        seed = args.seed if self.seed is None else self.seed
        try:
            record = tie_knot(
                model,
                optimizer,
                rank=self.schedule.rank_of_link(link + 1),
                init=self.init,
                generator=knot_generator(seed, link + 1),
                precise=self.precise,
                max_relative_delta=self.max_relative_delta,
                quantized_merge=self.quantized_merge,
                max_residual_rank=self.max_residual_rank,
                optimizer_reset=self.optimizer_reset,
            )
        except KnotError as err:  # the model is untouched; halt before this step is saved anywhere
            raise KnotError(f"knot {link} at step {state.global_step}: {err}; training halted") from None
        distributed.sync_replicas(model)  # DDP: every process must now hold the same chain
        record = dataclasses.replace(record, step=state.global_step)
        self.knots.append(record)
        maybe_crash("after_knot")
        entry = {
            "step": state.global_step,
            "knot": record.link,
            "next_rank": record.next_rank,
            "delta_norm": record.delta_norm,
        }
        if record.optimizer_state_zeroed is not None:
            entry["optimizer_state_zeroed"] = record.optimizer_state_zeroed
        if self.schedule.decisions:  # an adaptive schedule says why it tied this knot
            entry["reason"] = self.schedule.decisions[-1].reason
        if record.residual_rank is not None:  # QLoRA: the residual and what the knot lost, if anything
            entry["residual_rank"] = record.residual_rank
            errors = record.requantize_errors or record.compression_errors
            if errors:
                entry["max_knot_error"] = max(errors.values())
            logger.info(
                "chainlora: %s knot on the quantized layers: residual rank %d%s",
                record.quantized_merge,
                record.residual_rank,
                f", max relative error {max(errors.values()):.3g}" if errors else " (exact)",
            )
        state.log_history.append(entry)
        logger.info(
            "chainlora: knot %d at step %d (merged ‖ΔW‖=%.4g over %d layers), next link rank %d",
            record.link,
            state.global_step,
            record.delta_norm,
            record.layers,
            record.next_rank,
        )

    def on_save(self, args, state, control, model=None, **kw):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        # every process calls it (FSDP2 gathers the shards first); only the main one writes
        save_chain_state(model, checkpoint, self.knots, main=args.should_save)
        if args.should_save and self.schedule.adaptive:
            write_json_atomic(checkpoint / SCHEDULE_STATE_FILE, self.schedule.state_dict())
