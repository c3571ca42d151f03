"""Rollouts with tools, environments or a user's ``rollout_func``, for the online trainers (GRPO, RLOO).

:class:`AgentRollouts` is what :class:`~posttrain.trainers.online.OnlineTrainer` calls instead of the
plain engine when one of TRL's three arguments is given:

* ``tools=[f, g]``: sync or async callables; their schemas (type hints + docstring) are rendered into
  each conversational prompt, the completions' tool calls are run (:mod:`posttrain.rollout.tools`)
  and the multi-turn loop continues (:mod:`posttrain.rollout.multiturn`).
* ``environment_factory``: a callable returning an environment; one instance per completion row, from
  a pool reused across rounds (built once, ``reset(**row)`` before each episode, TRL's contract).
  ``reset`` may return text, appended to the last user message. Public methods (not ``reset``,
  ``get_reward``, ``get_turn_rewards``, ``state_dict``, ``load_state_dict``) become that row's tools.
  ``get_reward()`` adds a reward function named after the class; reward functions get the row's
  instances as ``environments=``. ``get_turn_rewards()`` (one float per sampled turn) feeds
  ``credit_assignment="turn"``.
* ``rollout_func(prompts, trainer) -> dict`` with ``prompt_ids``, ``completion_ids``, ``logprobs`` (one
  list per completion, ``num_generations`` per prompt, prompt-major) and optional ``env_mask`` (1 on
  the tokens the model sampled, 0 on tokens an environment wrote: excluded from the loss); other
  keys reach the reward functions.

Every episode is written turn by turn to ``<output_dir>/episodes.jsonl`` (:class:`EpisodeRecorder`);
``tool_replay_path`` reads such a file back so the recorded tool results are used instead of calling
the tools (:class:`~posttrain.rollout.multiturn.ToolReplay`).
"""

from __future__ import annotations

import glob
import inspect
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from posttrain.errors import ConfigError, DataError
from posttrain.rollout.batch import left_pad, right_pad
from posttrain.rollout.multiturn import Episode, ToolReplay, episode_record, run_tool_episodes
from posttrain.rollout.sampling import sampling_key
from posttrain.rollout.sequences import RolloutSequences
from posttrain.rollout.tools import ToolExecutor, tool_name, tool_schema, tools_by_name

#: environment methods that are part of the protocol, never offered to the model as tools
ENVIRONMENT_PROTOCOL = ("reset", "get_reward", "get_turn_rewards", "state_dict", "load_state_dict")
ROLLOUT_FUNC_KEYS = ("prompt_ids", "completion_ids", "logprobs")


def environment_methods(environment: Any) -> list[Callable]:
    """The public methods of ``environment``'s class, bound to it, minus the protocol's (listed on the class,
    so properties are not evaluated)."""
    return [getattr(environment, name) for name, _ in inspect.getmembers(type(environment), inspect.isfunction)
            if not name.startswith("_") and name not in ENVIRONMENT_PROTOCOL]


def environment_reward(environment_class: type) -> Callable:
    """A reward function scoring each row with its environment's ``get_reward()`` (None for other classes)."""

    def reward(prompts, completions, environments=None, **kwargs):
        return [e.get_reward() if type(e) is environment_class else None for e in environments]

    reward.__name__ = environment_class.__name__
    return reward


@dataclass
class AgentSample:
    """What one agent rollout hands back to the online trainer (rows prompt-major, ``N`` of them)."""

    rows: RolloutSequences
    prompts: list[Any]  # (N,) the prompt each row answered, after reset() observations
    completions: list[Any]  # (N,) text, or a list of messages for conversational prompts
    completion_ids: list[list[int]]  # (N,) every completion token (tool results included)
    reward_columns: dict[str, list[Any]] = field(default_factory=dict)  # extra reward-function arguments
    metrics: dict[str, float] = field(default_factory=dict)
    turn_index: torch.Tensor | None = None  # (N, C): sampled turn of each token, -1 elsewhere
    turn_rewards: torch.Tensor | None = None  # (N, T) NaN-padded, from get_turn_rewards()
    records: list[dict[str, Any]] = field(default_factory=list)  # one per episode, for episodes.jsonl
    sampler_logps: list[list[float]] | None = None  # rollout_func's log-probs

    @property
    def sampled_lengths(self) -> torch.Tensor:
        """``(N,)`` tokens each completion's policy sampled (tool results and env_mask-0 tokens left out)."""
        return self._sampled_lengths

    def __post_init__(self) -> None:
        # taken before a trainer zeroes rows of the loss mask (mask_truncated_completions)
        self._sampled_lengths = self.rows.loss_mask.sum(dim=1).clone()


class EpisodeRecorder:
    """Appends one JSON line per episode to ``<output_dir>/episodes.jsonl`` (``episodes_<rank>.jsonl``
    on process ``rank > 0``)."""

    def __init__(self, output_dir: str, process_index: int = 0) -> None:
        name = "episodes.jsonl" if process_index == 0 else f"episodes_{process_index}.jsonl"
        self.path = os.path.join(output_dir, name)

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")


def load_replay(path: str) -> ToolReplay:
    """A :class:`ToolReplay` from an ``episodes.jsonl`` file, or every ``episodes*.jsonl`` of a run directory."""
    files = sorted(glob.glob(os.path.join(path, "episodes*.jsonl"))) if os.path.isdir(path) else [path]
    if not files or not all(os.path.isfile(f) for f in files):
        raise ConfigError(f"no recorded episodes at {path}", field="tool_replay_path",
                          fix="point it at an episodes.jsonl written by an earlier run, or at that run's output_dir")
    records = []
    for name in files:
        with open(name, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DataError("not a JSON line", source=name, row=number, found=str(error)) from None
    return ToolReplay(records)


class AgentRollouts:
    """Tools, environments and custom rollouts for one trainer (see the module docstring)."""

    def __init__(self, tools, environment_factory, rollout_func, args, tokenizer, process_index: int = 0) -> None:
        self.tools = list(tools or [])
        self.standalone = tools_by_name(self.tools)
        self.environment_factory = environment_factory
        self.rollout_func = rollout_func
        self.args = args
        self.tokenizer = tokenizer
        self._pool: list[Any] = []
        self._environment_class = None
        if environment_factory is not None:
            if not callable(environment_factory) or isinstance(environment_factory, dict):
                raise ConfigError("environment_factory must be a callable returning an environment (one environment "
                                  "class per run)", field="environment_factory", fix="pass the class or a function building it")
            probe = environment_factory()
            if not callable(getattr(probe, "reset", None)):
                raise ConfigError(f"the environment {type(probe).__name__} has no reset method", field="environment_factory",
                                  fix="define reset(self, **row) (it may return text appended to the prompt)")
            self._environment_class = type(probe)
            self._pool.append(probe)
            tools_by_name(self.tools + environment_methods(probe))  # one name per tool, checked now
        if rollout_func is not None and (self.tools or environment_factory is not None):
            raise ConfigError("rollout_func replaces the built-in tool loop; it cannot be combined with tools or "
                              "environment_factory", field="rollout_func",
                              fix="run tools inside your rollout_func, or drop rollout_func")
        if args.credit_assignment == "turn" and not callable(getattr(self._environment_class, "get_turn_rewards", None)):
            raise ConfigError("credit_assignment='turn' needs per-turn rewards from an environment", field="credit_assignment",
                              fix="pass an environment_factory whose environment defines get_turn_rewards(), "
                                  "or use credit_assignment='trajectory'")
        self.schemas = [tool_schema(tool) for tool in self.tools]
        if self._pool:
            self.schemas += [tool_schema(method) for method in environment_methods(self._pool[0])]
        if self.schemas:  # fail now, not at the first tool call, when the template cannot render tool turns
            from posttrain.rollout.multiturn import tool_suffix_ids

            first = self.schemas[0]["function"]["name"]
            tool_suffix_ids(tokenizer, [{"role": "tool", "name": first, "content": "ok"}])
        self.executor = ToolExecutor(args.tool_timeout)
        self.replay = load_replay(args.tool_replay_path) if args.tool_replay_path else None
        self.recorder = EpisodeRecorder(args.output_dir, process_index) if args.record_episodes else None

    @property
    def reward_funcs(self) -> list[Callable]:
        """Reward functions the environment adds (its ``get_reward``, named after its class)."""
        if self._environment_class is not None and callable(getattr(self._environment_class, "get_reward", None)):
            return [environment_reward(self._environment_class)]
        return []

    def with_environment_rewards(self, reward_funcs, reward_processing_classes, args):
        """The trainer's reward functions plus the environment's ``get_reward`` (weight 1, as in TRL); reward_funcs
        may then be None."""
        extra = self.reward_funcs
        if not extra:
            return reward_funcs, reward_processing_classes, args
        functions = [] if reward_funcs is None else list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if reward_processing_classes is not None:
            classes = reward_processing_classes if isinstance(reward_processing_classes, (list, tuple)) else [reward_processing_classes]
            reward_processing_classes = list(classes) + [None] * len(extra)
        if args.reward_weights is not None:
            args.reward_weights = list(args.reward_weights) + [1.0] * len(extra)
        return functions + extra, reward_processing_classes, args

    # ------------------------------------------------------------------ one generation

    def environments(self, count: int) -> list[Any]:
        while len(self._pool) < count:
            self._pool.append(self.environment_factory())
        return self._pool[:count]

    def sample(self, trainer, batch: dict[str, Any], num_generations: int, prompt_keys: torch.Tensor,
               columns: dict[str, list[Any]]) -> AgentSample:
        """Roll out ``num_generations`` episodes per prompt of a collated batch.

        ``columns``: the dataset's other columns, one value per row (already repeated per completion).
        """
        prompts = [p for p in batch["prompt"] for _ in range(num_generations)]
        if self.rollout_func is not None:
            return self._custom(trainer, batch, num_generations, prompts, columns)
        environments = self.environments(len(prompts)) if self.environment_factory is not None else None
        if environments is not None:
            prompts = [self._reset(env, prompt, {name: values[row] for name, values in columns.items()})
                       for row, (env, prompt) in enumerate(zip(environments, prompts))]
        tools_per_row = [dict(self.standalone, **({tool_name(m): m for m in environment_methods(env)} if env else {}))
                         for env in (environments or [None] * len(prompts))]
        rendered = [self._render(trainer, prompt, batch, row // num_generations) for row, prompt in enumerate(prompts)]
        grouped = all(rendered[row] == rendered[row - row % num_generations] for row in range(len(rendered)))
        if grouped:  # one prompt per group: its completions share a prefill and the plain keys
            prompt_ids, generations, keys = rendered[::num_generations], num_generations, prompt_keys
        else:  # reset() gave the rows of a group different observations: one prompt per row, keyed per member
            prompt_ids, generations = rendered, 1
            keys = torch.tensor([sampling_key(int(prompt_keys[row // num_generations]), "member", row % num_generations)
                                 for row in range(len(rendered))], dtype=torch.int64)
        with trainer.sampling_precision():
            rollout = run_tool_episodes(
                trainer._rollout_engine(), self.tokenizer, prompt_ids, num_generations=generations,
                sampling=trainer.sampling, tools_per_row=tools_per_row, executor=self.executor,
                max_iterations=self.args.max_tool_calling_iterations, prompt_keys=keys.to(trainer.accelerator.device),
                replay=self.replay,
            )
        episodes = rollout.episodes
        states = self._settle_environment_states(environments, episodes)
        completions = [self._completion(prompt, episode) for prompt, episode in zip(prompts, episodes)]
        reward_columns = {"environments": environments} if environments is not None else {}
        turn_rewards = None
        if self.args.credit_assignment == "turn":
            turn_rewards = _turn_reward_table(environments, rollout.num_turns)
        calls = sum(e.num_calls for e in episodes)
        return AgentSample(
            rows=rollout.rows, prompts=prompts, completions=completions,
            completion_ids=[e.completion_ids for e in episodes], reward_columns=reward_columns,
            metrics=_tool_counts(episodes, calls), turn_index=rollout.turn_index, turn_rewards=turn_rewards,
            records=[episode_record(e, **({"environment_state": state} if state is not None else {}))
                     for e, state in zip(episodes, states)],
        )

    def _settle_environment_states(self, environments, episodes) -> list[Any]:
        """Each row's environment state after its episode (``state_dict()``, None without one). A replayed episode's
        environment is first given its recorded state: its tools did not run, so their effects must come back."""
        if environments is None or not callable(getattr(self._environment_class, "state_dict", None)):
            return [None] * len(episodes)
        if self.replay is not None:
            for environment, episode in zip(environments, episodes):
                recorded = self.replay.environment_states.get(episode.name)
                if recorded is not None:
                    environment.load_state_dict(recorded)
        return [environment.state_dict() for environment in environments]

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any] | None:
        """The pooled environments' states (``state_dict()`` of each, in pool order), for a checkpoint; None when
        the environment keeps no state a resume could restore."""
        if not self._pool or not callable(getattr(self._environment_class, "state_dict", None)):
            return None
        return {"environments": [environment.state_dict() for environment in self._pool]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("environments") or []
        if saved and not callable(getattr(self._environment_class, "load_state_dict", None)):
            raise ConfigError(f"the checkpoint holds environment states but {self._environment_class.__name__} has no "
                              "load_state_dict", field="environment_factory", fix="define load_state_dict(self, state)")
        for environment, environment_state in zip(self.environments(len(saved)), saved):
            environment.load_state_dict(environment_state)

    def _reset(self, environment, prompt, row: dict[str, Any]):
        observation = environment.reset(prompt=prompt, **row)
        if not isinstance(observation, str) or not observation:
            return prompt
        if isinstance(prompt, str):
            return prompt + observation
        last = prompt[-1]
        return list(prompt[:-1]) + [{**last, "content": (last.get("content") or "") + observation}]

    def _render(self, trainer, prompt, batch, index: int) -> list[int]:
        from posttrain.data.templates import apply_chat_template_text
        from posttrain.data.tokenize import SpecialTokens, encode, truncate_prompt

        if isinstance(prompt, str):
            if prompt == batch["prompt"][index]:  # unchanged: the collated ids, padding removed
                mask = batch["prompt_attention_mask"][index].bool()
                return batch["prompt_input_ids"][index][mask].tolist()
            ids = SpecialTokens.of(self.tokenizer).with_bos(encode(self.tokenizer, [prompt])[0])
        else:
            text = apply_chat_template_text(self.tokenizer, prompt, add_generation_prompt=True, tools=self.schemas or None)
            ids = encode(self.tokenizer, [text])[0]
        return truncate_prompt(list(ids), trainer.args.max_prompt_length, "keep_end")

    def _completion(self, prompt, episode: Episode):
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        if isinstance(prompt, str):
            return decode(episode.completion_ids)
        messages = []
        for turn in episode.turns:
            message = {"role": "assistant", "content": decode(turn.sampled_ids)}
            if turn.calls:
                message["tool_calls"] = [call.as_message() for call in turn.calls if call.error is None]
            messages.append(message)
            if turn.suffix_ids:
                messages += [result.as_message() for result in turn.results]
        return messages

    # ------------------------------------------------------------------ rollout_func

    def _custom(self, trainer, batch, num_generations, prompts, columns) -> AgentSample:
        output = self.rollout_func(list(batch["prompt"]), trainer)
        num_rows = len(prompts)
        prompt_ids, completion_ids, logprobs, env_mask = validate_rollout_output(output, num_rows)
        device = trainer.accelerator.device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        prompt_tensor, prompt_mask = left_pad(prompt_ids, pad, device)
        completion_tensor, completion_mask = right_pad(completion_ids, pad, device)
        loss_mask, _ = right_pad(env_mask, 0, device)
        eos = trainer._rollout_engine().eos_token_ids if hasattr(trainer, "_rollout_engine") else [self.tokenizer.eos_token_id]
        truncated = torch.tensor([not ids or ids[-1] not in eos for ids in completion_ids], dtype=torch.bool, device=device)
        rows = RolloutSequences(prompt_ids=prompt_tensor, prompt_mask=prompt_mask, completion_ids=completion_tensor,
                                completion_mask=completion_mask, loss_mask=loss_mask * completion_mask, is_truncated=truncated)
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in zip(prompts, texts)]
        extra = {name: list(values) for name, values in output.items()
                 if name not in ROLLOUT_FUNC_KEYS and name != "env_mask"}
        records = [{"episode": f"rollout_func:{row}", "prompt_ids": p, "turns": [{"sampled_ids": c, "env_mask": m}]}
                   for row, (p, c, m) in enumerate(zip(prompt_ids, completion_ids, env_mask))]
        return AgentSample(rows=rows, prompts=prompts, completions=completions, completion_ids=completion_ids,
                           reward_columns=extra, records=records, sampler_logps=logprobs)


def sample_and_reward(trainer, batch: dict[str, Any], num_generations: int, prompt_keys: torch.Tensor,
                      prompt_columns: Sequence[str]):
    """Roll out with tools, environments or a ``rollout_func`` and run the reward functions (with ``environments=``
    and the rollout's extra keys); log the tool metrics summed over processes. Returns ``(AgentSample, RewardOutput)``
    for ``OnlineTrainer.sample_and_score`` to assemble."""
    columns = {name: [value for value in values for _ in range(num_generations)]
               for name, values in batch.items() if name not in prompt_columns}
    sample = trainer.agent.sample(trainer, batch, num_generations, prompt_keys, columns)
    output = trainer.reward_computer(sample.prompts, sample.completions, sample.completion_ids,
                                     {**columns, **sample.reward_columns}, trainer_state=trainer.state)
    if sample.metrics:
        names = sorted(sample.metrics)
        totals = torch.tensor([sample.metrics[name] for name in names], dtype=torch.float64,
                              device=trainer.accelerator.device)
        if trainer.accelerator.num_processes > 1:
            totals = trainer.accelerator.reduce(totals, reduction="sum")
        trainer.record_metrics(tool_metrics(dict(zip(names, totals.tolist()))))
    return sample, output


def episode_extras(scored, mode: str, step: int, generation_round: int) -> list[dict[str, Any]]:
    """The episode records of a scored agent rollout with what the trainer added: rewards, advantage, and the
    log-probs of each completion token (``old_logps``, the policy when it sampled; present when the run keeps them)
    or the ``rollout_func``'s own."""
    sample, rows = scored.agent, scored.rows
    lengths = rows.completion_mask.sum(dim=1).tolist()
    old = rows.old_logps.tolist() if rows.old_logps is not None else None
    records = []
    for row, record in enumerate(sample.records):
        advantage = rows.advantages[row]
        extra = {
            "mode": mode, "step": int(step), "round": int(generation_round),
            "rewards": {name: _finite(v) for name, v in zip(scored.reward_names, scored.rewards_per_function[row].tolist())},
            "reward": _finite(float(scored.rewards[row])),
            "advantage": advantage[: lengths[row]].tolist() if advantage.dim() else float(advantage),
            "logprobs": (sample.sampler_logps[row] if sample.sampler_logps is not None
                         else old[row][: lengths[row]] if old is not None else None),
        }
        records.append({**record, **extra})
    return records


def turn_credit_advantages(scored, scale_rewards: str) -> torch.Tensor:
    """``(N, C)`` per-token advantages of ``credit_assignment="turn"``: the environment's turn rewards plus the
    final reward, group-normalised per turn (:func:`~posttrain.losses.advantages.turn_level_advantages`), on each
    turn's sampled tokens."""
    from posttrain.losses.advantages import broadcast_turn_advantages, turn_level_advantages

    sample = scored.agent
    final = torch.nan_to_num(scored.rewards.float().cpu(), nan=0.0)
    per_turn = turn_level_advantages(sample.turn_rewards.float(), final, scored.group_size, scale_rewards)
    return broadcast_turn_advantages(per_turn, sample.turn_index.cpu()).to(scored.rewards.device)


def _finite(value: float) -> float | None:
    return None if value != value else value  # NaN (unscored) as JSON null


def validate_rollout_output(output: Any, num_rows: int):
    """``(prompt_ids, completion_ids, logprobs, env_mask)`` of a ``rollout_func``'s dict, checked: one list per
    completion (``num_rows``), token ids as ints, ``logprobs`` and ``env_mask`` as long as their completion."""
    def fail(problem: str, fix: str):
        raise ConfigError(f"rollout_func returned {problem}", field="rollout_func", fix=fix)

    if not isinstance(output, dict):
        fail(f"a {type(output).__name__}, not a dict", "return {'prompt_ids': ..., 'completion_ids': ..., 'logprobs': ...}")
    missing = [key for key in ROLLOUT_FUNC_KEYS if key not in output]
    if missing:
        fail(f"no {', '.join(missing)}", "return a dict with prompt_ids, completion_ids and logprobs (one list per completion)")
    lists = {key: output[key] for key in (*ROLLOUT_FUNC_KEYS, "env_mask") if key in output}
    for key, value in lists.items():
        if not isinstance(value, (list, tuple)) or len(value) != num_rows:
            found = len(value) if isinstance(value, (list, tuple)) else type(value).__name__
            fail(f"{key} with {found} entries for {num_rows} completions",
                 "return one list per completion: num_generations per prompt, prompts in the order given")
        for row, entry in enumerate(value):
            if not isinstance(entry, (list, tuple)):
                fail(f"{key}[{row}] of type {type(entry).__name__}", f"make {key}[{row}] a list")
    for key in ("prompt_ids", "completion_ids"):
        for row, ids in enumerate(output[key]):
            if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
                fail(f"{key}[{row}] holding something other than token ids", "return lists of non-negative ints")
    for key in ("logprobs", "env_mask"):
        for row, (values, ids) in enumerate(zip(lists.get(key, output["completion_ids"]), output["completion_ids"])):
            if len(values) != len(ids):
                fail(f"{key}[{row}] of length {len(values)} for {len(ids)} completion tokens",
                     f"give one {key} entry per completion token")
    env_mask = [list(m) for m in output.get("env_mask", [[1] * len(ids) for ids in output["completion_ids"]])]
    if any(bit not in (0, 1) for mask in env_mask for bit in mask):
        fail("an env_mask with values other than 0 and 1", "mark sampled tokens 1 and environment tokens 0")
    return ([list(p) for p in output["prompt_ids"]], [list(c) for c in output["completion_ids"]],
            [[float(v) for v in lp] for lp in output["logprobs"]], env_mask)


def _tool_counts(episodes: Sequence[Episode], calls: int) -> dict[str, float]:
    """Per-process totals; the trainer sums them over processes before dividing (see ``tool_metrics``)."""
    return {"calls": float(calls), "failures": float(sum(e.num_failures for e in episodes)),
            "timeouts": float(sum(e.num_timeouts for e in episodes)), "turns": float(sum(len(e.turns) for e in episodes)),
            "episodes": float(len(episodes))}


def tool_metrics(totals: dict[str, float]) -> dict[str, float]:
    """TRL's ``tools/call_frequency`` (calls per completion) and ``tools/failure_frequency`` (failed / calls),
    and ours: ``tools/timeout_frequency`` (timed out / calls), ``tools/turns_per_episode``; from the counts of
    :func:`_tool_counts` summed over processes."""
    calls, failures, timeouts = totals["calls"], totals["failures"], totals["timeouts"]
    turns, episodes = totals["turns"], totals["episodes"]
    return {"tools/call_frequency": calls / max(episodes, 1.0),
            "tools/failure_frequency": failures / calls if calls else 0.0,
            "tools/timeout_frequency": timeouts / calls if calls else 0.0,
            "tools/turns_per_episode": turns / max(episodes, 1.0)}


def _turn_reward_table(environments, num_turns: Sequence[int]) -> torch.Tensor:
    """``(N, T)`` float, row ``i`` = ``environments[i].get_turn_rewards()`` (missing turns 0, past the episode NaN)."""
    width = max(num_turns)
    table = torch.full((len(num_turns), width), float("nan"))
    for row, (environment, turns) in enumerate(zip(environments, num_turns)):
        values = list(environment.get_turn_rewards() or [])[:turns]
        table[row, :turns] = 0.0
        if values:
            table[row, : len(values)] = torch.tensor([float(v) for v in values])
    return table
