"""Multi-turn rollouts with tools: sample, run the tool calls, append their results, sample again.

For every completion row the loop keeps one token sequence, never re-rendered:

    prompt | turn 0 (sampled) | tool suffix 0 | turn 1 (sampled) | tool suffix 1 | ... | turn K (sampled)

A *tool suffix* is what the chat template writes after an assistant turn that called tools: the
end of that turn, the tool messages and the header of the next assistant turn. It is computed once
per tool response with the template, as the tokens a minimal conversation gains when the tool
messages (and the generation prompt) are added after an assistant turn with tool calls, cut at the
turn's EOS (:func:`tool_suffix_ids`); rendering must be prefix-preserving there, which is checked.
In the returned :class:`~posttrain.rollout.sequences.RolloutSequences` the completion is all turns
and suffixes concatenated; ``completion_mask`` is 1 on all of them (the model attends to tool
results) and ``loss_mask`` is 1 on sampled tokens only.

Turn 0 is sampled exactly like a single-turn rollout (the engine's keys from (seed, round, prompt
position), ``num_generations`` per prompt), so a run whose model never calls a tool samples what it
would have sampled without tools. Turn ``t >= 1`` of completion ``j`` of a prompt with key ``k``
draws from :func:`turn_key` ``(k, j, t)``: a pure function of the episode, not of the batch it
shares, so multi-turn runs keep decision 8 (the same draws on 1 or N processes). The budget
``max_completion_length`` counts every completion token, tool suffixes included (as in TRL); a
tool result that would leave no room for another token is not appended and the episode ends there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from posttrain.errors import ConfigError, DataError
from posttrain.rollout.batch import right_pad
from posttrain.rollout.sampling import SamplingParams, sampling_key
from posttrain.rollout.sequences import RolloutSequences
from posttrain.rollout.tools import ToolCall, ToolExecutor, ToolResult, parse_tool_calls


def turn_key(prompt_key: int, member: int, turn: int) -> int:
    """The sampling key of turn ``turn >= 1`` of completion ``member`` of the prompt keyed ``prompt_key``."""
    return sampling_key(int(prompt_key), "turn", int(member), int(turn))


def tool_suffix_ids(tokenizer, tool_messages: Sequence[Mapping[str, Any]], **template_kwargs: Any) -> list[int]:
    """The tokens the chat template writes after an assistant turn's EOS for ``tool_messages``, up to and
    including the next assistant header.

    Rendered from a minimal conversation (a user turn, then an assistant turn calling the first
    message's tool): ``full`` = it + the tool messages + the generation prompt, ``prefix`` = it alone,
    cut after its last EOS token (templates write a newline after EOS that belongs to the suffix).
    ConfigError when ``prefix`` is not a prefix of ``full``: the template re-renders earlier turns
    differently once tool messages follow, so concatenated tokens would not be what the model sees.
    """
    name = tool_messages[0].get("name", "tool") if tool_messages else "tool"
    conversation = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": name, "arguments": {}}}]},
    ]
    try:
        prefix = _rendered_ids(tokenizer, conversation, add_generation_prompt=False, **template_kwargs)
        full = _rendered_ids(tokenizer, conversation + list(tool_messages), add_generation_prompt=True, **template_kwargs)
    except ConfigError:
        raise
    except Exception as error:  # jinja's errors: say what to do
        raise ConfigError(f"the chat template cannot render tool calls and tool messages: {error}", field="tools",
                          fix="use a tokenizer whose chat template supports tools (assistant tool_calls and role 'tool')") from None
    eos_ids = _eos_ids(tokenizer)
    ends = [i for i, token in enumerate(prefix) if token in eos_ids]
    if ends:
        prefix = prefix[: ends[-1] + 1]
    if full[: len(prefix)] != prefix:
        raise ConfigError(
            "the chat template is not prefix-preserving at an assistant-to-tool boundary: adding tool messages "
            "changes the tokens of the assistant turn before them, so multi-turn token sequences would differ from "
            "what the model is trained on", field="tools",
            fix="use a chat template that renders earlier turns the same whatever follows them",
        )
    return full[len(prefix):]


def _rendered_ids(tokenizer, messages, **kwargs) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    if isinstance(ids, Mapping):
        ids = ids["input_ids"]
    return [int(token) for token in ids]


def _eos_ids(tokenizer) -> set[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}


@dataclass
class Turn:
    """One sampled turn of an episode and what followed it."""

    sampled_ids: list[int]
    calls: list[ToolCall] = field(default_factory=list)
    results: list[ToolResult] = field(default_factory=list)
    suffix_ids: list[int] = field(default_factory=list)  # tool suffix appended after this turn ([] for the last)

    def as_record(self) -> dict[str, Any]:
        return {
            "sampled_ids": self.sampled_ids, "suffix_ids": self.suffix_ids,
            "calls": [{"name": c.name, "arguments": c.arguments, "error": c.error} for c in self.calls],
            "results": [dataclasses.asdict(r) for r in self.results],
        }


@dataclass
class Episode:
    """One completion row, turn by turn. ``key`` is the turn-0 sampling key of its prompt, ``member`` its
    index in the group: together they name the episode in records and replays."""

    prompt_ids: list[int]
    key: int | None
    member: int
    turns: list[Turn] = field(default_factory=list)
    truncated: bool = False

    @property
    def name(self) -> str:
        return f"{self.key}:{self.member}"

    @property
    def completion_ids(self) -> list[int]:
        return [token for turn in self.turns for token in turn.sampled_ids + turn.suffix_ids]

    @property
    def sampled_mask(self) -> list[int]:
        """1 on sampled tokens, 0 on tool-suffix tokens, aligned with :attr:`completion_ids`."""
        return [bit for turn in self.turns for bit in [1] * len(turn.sampled_ids) + [0] * len(turn.suffix_ids)]

    @property
    def turn_index(self) -> list[int]:
        """The turn each completion token was sampled in, -1 on tool-suffix tokens."""
        return [i for n, turn in enumerate(self.turns) for i in [n] * len(turn.sampled_ids) + [-1] * len(turn.suffix_ids)]

    @property
    def num_calls(self) -> int:
        return sum(len(turn.results) for turn in self.turns)

    @property
    def num_failures(self) -> int:
        return sum(r.failed for turn in self.turns for r in turn.results)

    @property
    def num_timeouts(self) -> int:
        return sum(r.timed_out for turn in self.turns for r in turn.results)


class ToolReplay:
    """Recorded tool results, looked up by (episode name, turn, call index) instead of calling tools.

    ``records``: episode records as :func:`episode_record` writes them (one per JSONL line). A call
    whose episode is recorded must match the recorded name and arguments (else DataError: the run
    diverged from the recording); an episode not in the record runs its tools live.
    """

    def __init__(self, records: Sequence[Mapping[str, Any]]) -> None:
        self.results: dict[tuple[str, int, int], tuple[dict, dict]] = {}
        self.episodes: set[str] = set()
        self.environment_states: dict[str, Any] = {}  # episode name -> its environment's recorded state_dict()
        for record in records:
            self.episodes.add(record["episode"])
            if record.get("environment_state") is not None:
                self.environment_states[record["episode"]] = record["environment_state"]
            for turn_number, turn in enumerate(record["turns"]):
                for index, (call, result) in enumerate(zip(turn["calls"], turn["results"])):
                    self.results[(record["episode"], turn_number, index)] = (call, result)
        self.replayed = 0

    def covers(self, episode: Episode) -> bool:
        return episode.name in self.episodes

    def result(self, episode: Episode, turn: int, index: int, call: ToolCall) -> ToolResult:
        found = self.results.get((episode.name, turn, index))
        if found is None or found[0]["name"] != call.name or found[0]["arguments"] != call.arguments:
            raise DataError(
                "tool replay diverged from the recording", column="tool_replay_path",
                expected=f"episode {episode.name} turn {turn} call {index}: "
                         f"{found[0]['name'] if found else 'no call'}{'(' + str(found[0]['arguments']) + ')' if found else ''}",
                found=f"{call.name}({call.arguments})",
            )
        self.replayed += 1
        return ToolResult(**found[1])


def episode_record(episode: Episode, **extra: Any) -> dict[str, Any]:
    """One JSON-ready line: the episode's name, prompt, turns (ids, calls, results) and ``extra`` fields."""
    return {"episode": episode.name, "key": episode.key, "member": episode.member, "prompt_ids": episode.prompt_ids,
            "truncated": episode.truncated, "turns": [turn.as_record() for turn in episode.turns], **extra}


@dataclass
class MultiTurnRollout:
    """The rows of a multi-turn rollout and the episodes behind them (row ``i`` = ``episodes[i]``).

    ``turn_index`` ``(N, C)`` long: the sampled turn of each completion token, -1 on tool tokens and padding.
    """

    rows: RolloutSequences
    episodes: list[Episode]
    turn_index: torch.Tensor

    @property
    def num_turns(self) -> list[int]:
        return [len(e.turns) for e in self.episodes]


def run_tool_episodes(
    engine,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    *,
    num_generations: int,
    sampling: SamplingParams,
    tools_per_row: Sequence[Mapping[str, Callable]],
    executor: ToolExecutor,
    max_iterations: int | None = None,
    prompt_keys: torch.Tensor | None = None,
    replay: ToolReplay | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
) -> MultiTurnRollout:
    """Sample ``num_generations`` multi-turn completions per prompt (rows prompt-major).

    Args:
        engine: a :class:`~posttrain.rollout.RolloutEngine`.
        prompt_ids: each prompt's token ids, rendered with the tool schemas the model may call.
        tools_per_row: for each completion row, ``{name: callable}`` (an environment's methods differ per row).
        executor: runs the calls (timeouts, errors as messages).
        max_iterations: most tool-calling rounds after the first turn (None: until the budget is spent).
        prompt_keys: ``(num_prompts,)`` sampling keys; turn ``t`` of member ``j`` draws from :func:`turn_key`.
        replay: recorded tool results to use instead of calling tools.
    """
    budget = sampling.max_completion_length
    eos_ids = set(engine.eos_token_ids)
    first = engine.generate([list(p) for p in prompt_ids], num_generations=num_generations, sampling=sampling,
                            prompt_keys=prompt_keys)
    keys = [None] * len(prompt_ids) if prompt_keys is None else [int(k) for k in prompt_keys.tolist()]
    episodes = []
    for row, (ids, length, truncated) in enumerate(zip(first.completion_ids.tolist(), first.completion_lengths.tolist(),
                                                       first.is_truncated.tolist())):
        prompt = int(row // num_generations)
        episode = Episode(list(prompt_ids[prompt]), keys[prompt], row % num_generations, truncated=bool(truncated))
        episode.turns.append(Turn(ids[:length]))
        episodes.append(episode)
    if len(tools_per_row) != len(episodes):
        raise ConfigError(f"{len(tools_per_row)} tool sets for {len(episodes)} completions", field="tools",
                          fix="pass one {name: tool} mapping per completion row")
    iteration = 0
    active = list(range(len(episodes)))
    while active and (max_iterations is None or iteration < max_iterations):
        active = _run_calls(episodes, active, tokenizer, tools_per_row, executor, eos_ids, replay,
                            dict(template_kwargs or {}), budget)
        if not active:
            break
        iteration += 1
        contexts = [episodes[r].prompt_ids + episodes[r].completion_ids for r in active]
        room = [budget - len(episodes[r].completion_ids) for r in active]
        turn_sampling = dataclasses.replace(sampling, max_completion_length=max(room))
        turn_keys = None
        if prompt_keys is not None:
            turn_keys = torch.tensor([turn_key(episodes[r].key, episodes[r].member, len(episodes[r].turns)) for r in active],
                                     dtype=torch.int64)
        batch = engine.generate(contexts, num_generations=1, sampling=turn_sampling, prompt_keys=turn_keys)
        for r, limit, ids, length, truncated in zip(active, room, batch.completion_ids.tolist(),
                                                   batch.completion_lengths.tolist(), batch.is_truncated.tolist()):
            sampled = ids[:min(length, limit)]
            episodes[r].turns.append(Turn(sampled))
            # a turn cut by the row's own budget (shorter than the batch's) is truncated too
            episodes[r].truncated = bool(truncated) or length > limit
    return _as_rollout(episodes, first, engine.pad_token_id)


def _run_calls(episodes, active, tokenizer, tools_per_row, executor, eos_ids, replay, template_kwargs, budget) -> list[int]:
    """Run the tool calls of the active episodes' last turns; append their suffixes; return the rows to continue."""
    jobs, owners = [], []
    for r in active:
        episode = episodes[r]
        last = episode.turns[-1]
        if episode.truncated or not last.sampled_ids or last.sampled_ids[-1] not in eos_ids:
            continue
        last.calls = parse_tool_calls(tokenizer.decode(last.sampled_ids, skip_special_tokens=False))
        for index, call in enumerate(last.calls):
            turn = len(episode.turns) - 1
            if replay is not None and replay.covers(episode):
                last.results.append(replay.result(episode, turn, index, call))
            else:
                jobs.append((call, tools_per_row[r]))
                owners.append((r, index))
    live = executor.run_batch(jobs) if jobs else []
    for (r, index), result in zip(owners, live):
        episodes[r].turns[-1].results.insert(index, result)
    continuing = []
    for r in active:
        last = episodes[r].turns[-1]
        if not last.results:
            continue
        suffix = tool_suffix_ids(tokenizer, [result.as_message() for result in last.results], **template_kwargs)
        if len(episodes[r].completion_ids) + len(suffix) >= budget:
            continue  # no room to answer: the episode ends with its call, as if the tool had not run
        last.suffix_ids = suffix
        continuing.append(r)
    return continuing


def _as_rollout(episodes: list[Episode], first, pad_token_id: int) -> MultiTurnRollout:
    device = first.completion_ids.device
    completion_ids, completion_mask = right_pad([e.completion_ids for e in episodes], pad_token_id, device)
    loss_mask, _ = right_pad([e.sampled_mask for e in episodes], 0, device)
    turn_index, _ = right_pad([e.turn_index for e in episodes], -1, device)
    rows = RolloutSequences(
        prompt_ids=first.prompt_ids, prompt_mask=first.prompt_mask, completion_ids=completion_ids,
        completion_mask=completion_mask, loss_mask=loss_mask,
        is_truncated=torch.tensor([e.truncated for e in episodes], dtype=torch.bool, device=device),
    )
    return MultiTurnRollout(rows=rows, episodes=episodes, turn_index=turn_index)
