"""Held-out task accuracy as a curve: a callback that evaluates the model being trained every N steps.

    trainer.add_callback(EvalCallback("arithmetic", every=50))            # an embedded task
    trainer.add_callback(EvalCallback(prompt_dataset, every=50, reward_funcs="accuracy"))

Works with any ``transformers.Trainer`` (posttrain's or not) whose model is a causal LM. The figures
(``eval_task/<reward>``, with ``_low``/``_high`` interval ends) go into the trainer's log history and
``metrics.jsonl``, so they appear in ``report.md``'s evaluation plot.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from transformers import TrainerCallback

from posttrain.errors import ConfigError

logger = logging.getLogger("posttrain")


class EvalCallback(TrainerCallback):
    """Generate on held-out prompts every ``every`` optimizer steps (and at the end) and score them.

    Args:
        task_or_dataset: an embedded task name (``"arithmetic"``), a :class:`~posttrain.tasks.Task`, or a
            prompt dataset (rows with ``prompt`` and the columns the reward functions read).
        every: evaluate after every this many optimizer steps.
        reward_funcs: reward specs as for GRPO; default: the task's own check, or ``accuracy``.
        num_problems: how many task problems (from ``split``) to draw.
        max_new_tokens: most new tokens per greedy completion.
        prefix: the metric name prefix.
    """

    def __init__(self, task_or_dataset: Any, *, every: int = 100, reward_funcs: Any = None, num_problems: int = 64,
                 split: str = "test", max_new_tokens: int = 32, batch_size: int = 64, prefix: str = "eval_task") -> None:
        from posttrain.eval.suite import task_reward
        from posttrain.rewards import load_reward_funcs

        if not isinstance(every, int) or every < 1:
            raise ConfigError(f"every must be a positive number of steps, got {every!r}", field="every", fix="pass e.g. every=50")
        task = task_or_dataset
        if isinstance(task, str):
            from posttrain.tasks import get_task

            task = get_task(task)
        if hasattr(task, "as_prompt_only"):
            self.rows = list(task.as_prompt_only(num_problems, split=split))
            default = [task_reward(task)]
        else:
            self.rows = list(task_or_dataset)
            if not self.rows or "prompt" not in self.rows[0]:
                raise ConfigError("EvalCallback needs a task or prompt rows with a 'prompt' column",
                                  field="task_or_dataset", fix="pass e.g. EvalCallback('arithmetic') or a prompt dataset")
            default = load_reward_funcs(["accuracy"]) if "answer" in self.rows[0] else []
        self.reward_funcs = load_reward_funcs(reward_funcs) if reward_funcs else default
        if not self.reward_funcs:
            raise ConfigError("EvalCallback has nothing to score completions with", field="reward_funcs",
                              fix="pass reward_funcs=..., or rows with an 'answer' column")
        self.every, self.max_new_tokens, self.batch_size, self.prefix = every, max_new_tokens, batch_size, prefix

    def evaluate(self, model, tokenizer) -> dict[str, float]:
        """Greedy figures of ``model`` on the held-out prompts: ``{prefix/name: mean, prefix/name_low: ...}``."""
        from posttrain.eval.suite import POLICY, EvalModel, evaluate_generations, generate

        policy = getattr(model, "policy", model)  # PPO trains a policy-and-value wrapper
        candidate = EvalModel(name="training", model=policy, tokenizer=tokenizer, kind=POLICY, source="training")
        generations = generate(candidate, self.rows, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
        figures = evaluate_generations(self.rows, generations, self.reward_funcs)
        metrics = {}
        for name, variants in figures.items():
            greedy = variants["greedy"]
            metrics[f"{self.prefix}/{name}"] = greedy["mean"]
            metrics[f"{self.prefix}/{name}_low"] = greedy["low"]
            metrics[f"{self.prefix}/{name}_high"] = greedy["high"]
        return metrics

    def _run(self, args, state, model, tokenizer) -> None:
        if model is None or tokenizer is None:
            raise ConfigError("EvalCallback needs the trainer's model and tokenizer (processing_class)",
                              field="processing_class", fix="pass processing_class= to the trainer")
        if not state.is_world_process_zero:
            return
        metrics = self.evaluate(model, tokenizer)
        record = {**metrics, "step": state.global_step}
        state.log_history.append(record)
        logger.info("step %d: %s", state.global_step, ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()
                                                                 if not k.endswith(("_low", "_high"))))
        if args.output_dir:
            from posttrain.report.metrics import METRICS_FILE

            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, METRICS_FILE), "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        self._last_step = state.global_step

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.global_step % self.every == 0:
            self._run(args, state, model, processing_class)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if getattr(self, "_last_step", None) != state.global_step:
            self._run(args, state, model, processing_class)

