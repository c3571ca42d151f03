"""Proximal policy optimisation with a learned value function: ``PPOConfig`` and ``PPOTrainer``.

The InstructGPT recipe (Ouyang et al., arXiv:2203.02155), with the implementation details of
Huang et al., "The N+ Implementation Details of RLHF with PPO" (arXiv:2403.17031):

1. sample one completion per prompt from the policy (``per_device_train_batch_size`` prompts);
2. score prompt + completion with the reward model; subtract ``missing_eos_penalty`` from
   completions that never ended;
3. per-token rewards: ``-kl_coef * KL(policy || reference)`` at every token, plus the score at the
   last one (:func:`posttrain.losses.advantages.token_level_kl_rewards`);
4. advantages and returns by GAE (gamma, lam) against the value model's estimates, advantages
   whitened over the batch;
5. ``num_ppo_epochs`` passes over the batch, in ``num_mini_batches`` shuffled mini-batches (each
   split into ``gradient_accumulation_steps`` micro-batches), minimising the clipped policy loss
   plus ``vf_coef`` times the clipped value loss; one optimizer step per mini-batch.

The value model is a backbone with a scalar head, initialised from the reward model and trained
alongside the policy. The policy starts from the SFT model; the reference is a frozen copy of it,
or the base model with the adapter switched off when training a PEFT adapter (the value model
then trains an adapter and its head too).

``trainer.train()`` runs this loop (its own, since one batch of rollouts feeds several optimizer
steps); ``trainer.save_model()`` writes the policy as a plain causal-LM directory. Checkpoints also
hold the value model and the sampling state (:mod:`posttrain.trainers.ppo_checkpoint`), so
``trainer.train(resume_from_checkpoint=True)`` continues a run as if it had never stopped.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from contextlib import nullcontext
from typing import Any, Callable, ClassVar

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, TrainerState

from posttrain.data.prompts import prepare_prompt_dataset
from posttrain.errors import ConfigError
from posttrain.models.lm_head import unwrap_model
from posttrain.models.packed_attention import use_packed_attention
from posttrain.models.reward_scoring import append_after_eos, require_reward_model, sequence_scores
from posttrain.models.value_head import PolicyAndValueModel
from posttrain.models.wrappers import unwrap_model_keep_peft
from posttrain.rollout.sequences import RolloutSequences, completion_token_logps
from posttrain.trainers.base import PosttrainTrainer, apply_peft, load_pretrained, resolve_processing_class
from posttrain.trainers.ppo_checkpoint import (
    TRAINER_STATE_FILE,
    VALUE_MODEL_DIR,
    check_checkpoint,
    find_checkpoint,
    load_ppo_state,
    load_weights,
    save_ppo_state,
    save_value_model,
)
from posttrain.trainers.ppo_config import PPOConfig, older_name, resolve_ppo_args
from posttrain.trainers.reference import disable_dropout, freeze, reference_description, resolve_reference

logger = logging.getLogger("posttrain")

__all__ = ["PPOConfig", "PPOTrainer"]


class PPOTrainer(PosttrainTrainer):
    """PPO for language models, with a reward model and a value model.

    Args:
        args: a :class:`PPOConfig` (``config=`` is accepted as its older name).
        processing_class: the tokenizer (``tokenizer=`` accepted); default: the policy's own.
        model: the policy to train (a model or a path; default ``args.sft_model_path``).
        ref_model: the frozen reference (default: a frozen copy of the initial policy, or the
            base model with the adapter off under PEFT).
        reward_model: a sequence classifier with one label, or its path (default
            ``args.reward_model_path``). It must share the policy's tokenizer: it scores token ids.
        train_dataset: prompts (a ``prompt`` column, plain text or messages; any dataset with a
            prompt column, conversations ending with an assistant turn, or pre-tokenized
            ``input_ids``).
        value_model: a sequence classifier or value-head LM, or its path (default: a copy of the
            reward model, as in InstructGPT).
        eval_dataset: prompts on which ``evaluate()`` reports the reward of greedy completions.
        peft_config: train LoRA adapters on policy and value model instead of all weights.

    Older positional order ``PPOTrainer(args, processing_class, model, ref_model, reward_model,
    train_dataset, value_model)`` works too.
    """

    method_name: ClassVar[str] = "PPO"
    config_class: ClassVar[type] = PPOConfig
    completion_length_field: ClassVar[str | None] = "response_length"

    def __init__(
        self,
        args: PPOConfig | None = None,
        processing_class=None,
        model: str | nn.Module | None = None,
        ref_model: str | nn.Module | None = None,
        reward_model: str | nn.Module | None = None,
        train_dataset=None,
        value_model: str | nn.Module | None = None,
        data_collator: Callable | None = None,
        eval_dataset=None,
        optimizers=(None, None),
        callbacks: list | None = None,
        peft_config=None,
        tokenizer=None,
        config: PPOConfig | None = None,
        policy: str | nn.Module | None = None,
        ref_policy: nn.Module | None = None,
    ) -> None:
        if isinstance(args, (nn.Module, str)) and model is None:  # PPOTrainer(model) written model-first
            args, model = None, args
        args = resolve_ppo_args(args, config, model if model is not None else policy)
        model = older_name(model, policy, "policy", "model")
        ref_model = older_name(ref_model, ref_policy, "ref_policy", "ref_model")
        model = model if model is not None else args.sft_model_path
        if model is None:
            raise ConfigError("no policy model given", field="sft_model_path",
                              fix="pass model=... (or --model_name_or_path / --sft_model_path DIR)")
        processing_class = resolve_processing_class(processing_class, tokenizer, model, type(self).__name__, args)
        self._tokenizer = getattr(processing_class, "tokenizer", processing_class)
        self._init_metrics()

        policy_model = apply_peft(load_pretrained(model, args), peft_config, args)
        self.reference = resolve_reference(policy_model, ref_model, args, adapter_is_new=peft_config is not None)
        logger.info(reference_description(self.reference, ref_model))
        reward_model = reward_model if reward_model is not None else args.reward_model_path
        if reward_model is None:
            raise ConfigError("PPO needs a reward model", field="reward_model_path",
                              fix="pass reward_model=... or --reward_model_path DIR (train one with `posttrain reward`)")
        require_reward_model(reward_model, "reward_model_path")
        self.reward_model = freeze(self._load_scalar_model(reward_model, args))
        value_model = self._value_model(value_model, reward_model, args, peft_config)
        _check_same_vocabulary(policy_model, self.reward_model, self._tokenizer)
        if args.disable_dropout:
            disable_dropout(policy_model)
            disable_dropout(value_model)
        self.policy, self.value_model = policy_model, value_model

        if train_dataset is None:
            raise ConfigError("PPOTrainer needs a train_dataset of prompts", field="train_dataset",
                              fix="pass a dataset with a 'prompt' column")
        train_dataset = prepare_prompt_dataset(train_dataset, self._tokenizer, args.max_prompt_length,
                                               args.dataset_num_proc, "train")
        self._turn_suffix_ids, self._eos_ids = self._scoring_suffix(train_dataset)
        if eval_dataset is not None:
            eval_dataset = prepare_prompt_dataset(eval_dataset, self._tokenizer, args.max_prompt_length,
                                                  args.dataset_num_proc, "eval")
        if data_collator is None:
            from posttrain.data.collate import PromptCollator

            data_collator = PromptCollator(self._tokenizer.pad_token_id)

        super().__init__(
            model=PolicyAndValueModel(policy_model, value_model),
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self.reward_model.to(self.accelerator.device)
        # rollouts 2,048 columns wide or more are scored padding-free, each row alone, by all four models
        use_packed_attention(self.policy, self.reference.model, self.value_model, self.reward_model)
        self.reference.prepare(self.accelerator)
        # shuffles mini-batches; completions are drawn from keys of (seed, update, prompt position) instead
        self._sample_generator = torch.Generator(device=self.accelerator.device)
        self._sample_generator.manual_seed(args.seed + self.accelerator.process_index)

    # -- construction helpers

    @staticmethod
    def _load_scalar_model(model: str | nn.Module, args: PPOConfig) -> nn.Module:
        if not isinstance(model, str):
            return model
        loaded = load_pretrained(model, args, auto_class=AutoModelForSequenceClassification,
                                 extra_kwargs={"num_labels": 1})
        if loaded.config.pad_token_id is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(model)
            loaded.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return loaded

    def _value_model(self, value_model, reward_model, args: PPOConfig, peft_config) -> nn.Module:
        source = value_model if value_model is not None else args.value_model_path
        if source is None:
            # InstructGPT: the value function starts as the reward model (backbone and scalar head)
            source = reward_model if isinstance(reward_model, str) else copy.deepcopy(self.reward_model)
        value = self._load_scalar_model(source, args)
        if value is self.reward_model:
            value = copy.deepcopy(value)
        value.requires_grad_(True)
        value.train()
        if peft_config is not None:
            import dataclasses

            # the head must train fully: as a classifier task PEFT keeps `score` trainable and saved
            value_peft = dataclasses.replace(peft_config, task_type="SEQ_CLS", base_model_name_or_path=None)
            value = apply_peft(value, value_peft, args)
        return value

    # -- the training loop

    def _num_updates(self) -> tuple[int, int]:
        """(updates, episodes): how many rollout batches the run samples, and their total rows."""
        args = self.args
        rows_per_update = args.per_device_train_batch_size * args.world_size
        if args.max_steps and args.max_steps > 0:
            return args.max_steps, args.max_steps * rows_per_update
        episodes = args.total_episodes
        if episodes is None:
            episodes = int(args.num_train_epochs * len(self.train_dataset))
        updates = max(1, math.ceil(episodes / rows_per_update))
        return updates, episodes

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Run PPO: sample, score, estimate advantages, optimise; ``num_updates`` times.

        ``resume_from_checkpoint``: ``True`` for the latest ``checkpoint-N`` in ``output_dir``, or a
        checkpoint directory. The run then continues after the checkpoint's update as if it had never
        stopped: same weights, optimizer, schedule, RNG and sampling state, and the next prompt batch.
        """
        args, accelerator = self.args, self.accelerator
        checkpoint = find_checkpoint(resume_from_checkpoint, args.output_dir) if resume_from_checkpoint else None
        if checkpoint is not None:
            check_checkpoint(checkpoint, args, self.policy, self.value_model)
        num_updates, total_episodes = self._num_updates()
        dataloader = self.get_train_dataloader()
        self.create_optimizer_and_scheduler(num_training_steps=num_updates)
        self.model_wrapped = accelerator.prepare(self.model)
        self.optimizer = accelerator.prepare(self.optimizer)
        if args.gradient_checkpointing:
            self._enable_gradient_checkpointing()

        from transformers.trainer_callback import ExportableState

        stateful = [cb for cb in self.callback_handler.callbacks + [self.control] if isinstance(cb, ExportableState)]
        self.state = TrainerState(stateful_callbacks=stateful)
        if checkpoint is not None:
            self._restore_models_and_state(checkpoint)
        self.state.is_local_process_zero = self.is_local_process_zero()
        self.state.is_world_process_zero = self.is_world_process_zero()
        self.state.max_steps = num_updates
        self.state.num_train_epochs = args.num_train_epochs
        self.state.compute_steps(args, num_updates)
        self.state.train_batch_size = args.per_device_train_batch_size
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        samples_every = max(1, num_updates // args.num_sample_generations) if args.num_sample_generations else 0

        batches = _cycle(dataloader)
        if checkpoint is not None:
            self._restore_sampling(checkpoint, batches)
        start, episode = time.time(), int(self._cumulative.get("episode", 0)) if checkpoint is not None else 0
        first_episode = episode
        for update in range(self.state.global_step + 1, num_updates + 1):
            self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
            batch = next(batches)
            rollout = self._rollout(batch)
            self._optimise(rollout)
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
            episode += rollout.num_rows * args.world_size
            self.state.global_step = update
            self.state.epoch = episode / max(1, len(self.train_dataset))
            self._cumulative["episode"] = float(episode)
            self.record_metrics({"eps": (episode - first_episode) / max(time.time() - start, 1e-9)})
            if samples_every and update % samples_every == 0:
                self._write_samples(rollout, batch.get("prompt"), update)
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)
            if self.control.should_log or update == num_updates:
                self.log({"lr": self._get_learning_rate()})
            if self.control.should_evaluate and self.eval_dataset is not None:
                self.evaluate()
            if self.control.should_save:
                self._save_checkpoint(self.model, trial=None)
                self.control = self.callback_handler.on_save(args, self.state, self.control)
            if self.control.should_training_stop:
                break
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        from transformers.trainer_utils import TrainOutput

        return TrainOutput(self.state.global_step, float("nan"), {"episode": episode, "train_runtime": time.time() - start})

    def _restore_models_and_state(self, checkpoint: str) -> None:
        """Load policy, value model, optimizer, scheduler and ``trainer_state.json`` from ``checkpoint``."""
        from transformers.trainer_utils import compare_trainer_and_checkpoint_args

        load_weights(self.policy, checkpoint, "policy")
        load_weights(self.value_model, os.path.join(checkpoint, VALUE_MODEL_DIR), "value model")
        self._load_optimizer_and_scheduler(checkpoint)
        self._load_scaler(checkpoint)
        self.state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_FILE))
        compare_trainer_and_checkpoint_args(self.args, self.state)
        self._load_callback_state()
        logger.info(f"resuming PPO from {checkpoint} after update {self.state.global_step}")

    def _restore_sampling(self, checkpoint: str, batches) -> None:
        """Move past the prompt batches the saved run consumed, then restore its RNGs and running totals."""
        if not self.args.ignore_data_skip:
            # the loader replays the first run's order (its sampler is reseeded from the seed and the epoch
            # number), so drawing global_step batches lands on the one the first run would use next
            for _ in range(self.state.global_step):
                next(batches)
        # only now: starting a loader iterator during the replay draws from the global RNG, and the
        # resumed run must find the RNGs as the saved run left them
        self._load_rng_state(checkpoint)
        saved = load_ppo_state(checkpoint, self.args)
        self._sample_generator.set_state(saved["sample_generator"])
        self._cumulative.update(saved["cumulative"])
        for name, values in saved["pending_metrics"].items():
            self._metrics["train"][name].extend(values)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint (policy, optimizer, scheduler, RNG, trainer state), value model and PPO state."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        checkpoint = os.path.join(self._get_output_dir(trial=trial), name)
        save_value_model(self.value_model, checkpoint, self.args)
        if not self.args.save_only_model:
            save_ppo_state(checkpoint, self.args, self._sample_generator, self._cumulative, self._metrics["train"])
        super()._save_checkpoint(model, trial)

    def _enable_gradient_checkpointing(self) -> None:
        kwargs = self.args.gradient_checkpointing_kwargs or {"use_reentrant": False}
        for network in (self.policy, self.value_model):
            base = unwrap_model(network)
            if hasattr(base, "gradient_checkpointing_enable"):
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            if hasattr(base, "enable_input_require_grads"):
                base.enable_input_require_grads()

    @torch.no_grad()
    def _rollout(self, batch: dict[str, Any]) -> RolloutSequences:
        """Sample completions for a batch of prompts and compute everything PPO needs from them: the rows
        with their log-probs (``old_logps``), reference log-probs, values, scores, advantages and returns."""
        from posttrain.losses.advantages import gae, token_level_kl_rewards
        from posttrain.losses.kl import kl_divergence
        from posttrain.ops.distributed import global_mean_std
        from posttrain.ops.masked import masked_whiten
        from posttrain.rollout.sampling import sampling_keys

        args = self.args
        device = self.accelerator.device
        prompt_ids = batch["prompt_input_ids"].to(device)
        prompt_mask = batch["prompt_attention_mask"].to(device)
        with self.sampling_precision():
            # process p holds positions p*B .. p*B+B-1 of the update's global batch: layout-free draws
            start = self.accelerator.process_index * args.per_device_train_batch_size
            keys = sampling_keys(args.seed, "train", self.state.global_step, positions=range(start, start + len(prompt_ids)))
            generated = self._engine().generate(prompt_ids, prompt_mask=prompt_mask, num_generations=1,
                                                sampling=self._sampling(), prompt_keys=keys)
        seq = RolloutSequences.from_batch(generated)
        logps, ref_logps, values, scores = [], [], [], []
        step = args.local_rollout_forward_batch_size
        self.policy.eval(), self.value_model.eval()
        for lo in range(0, seq.num_rows, step):
            part = seq.slice(lo, lo + step)
            logps.append(self._policy_logps(self.policy, part))
            ref_logps.append(self._policy_logps(self.policy, part, logps_fn=self.reference.token_logps))
            values.append(part.completion_values(self.value_model))
            scores.append(self.reward_scores(part))
        self.policy.train(), self.value_model.train()
        logps, ref_logps = torch.cat(logps), torch.cat(ref_logps)
        values, scores = torch.cat(values), torch.cat(scores)
        mask = seq.loss_mask.float()

        ended = ~generated.is_truncated
        if args.missing_eos_penalty is not None:
            scores = scores - args.missing_eos_penalty * (~ended).float()
        rewards = token_level_kl_rewards(scores, logps, ref_logps, mask, args.kl_coef, args.kl_estimator)
        if args.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False, mean_std=global_mean_std)
        advantages, returns = gae(rewards, values * mask, mask, args.gamma, args.lam)
        advantages = masked_whiten(advantages, mask, mean_std=global_mean_std)  # over every process's rows

        kl = (kl_divergence(logps, ref_logps, args.kl_estimator) * mask).sum(-1)
        non_score = -args.kl_coef * kl
        self.record_metrics({
            "objective/kl": self.gather_mean(kl),
            "objective/entropy": self.gather_mean(-(logps * mask).sum(-1)),
            "objective/non_score_reward": self.gather_mean(non_score),
            "objective/rlhf_reward": self.gather_mean(scores + non_score),
            "objective/scores": self.gather_mean(scores),
            "val/num_eos_tokens": self.gather_mean(ended.float()) * ended.numel(),
            "completions/mean_length": self.gather_mean(seq.completion_mask.float().sum(-1)),
        })
        return seq.replace(old_logps=logps, ref_logps=ref_logps, values=values, advantages=advantages,
                           returns=returns, scores=scores)

    def _scoring_suffix(self, prompts) -> tuple[list[int], list[int]]:
        """For chat prompts: the token ids the template writes after a turn's EOS, and the EOS ids."""
        from posttrain.data.templates import turn_suffix_text

        first = prompts[0].get("prompt") if len(prompts) else None
        generation_eos = getattr(getattr(self.policy, "generation_config", None), "eos_token_id", None)
        eos_ids = [self._tokenizer.eos_token_id] + (generation_eos if isinstance(generation_eos, list) else [generation_eos])
        eos_ids = [int(i) for i in dict.fromkeys(eos_ids) if i is not None]
        if not isinstance(first, list) or not eos_ids:
            return [], eos_ids
        text = turn_suffix_text(self._tokenizer)
        return (self._tokenizer(text, add_special_tokens=False)["input_ids"] if text else []), eos_ids

    def reward_scores(self, sequences) -> torch.Tensor:
        """``(N,)`` scores of prompt + completion rows (:class:`RolloutSequences`); override to score differently.

        Read where ``RewardTrainer`` trained them: at each row's last attended token (:func:`sequence_scores`).
        A chat completion that ended with EOS first gets the text the template writes after a turn's
        EOS (ChatML's newline), since a rendered training row holds it; a truncated one is read at its last token.
        """
        ids, mask, positions = sequences.input_ids, sequences.attention_mask, sequences.position_ids
        if self._turn_suffix_ids:  # the template's text after the turn's EOS, as the reward model saw in training
            ids, mask, positions = append_after_eos(ids, mask, positions, self._turn_suffix_ids, self._eos_ids)
        return sequence_scores(self.reward_model, ids, mask, positions)

    def _policy_logps(self, network: nn.Module, part: RolloutSequences, logps_fn: Callable | None = None) -> torch.Tensor:
        """``(n, C)`` completion log-probs of ``part`` under ``network`` (or the reference, with its ``logps_fn``)."""
        logps, _ = completion_token_logps(network, part, temperature=self.args.temperature,
                                          chunk_size=self.args.logits_chunk_size, logps_fn=logps_fn, share_prompt=False)
        return logps

    def _optimise(self, rollout: RolloutSequences) -> None:
        """``num_ppo_epochs`` shuffled passes over the rollouts; one optimizer step per mini-batch."""
        from posttrain.losses.policy import clipped_policy_loss, clipped_value_loss
        from posttrain.ops.masked import masked_mean

        args, accelerator, model = self.args, self.accelerator, self.model_wrapped
        rows = rollout.num_rows
        mini = rows // args.num_mini_batches
        micro = max(1, mini // args.gradient_accumulation_steps)
        mask = rollout.loss_mask.float()
        model.train()
        for _ in range(args.num_ppo_epochs):
            order = torch.randperm(rows, generator=self._sample_generator, device=self._sample_generator.device)
            order = order.to(mask.device)
            for mini_start in range(0, rows, mini):
                mini_rows = order[mini_start:mini_start + mini]
                starts = list(range(0, len(mini_rows), micro))
                for i, micro_start in enumerate(starts):
                    idx = mini_rows[micro_start:micro_start + micro]
                    part = rollout.select(idx)
                    sync = nullcontext() if i == len(starts) - 1 else accelerator.no_sync(model)
                    with sync:
                        logps, entropy, values = model(part.input_ids, part.attention_mask, part.position_ids,
                                                       part.target_mask, temperature=args.temperature,
                                                       chunk_size=args.logits_chunk_size)
                        width = part.prompt_width
                        logps, entropy, values = logps[:, width - 1:], entropy[:, width - 1:], values[:, width - 1:-1]
                        token_mask = mask[idx]
                        per_token, policy_metrics = clipped_policy_loss(
                            logps, part.old_logps, part.advantages, token_mask,
                            epsilon_low=args.cliprange, epsilon_high=args.cliprange,
                        )
                        policy_loss = masked_mean(per_token, token_mask)
                        value_loss, value_metrics = clipped_value_loss(
                            values, part.values, part.returns, token_mask, args.cliprange_value
                        )
                        loss = policy_loss + args.vf_coef * value_loss
                        accelerator.backward(loss / len(starts))
                    self._record_update_metrics(logps, part.old_logps, entropy, token_mask,
                                                policy_loss, value_loss, policy_metrics, value_metrics)
                if args.max_grad_norm is not None and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def _record_update_metrics(self, logps, old_logps, entropy, mask, policy_loss, value_loss,
                               policy_metrics, value_metrics) -> None:
        from posttrain.ops.masked import masked_mean

        log_ratio = (logps - old_logps) * mask
        ratio = torch.exp(log_ratio)
        self.record_metrics({
            "policy/approxkl": self.gather_mean(0.5 * masked_mean(log_ratio ** 2, mask)),
            "policy/clipfrac": _metric(policy_metrics, "clip_ratio/region_mean"),
            "policy/entropy": self.gather_mean(masked_mean(entropy, mask)),
            "loss/policy": self.gather_mean(policy_loss),
            "loss/value": self.gather_mean(value_loss),
            "val/clipfrac": _metric(value_metrics, "vf_clipfrac"),
            "val/ratio": self.gather_mean(masked_mean(ratio, mask)),
        })

    # -- generation, evaluation, samples, saving

    def _engine(self):
        from posttrain.rollout import HFRolloutEngine

        args = self.args
        if args.stop_token_id is not None:
            eos = [args.stop_token_id]
        elif args.stop_token == "eos":
            eos = None  # the tokenizer's and the generation config's EOS ids
        else:
            eos = []
        return HFRolloutEngine(unwrap_model_keep_peft(self.policy), self._tokenizer, eos_token_ids=eos,
                               pad_token_id=self._tokenizer.pad_token_id, max_batch_tokens=args.rollout_max_batch_tokens)

    def _sampling(self, greedy: bool = False):
        from posttrain.rollout import SamplingParams

        return SamplingParams(max_completion_length=self.args.response_length, temperature=self.args.temperature,
                              do_sample=not greedy)

    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Greedy completions on the eval prompts, scored by the reward model: ``eval_objective/scores``."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ConfigError("evaluate() needs an eval_dataset", field="eval_dataset", fix="pass eval_dataset=...")
        if eval_dataset is not None and "prompt_input_ids" not in dataset.column_names:
            dataset = prepare_prompt_dataset(dataset, self._tokenizer, self.args.max_prompt_length, None, "eval")
        loader = self.get_eval_dataloader(dataset)
        scores, ended = [], []
        for batch in loader:
            with self.sampling_precision():
                generated = self._engine().generate(batch["prompt_input_ids"],
                                                    prompt_mask=batch["prompt_attention_mask"],
                                                    sampling=self._sampling(greedy=True))
            scores.append(self.reward_scores(RolloutSequences.from_batch(generated)))
            ended.append((~generated.is_truncated).float())
        metrics = {f"{metric_key_prefix}_objective/scores": self.gather_mean(torch.cat(scores)),
                   f"{metric_key_prefix}_val/contain_eos_token": self.gather_mean(torch.cat(ended))}
        self.log(dict(metrics))
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        return metrics

    def _write_samples(self, rollout: RolloutSequences, prompts: list | None, update: int, rows: int = 4) -> None:
        if not self.is_world_process_zero():
            return
        from posttrain.report.completions import append_completion_rows

        completions = self._tokenizer.batch_decode(
            [ids[m.bool()].tolist() for ids, m in zip(rollout.completion_ids[:rows], rollout.completion_mask[:rows])],
            skip_special_tokens=True,
        )
        prompts = prompts or self._tokenizer.batch_decode(rollout.prompt_token_lists()[:rows])
        append_completion_rows(self.args.output_dir, update, [
            {"prompt": prompt, "completion": completion, "score": score}
            for prompt, completion, score in zip(prompts, completions, rollout.scores[:rows].tolist())
        ])

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save the policy (not the value model) as a plain model directory, with the tokenizer."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        unwrap_model_keep_peft(self.policy).save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        self.write_model_card(output_dir)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        raise ConfigError("PPOTrainer trains through train(); compute_loss is not used", field="compute_loss",
                          fix="call trainer.train()")


def _cycle(loader):
    while True:
        yield from loader


def _metric(metrics: dict, *names: str) -> float:
    for name in names:
        if name in metrics:
            value = metrics[name]
            return float(value.item() if torch.is_tensor(value) else value)
    return float("nan")


def _check_same_vocabulary(policy: nn.Module, reward_model: nn.Module, tokenizer) -> None:
    """The reward model scores the policy's token ids directly, so their vocabularies must agree."""
    policy_vocab = unwrap_model(policy).get_input_embeddings().num_embeddings
    reward_vocab = unwrap_model(reward_model).get_input_embeddings().num_embeddings
    if policy_vocab != reward_vocab:
        raise ConfigError(
            f"the reward model's vocabulary ({reward_vocab} tokens) differs from the policy's ({policy_vocab})",
            field="reward_model_path",
            fix="train the reward model from the same base model / tokenizer as the policy (the InstructGPT recipe)",
        )
