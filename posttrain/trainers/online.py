"""The online loop GRPO and RLOO share: prompts -> rollout -> rewards -> advantages -> buffered micro-batches.

One *generation* serves several micro-steps. The dataloader hands out prompts; every
``steps_per_generation * num_iterations`` micro-steps the trainer samples ``num_generations``
completions for each prompt of the current generation batch (one prefill per prompt), scores them
with the reward functions, computes advantages over each prompt's group, shuffles the rows and cuts
them into ``steps_per_generation`` micro-batches of ``per_device_train_batch_size`` completions,
which the next micro-steps consume (``num_iterations`` passes over them).

``per_device_train_batch_size`` counts completions, as in TRL. The generation batch of one process
holds ``per_device_train_batch_size * steps_per_generation`` completions, whole groups only. Left
unset, ``steps_per_generation`` is ``gradient_accumulation_steps`` raised to the smallest multiple
that makes the generation batch a multiple of ``num_generations``: batch 1, accumulation 4 and
8 generations generate 8 completions of one prompt and spend them on two optimizer steps.

The rows of a generation travel as :class:`~posttrain.rollout.sequences.RolloutSequences` (sampled
tokens, loss mask, old/reference log-probs, advantages), the layout every online method shares;
the prompt order comes from :class:`~posttrain.data.prompts.RepeatedBlockSampler` and the
completions table from :mod:`posttrain.report.completions`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn
from torch.utils.data import Sampler

from posttrain.data.prompts import RepeatedBlockSampler, prepare_prompt_dataset
from posttrain.errors import ConfigError
from posttrain.models.packed_attention import use_packed_attention
from posttrain.report.completions import COMPLETION_ROW_KEYS, CompletionsLog, nan_to_none, prompt_text
from posttrain.rollout.sequences import RolloutSequences, completion_token_logps
from posttrain.trainers.base import (
    PosttrainTrainer,
    apply_peft,
    load_pretrained,
    resolve_args,
    resolve_processing_class,
    router_aux_loss_requested,
)
from posttrain.trainers.online_checkpoint import ResumableOnlineLoop
from posttrain.trainers.online_config import OnlineConfig, resolve_generation_schedule  # noqa: F401
from posttrain.trainers.online_engine import RolloutEngineMixin

PROMPT_COLUMNS = ("prompt", "prompt_input_ids", "prompt_attention_mask")


@dataclass
class ScoredRollout:
    """Completions of one generation batch with their rewards; rows prompt-major, ``group_size`` per prompt."""

    rows: RolloutSequences
    prompts: list[Any]
    completions: list[Any]
    rewards_per_function: torch.Tensor  # (N, F), NaN where a function returned None
    rewards: torch.Tensor  # (N,) weighted total
    reward_names: list[str]
    group_size: int
    extra_columns: dict[str, list[Any]] = field(default_factory=dict)  # reward functions' log_extra, one value per row
    logged_metrics: dict[str, list[float]] = field(default_factory=dict)  # reward functions' log_metric, one per call
    agent: Any = None  # the AgentSample (posttrain.trainers.agent) of a rollout with tools / environments / rollout_func


# ----------------------------------------------------------------------------- the trainer


class OnlineTrainer(RolloutEngineMixin, ResumableOnlineLoop, PosttrainTrainer):
    """The shared half of GRPO and RLOO: data, sampling, rewards, reference, buffering, logging.

    A subclass sets ``method_name`` and ``config_class`` and implements :meth:`compute_advantages`
    (rewards -> per-row advantages) and ``compute_loss`` (one buffered micro-batch -> scalar loss).

    Args:
        model: a model instance, or a local path / hub id loaded with ``AutoModelForCausalLM``.
        reward_funcs: one reward function or a list; each is a callable
            ``f(prompts, completions, **kwargs) -> list[float | None]`` (or ``async def``), the name of a
            built-in (``"accuracy"``, ``"format"``, ...), ``"module:function"``, ``"file.py:function"``, a
            reward model directory or hub id, or a sequence-classification model instance.
        args: the method's config (``None``: defaults, output in ``<model name>-<method>``).
        train_dataset / eval_dataset: datasets with a ``prompt`` column (text or messages); every other
            column reaches the reward functions as a keyword argument.
        processing_class: the tokenizer (``tokenizer=`` is accepted as its older name).
        reward_processing_classes: one entry per reward function: a reward model's tokenizer (None: the one
            saved with it); ignored for plain functions.
        peft_config: a ``peft`` config (e.g. ``LoraConfig``) to train an adapter instead of all weights.
        tools / environment_factory / rollout_func: multi-turn rollouts with tools, one environment per
            rollout, or a custom rollout function, as in TRL (see :mod:`posttrain.trainers.agent`).
    """

    config_class: ClassVar[type] = OnlineConfig
    completion_length_field: ClassVar[str | None] = "max_completion_length"
    supports_turn_credit: ClassVar[bool] = False  # credit_assignment="turn" (per-token advantages per turn)

    def __init__(
        self,
        model: str | nn.Module,
        reward_funcs: Any = None,
        args: OnlineConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks: list | None = None,
        optimizers=(None, None),
        peft_config=None,
        tokenizer=None,
        tools: list | None = None,
        rollout_func: Callable | None = None,
        environment_factory: Callable | None = None,
    ) -> None:
        from posttrain.data.collate import PromptCollator
        from posttrain.rollout import SamplingParams
        from posttrain.trainers.reference import ReferenceSyncCallback, disable_dropout, resolve_reference

        args = resolve_args(args, model, self.config_class, self.method_name)
        processing_class = resolve_processing_class(processing_class, tokenizer, model, type(self).__name__, args)
        self._tokenizer = getattr(processing_class, "tokenizer", processing_class)
        self._init_metrics()
        self.agent = None
        if tools or environment_factory is not None or rollout_func is not None:
            from posttrain.trainers.agent import AgentRollouts

            self.agent = AgentRollouts(tools, environment_factory, rollout_func, args, self._tokenizer, args.process_index)
            reward_funcs, reward_processing_classes, args = self.agent.with_environment_rewards(
                reward_funcs, reward_processing_classes, args)
        if args.credit_assignment != "trajectory" and not self.supports_turn_credit:
            raise ConfigError(f"{self.method_name} has no turn-level credit assignment", field="credit_assignment",
                              fix="use credit_assignment='trajectory', or GRPO for per-turn advantages")
        if args.credit_assignment != "trajectory" and self.agent is None:
            raise ConfigError("credit_assignment='turn' needs per-turn rewards from an environment",
                              field="credit_assignment", fix="pass environment_factory=..., or use 'trajectory'")
        self.reward_computer = build_reward_computer(reward_funcs, reward_processing_classes, args)
        model = apply_peft(load_pretrained(model, args), peft_config, args)
        router_aux_loss_requested(model, adds_router_loss=False)  # a config asking for it is told it is not added
        if args.disable_dropout:
            disable_dropout(model)
        # beta = 0: no reference model is built or loaded at all
        self.reference = (
            resolve_reference(model, None, args, adapter_is_new=peft_config is not None) if args.beta > 0 else None
        )
        self.sampling = SamplingParams(
            max_completion_length=args.max_completion_length, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
            stop_strings=args.stop_strings,
        )
        if train_dataset is not None:
            train_dataset = self._prepare_dataset(train_dataset, "train", args)
        if isinstance(eval_dataset, dict):
            eval_dataset = {name: self._prepare_dataset(ds, name, args) for name, ds in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = self._prepare_dataset(eval_dataset, "eval", args)

        super().__init__(
            model=model, args=args, data_collator=PromptCollator(self._tokenizer.pad_token_id),
            train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
            callbacks=callbacks, optimizers=optimizers,
        )
        self.loss_is_scaled_for_ga = True  # compute_loss normalises for accumulation itself
        # long padded rollouts are scored padding-free, each row alone (posttrain.models.packed_attention)
        use_packed_attention(self.model, self.reference.model if self.reference is not None else None)
        if self.reference is not None:
            self.reference.prepare(self.accelerator)
            if args.sync_ref_model:
                self.add_callback(ReferenceSyncCallback(self.reference, args.ref_model_mixup_alpha, args.ref_model_sync_steps))
        self._move_reward_models_to_device()
        self._check_dataset_holds_a_generation(train_dataset)
        self._micro_step = 0
        self._buffer: list[RolloutSequences] | None = None
        self._engine = None
        self._sampler_gap = None  # set with the engine (posttrain.trainers.sampler_gap)
        self._engine_synced_step = -1
        self._eval_batches = 0  # generation batches of the evaluation under way (keys its prompts)
        self._debug_generations = 0  # calls of generate_completions (keys their prompts)
        self._completions_log = CompletionsLog()
        if args.use_vllm:  # fail now, not at the first step, when vLLM or a GPU is missing
            self._rollout_engine()

    # ------------------------------------------------------------------ hooks for subclasses

    def compute_advantages(self, scored: ScoredRollout, rows: RolloutSequences) -> tuple[torch.Tensor, dict[str, float]]:
        """``(advantages (N,), metrics)`` for one generation batch; ``rows`` may hold ``old_logps``/``ref_logps``."""
        raise NotImplementedError

    def sampling_correction(self) -> dict[str, Any] | None:
        """``{"mode_name", "clip_min", "clip_max"}`` when the loss corrects for the sampler/trainer gap, else None."""
        return None

    def needs_generation_logps(self, mode: str) -> bool:
        """Whether the policy's log-probs at sampling time (``old_logps``) must be stored with the batch.

        They are needed when a batch outlives an optimizer step (``num_iterations > 1``, or one generation
        spanning several optimizer steps); otherwise the ratio is 1 and ``logps.detach()`` stands in.
        """
        args = self.args
        return mode == "train" and args.gradient_accumulation_steps % (args.steps_per_generation * args.num_iterations) != 0

    # ------------------------------------------------------------------ data

    def _prepare_dataset(self, dataset, split: str, args: OnlineConfig):
        return prepare_prompt_dataset(dataset, self._tokenizer, args.max_prompt_length, args.dataset_num_proc, split,
                                      prompt_column_only=True, template_kwargs=args.chat_template_kwargs)

    def prepare_eval_dataset(self, dataset, name: str):
        return self._prepare_dataset(dataset, "eval", self.args)

    def _set_signature_columns_if_needed(self) -> None:
        # with remove_unused_columns=True, keep what the prompt collator reads
        if self._signature_columns is None:
            self._signature_columns = list(PROMPT_COLUMNS)

    @property
    def _prompts_per_generation(self) -> int:
        """Prompts one process samples completions for in one generation."""
        return self.args.per_device_train_batch_size * self.args.steps_per_generation // self.args.num_generations

    def _check_dataset_holds_a_generation(self, dataset) -> None:
        if dataset is None:
            return
        needed = self._prompts_per_generation * self.args.world_size
        if len(dataset) < needed:
            raise ConfigError(
                f"the train dataset has {len(dataset)} prompts, fewer than one generation batch needs ({needed})",
                field="per_device_train_batch_size",
                fix="add prompts, or lower per_device_train_batch_size / steps_per_generation",
            )

    def get_train_dataloader(self):
        if self.train_dataset is None:
            raise ConfigError("training needs a train_dataset", field="train_dataset", fix="pass train_dataset=...")
        return self._get_dataloader(
            dataset=self.train_dataset, description="Training", batch_size=self._prompts_per_generation,
            sampler_fn=self._get_train_sampler, is_training=True,
        )

    def _get_train_sampler(self, train_dataset=None) -> Sampler:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return RepeatedBlockSampler(
            len(dataset), self._prompts_per_generation * self.args.world_size,
            self.args.steps_per_generation * self.args.num_iterations,
            shuffle=self.args.shuffle_dataset, seed=self.args.seed,
        )

    def get_eval_dataloader(self, eval_dataset=None):
        if isinstance(eval_dataset, str):
            eval_dataset = self.eval_dataset[eval_dataset]
        eval_dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if eval_dataset is None:
            raise ConfigError("evaluation needs an eval_dataset", field="eval_dataset", fix="pass eval_dataset=...")
        generations = self.args.num_generations_eval or self.args.num_generations
        prompts = max(1, self.args.per_device_eval_batch_size // generations)
        return self._get_dataloader(
            dataset=eval_dataset, description="Evaluation", batch_size=prompts, sampler_fn=self._get_eval_sampler,
        )

    def evaluate(self, *args, **kwargs):
        self._eval_batches = 0
        return super().evaluate(*args, **kwargs)

    @property
    def _generation_round(self) -> int:
        """How many training generations came before the current one (the same on every process)."""
        return self._micro_step // (self.args.steps_per_generation * self.args.num_iterations)

    def _prepare_inputs(self, batch: dict[str, Any]) -> RolloutSequences:
        if not self.model.training:
            rows = self._generate_and_score(batch, mode="eval").rows
            self._eval_batches += 1
            rows.num_items_in_batch = rows.loss_mask.sum().float()
            return self._pad_to_multiple(rows.trim_padding())
        args = self.args
        if self._buffer is None:  # first step (a resumed run restores its buffer and micro-step with the checkpoint)
            self._micro_step = self.state.global_step * args.gradient_accumulation_steps
        if self._buffer is None or self._micro_step % (args.steps_per_generation * args.num_iterations) == 0:
            self._buffer = self._micro_batches(self._generate_and_score(batch, mode="train").rows)
        rows = self._buffer[self._micro_step % args.steps_per_generation]
        self._count_trained_tokens(rows)
        return self._pad_to_multiple(rows)

    def _pad_to_multiple(self, rows: RolloutSequences) -> RolloutSequences:
        """``pad_to_multiple_of``: widen the prompt and completion columns (masked out, so losses are unchanged)."""
        from posttrain.data.collate import pad_rollout_to_multiple

        if not self.args.pad_to_multiple_of:
            return rows
        return RolloutSequences.from_dict(
            pad_rollout_to_multiple(rows.as_dict(), self.args.pad_to_multiple_of, self._tokenizer.pad_token_id))

    def _track_num_input_tokens(self, inputs) -> None:
        """The Trainer counts the prompt batch it hands over; the tokens trained on are counted per micro-batch instead."""

    def _count_trained_tokens(self, rows: RolloutSequences) -> None:
        """``include_num_input_tokens_seen``: the prompt + completion tokens of each micro-batch trained on
        (``"non_padding"``: real tokens only; ``"all"``: the padded widths), over every process."""
        mode = self.args.include_num_input_tokens_seen
        if mode in ("no", False, None):
            return
        if mode == "non_padding":
            tokens = rows.prompt_mask.sum() + rows.completion_mask.sum()
        else:
            tokens = torch.tensor(rows.prompt_ids.numel() + rows.completion_ids.numel())
        tokens = torch.as_tensor(tokens, device=self.accelerator.device, dtype=torch.int64).reshape(1)
        self.state.num_input_tokens_seen += int(self.accelerator.gather(tokens).sum().item())

    def _micro_batches(self, rows: RolloutSequences) -> list[RolloutSequences]:
        """Cut a generation into micro-batches, each carrying the loss-token count of its accumulation window."""
        from posttrain.rollout.sampling import sampling_key

        steps, accumulation = self.args.steps_per_generation, self.args.gradient_accumulation_steps
        # a generator per round, not one carried along: nothing to save for an exact resume
        shuffle = torch.Generator().manual_seed(sampling_key(self.args.seed, "shuffle", self._generation_round))
        parts = rows.split(steps, shuffle)
        counts = torch.stack([part.loss_mask.sum() for part in parts]).float()
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        if steps % accumulation == 0:
            windows = counts.view(-1, accumulation).sum(dim=1).repeat_interleave(accumulation)
        else:  # a window spans several generations: use the average tokens per window
            windows = (counts.sum() * accumulation / steps).expand(steps)
        for part, count in zip(parts, windows):
            part.num_items_in_batch = count
        return parts

    def _generate_and_score(
        self, batch: dict[str, Any], mode: str, *, num_generations: int | None = None, record: bool = True
    ) -> ScoredRollout:
        """Sample, score, add old/reference log-probs and advantages to the rows of one generation batch."""
        if num_generations is None:
            num_generations = self.args.num_generations
            if mode != "train":
                num_generations = self.args.num_generations_eval or num_generations
        self._prepare_engine_for(mode)
        scored = self.sample_and_score(batch, num_generations, prompt_keys=self._prompt_keys(mode, len(batch["prompt"])))
        rows = scored.rows
        if mode != "train":
            rows.sampler_logps = None
        if self.args.mask_truncated_completions:
            rows.loss_mask[rows.is_truncated] = 0
        with torch.no_grad():
            if self.needs_generation_logps(mode) or rows.sampler_logps is not None:
                rows.old_logps = self._batched_logps(self.model, rows)
            if self.reference is not None:
                rows.ref_logps = self._batched_logps(self.model, rows, logps_fn=self._reference_logps)
        gap_metrics = self._inspect_sampler_gap(rows)
        rows.advantages, metrics = self.compute_advantages(scored, rows)
        metrics.update(gap_metrics)
        if not self.needs_generation_logps(mode):
            rows.old_logps = None  # only the gap needed them: on-policy, the loss uses the current log-probs
        if record:
            self._record_generation(scored, metrics, mode)
            if scored.agent is not None and self.agent.recorder is not None:
                from posttrain.trainers.agent import episode_extras

                self.agent.recorder.write(episode_extras(scored, mode, self.state.global_step, self._generation_round))
        return scored

    def _prompt_keys(self, mode: str, num_prompts: int) -> torch.Tensor:
        """``(num_prompts,)`` sampling keys of this process's prompts, from the seed, the round and each
        prompt's position in the global batch: the same prompt draws the same completions on 1 or N processes.

        Training: round = generation index, and process ``p`` holds positions ``p*k .. p*k + k - 1`` of the
        global generation batch (the sampler deals each process its block share in order). Evaluation: the
        global step, and the position in the evaluation stream (batch ``b`` of process ``p`` is global batch
        ``b * processes + p``). :meth:`generate_completions` keys by its call count.
        """
        from posttrain.rollout.sampling import sampling_keys

        seed, process, processes = self.args.seed, self.accelerator.process_index, self.accelerator.num_processes
        if mode == "train":
            start = process * self._prompts_per_generation
            return sampling_keys(seed, "train", self._generation_round, positions=range(start, start + num_prompts))
        if mode == "eval":
            generations = self.args.num_generations_eval or self.args.num_generations
            per_batch = max(1, self.args.per_device_eval_batch_size // generations)
            start = (self._eval_batches * processes + process) * per_batch
            return sampling_keys(seed, "eval", self.state.global_step, positions=range(start, start + num_prompts))
        return sampling_keys(seed, mode, self._debug_generations, positions=range(num_prompts))

    def sample_and_score(
        self, batch: dict[str, Any], num_generations: int, prompt_keys: torch.Tensor | None = None
    ) -> ScoredRollout:
        """Sample ``num_generations`` completions per prompt of a collated batch and run the reward functions.

        ``prompt_keys`` (one sampling key per prompt; default: keyed as in evaluation) fix the draws.
        """
        device = self.accelerator.device
        if prompt_keys is None:
            prompt_keys = self._prompt_keys("eval", len(batch["prompt"]))
        if self.agent is not None:  # tools, environments or rollout_func: posttrain.trainers.agent
            from posttrain.trainers.agent import sample_and_reward

            sample, output = sample_and_reward(self, batch, num_generations, prompt_keys, PROMPT_COLUMNS)
            return ScoredRollout(
                rows=sample.rows, prompts=sample.prompts, completions=sample.completions,
                rewards_per_function=output.per_function.to(device).float(),
                rewards=torch.where(output.all_none, float("nan"), output.total).to(device).float(),
                reward_names=list(output.names), group_size=num_generations,
                extra_columns=output.extra_columns, logged_metrics=output.logged_metrics, agent=sample,
            )
        with self.sampling_precision():
            rollout = self._rollout_engine().generate(
                batch["prompt_input_ids"].to(device), prompt_mask=batch["prompt_attention_mask"].to(device),
                num_generations=num_generations, sampling=self.sampling, prompt_keys=prompt_keys,
            )
        texts = rollout.decode_completions(self._tokenizer)
        prompts = [prompt for prompt in batch["prompt"] for _ in range(num_generations)]
        completions = [[{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
                       for prompt, text in zip(prompts, texts)]
        columns = {name: [value for value in values for _ in range(num_generations)]
                   for name, values in batch.items() if name not in PROMPT_COLUMNS}
        output = self.reward_computer(
            prompts, completions, rollout.completion_token_lists(), columns, trainer_state=self.state
        )
        return ScoredRollout(
            rows=RolloutSequences.from_batch(rollout), prompts=prompts, completions=completions,
            # a row no function scored is NaN: left out of its group's statistics, advantage 0
            rewards_per_function=output.per_function.to(device).float(),
            rewards=torch.where(output.all_none, float("nan"), output.total).to(device).float(),
            reward_names=list(output.names), group_size=num_generations,
            extra_columns=output.extra_columns, logged_metrics=output.logged_metrics,
        )

    def _reference_logps(self, model, *args, **kwargs):
        return self.reference.token_logps(model, *args, **kwargs)

    def _batched_logps(self, model: nn.Module, rows: RolloutSequences, logps_fn: Callable | None = None) -> torch.Tensor:
        """``(N, C)`` completion log-probs without gradient, in slices of ``per_device_train_batch_size`` rows."""
        width = rows.completion_ids.shape[1]
        step = max(1, self.args.per_device_train_batch_size)
        pieces = []
        for start in range(0, rows.num_rows, step):
            part = rows.slice(start, start + step).trim_padding()
            logps, _ = completion_token_logps(
                model, part, temperature=self.args.temperature, chunk_size=self.args.logits_chunk_size, logps_fn=logps_fn,
                share_prompt=self.args.share_prompt_forward,
            )
            pieces.append(nn.functional.pad(logps, (0, width - logps.shape[1])))
        return torch.cat(pieces).detach()

    def policy_logps(self, model: nn.Module, inputs: RolloutSequences, entropy_grad: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logps, entropy)``, each ``(B, C)``, of a micro-batch's completions under the policy (with gradient;
        for the entropy too with ``entropy_grad``)."""
        return completion_token_logps(
            model, inputs, temperature=self.args.temperature, chunk_size=self.args.logits_chunk_size, with_entropy=True,
            share_prompt=self.args.share_prompt_forward, entropy_grad=entropy_grad,
        )

    def loss_normaliser_for_accumulation(self) -> float:
        """Divide a per-micro-batch mean by this so that accumulation averages (1 in evaluation)."""
        return float(self.current_gradient_accumulation_steps) if self.model.training else 1.0

    # ------------------------------------------------------------------ metrics and the completions table

    def masked_mean(self, values: torch.Tensor, mask: torch.Tensor) -> float:
        """Mean of ``values`` over ``mask`` across every process (0 when the mask is empty)."""
        mask = mask.to(values.dtype)
        totals = torch.stack([(values.detach() * mask).sum(), mask.sum()])
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        return float(totals[0] / totals[1].clamp(min=1.0))

    def _gathered(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(tensor) if self.accelerator.num_processes > 1 else tensor

    def _record_generation(self, scored: ScoredRollout, extra: dict[str, float], mode: str) -> None:
        rows = scored.rows
        per_function = self._gathered(scored.rewards_per_function)
        rewards = self._gathered(scored.rewards)
        # with tools, TRL counts the tokens the policy sampled, not the tool results between them
        sampled = rows.completion_mask.sum(dim=1) if scored.agent is None else scored.agent.sampled_lengths
        lengths = self._gathered(sampled.to(rows.completion_mask.device)).float()
        truncated = self._gathered(rows.is_truncated.long()).bool()
        metrics: dict[str, float] = {}
        for index, name in enumerate(scored.reward_names):
            metrics[f"rewards/{name}/mean"] = _nan_mean(per_function[:, index])
            metrics[f"rewards/{name}/std"] = _nan_std(per_function[:, index])
        metrics["reward"] = _nan_mean(rewards)
        metrics["reward_std"] = _nan_std(rewards)
        metrics["completions/mean_length"] = lengths.mean().item()
        metrics["completions/min_length"] = lengths.min().item()
        metrics["completions/max_length"] = lengths.max().item()
        metrics["completions/clipped_ratio"] = truncated.float().mean().item()
        if (~truncated).any():
            metrics["completions/mean_terminated_length"] = lengths[~truncated].mean().item()
        self.record_metrics({**metrics, **extra, **self.mean_logged_metrics(scored.logged_metrics)})
        if mode == "train":
            tokens = self._gathered((rows.prompt_mask.sum() + rows.completion_mask.sum()).reshape(1)).sum()
            self._cumulative["num_tokens"] += float(tokens.item())
            if self.args.log_completions:
                self._completions_log.replace(self.completion_rows(scored))

    @staticmethod
    def completion_rows(scored: ScoredRollout) -> list[dict[str, Any]]:
        """One dict per completion: prompt and completion text, each reward, the total and the advantage, and
        the columns reward functions added with ``log_extra`` (a name the table uses gets ``_extra`` appended)."""
        texts = [completion_text(c) for c in scored.completions]
        per_function = scored.rewards_per_function.tolist()
        totals, advantage_values = scored.rewards.tolist(), scored.rows.advantages.tolist()
        extra = {(name + "_extra" if name in COMPLETION_ROW_KEYS else name): values
                 for name, values in scored.extra_columns.items()}
        return [
            {
                "prompt": prompt_text(prompt), "completion": text,
                "rewards": {name: nan_to_none(value) for name, value in zip(scored.reward_names, row_rewards)},
                **{name: values[row] for name, values in extra.items()},
                "reward": nan_to_none(total), "advantage": advantage,
            }
            for row, (prompt, text, row_rewards, total, advantage)
            in enumerate(zip(scored.prompts, texts, per_function, totals, advantage_values))
        ]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        training = not any(key.startswith("eval_") for key in logs)
        super().log(logs, start_time)
        if training and self.args.log_completions and self.accelerator.is_main_process:
            self._completions_log.flush(
                self.args.output_dir, self.state.global_step, self.args.num_completions_to_print, self.args.report_to,
                unique_prompts=self.args.log_unique_prompts,
            )

    # ------------------------------------------------------------------ debugging reward functions

    def generate_completions(self, rows: Any, num_generations: int | None = None) -> list[dict[str, Any]]:
        """Sample completions for ``rows`` and score them, without training: for debugging reward functions.

        ``rows`` is a ``Dataset``, a dict of columns (``dataset[:2]``), one row (``dataset[0]``) or a list
        of row dicts. Returns one dict per completion with ``prompt``, ``completion``, ``rewards`` (per
        function, ``None`` where a function returned None), ``reward`` (weighted total) and ``advantage``;
        ``num_generations`` per prompt (default: the config's).
        """
        dataset = self._prepare_dataset(_rows_as_dataset(rows), "rows", self.args)
        batch = self.data_collator([dataset[i] for i in range(len(dataset))])
        generations = num_generations or self.args.num_generations
        scored = self._generate_and_score(batch, mode="debug", num_generations=generations, record=False)
        self._debug_generations += 1
        return self.completion_rows(scored)

    # ------------------------------------------------------------------ what TRL's callbacks read

    @property
    def reward_funcs(self) -> list[Any]:
        """The reward functions as TRL holds them: each reward model as its ``nn.Module``, other functions as given."""
        from posttrain.rewards import trl_reward_views

        return trl_reward_views(self.reward_computer.reward_funcs)[0]

    @property
    def reward_processing_classes(self) -> list[Any]:
        """One entry per reward function: a reward model's tokenizer, None for other functions (as TRL)."""
        from posttrain.rewards import trl_reward_views

        return trl_reward_views(self.reward_computer.reward_funcs)[1]

    @property
    def ref_model(self) -> nn.Module | None:
        """The separate frozen reference network, or None: ``beta == 0``, or the reference is the policy with its
        adapters disabled (PEFT), as in TRL."""
        return self.reference.model if self.reference is not None else None

    def _move_reward_models_to_device(self) -> None:
        for function in self.reward_computer.reward_funcs:
            network = getattr(function, "model", None)
            if isinstance(network, nn.Module):
                network.to(self.accelerator.device)


def _rows_as_dataset(rows: Any):
    from datasets import Dataset

    if isinstance(rows, Dataset):
        return rows
    if isinstance(rows, dict):
        prompt = rows.get("prompt")
        single = isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], dict))
        return Dataset.from_list([rows]) if single else Dataset.from_dict(rows)
    if isinstance(rows, list):
        return Dataset.from_list(rows)
    raise ConfigError(f"cannot read rows of type {type(rows).__name__}", field="rows",
                      fix="pass a Dataset, dataset[:n], dataset[i] or a list of dicts with a 'prompt' key")


def completion_text(completion: Any) -> str:
    """A completion as the table shows it: the text, or the assistant's content; a multi-turn episode's messages
    (assistant turns and tool results) one after the other, each after its role."""
    if not isinstance(completion, list):
        return completion
    if len(completion) == 1:
        return completion[0]["content"]
    return "\n".join(f"[{message['role']}] {message.get('content') or ''}" for message in completion)


def _nan_mean(values: torch.Tensor) -> float:
    valid = values[~torch.isnan(values)]
    return valid.mean().item() if valid.numel() else float("nan")


def _nan_std(values: torch.Tensor) -> float:
    valid = values[~torch.isnan(values)]
    return valid.std().item() if valid.numel() > 1 else 0.0


def build_reward_computer(reward_funcs: Any, reward_processing_classes: Any, args: OnlineConfig):
    """A :class:`posttrain.rewards.RewardComputer` from what the user passed (functions, names, models, hub ids),
    with TRL's ``reward_processing_classes`` (see :func:`posttrain.rewards.resolve_reward_funcs`)."""
    from posttrain.rewards import RewardComputer, resolve_reward_funcs

    return RewardComputer(resolve_reward_funcs(reward_funcs, reward_processing_classes), reward_weights=args.reward_weights)
