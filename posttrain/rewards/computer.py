"""The reward-function protocol and :class:`RewardComputer`, which calls every function and combines them.

A reward function is any callable

    f(prompts, completions, **kwargs) -> list[float | None]

called with keyword arguments only:

* ``prompts``: one per row; a string, or for conversational data a list of messages.
* ``completions``: one per row; a string, or for conversational data ``[{"role": "assistant", "content": text}]``.
* ``completion_ids``: the generated token ids of each row (list of lists of ints, padding removed,
  as ``RolloutBatch.completion_token_lists()`` gives them).
* every other dataset column, as a list aligned with the rows (e.g. ``answer``).
* ``trainer_state``: the trainer's ``TrainerState`` (step, epoch, ...), or None outside training.

A function must accept ``**kwargs`` it does not use, since the set of columns depends on the
dataset. It returns one number per row, or None for a row it does not apply to (that row is then
left out of this function's share of the total rather than counted as 0). NaN and inf are not
rewards: they raise :class:`~posttrain.errors.RewardFunctionError` naming the function and the row
(they would otherwise reach the advantages as a silent 0 or poison the whole batch). A call slower
than ``slow_call_seconds`` is reported once per function with a warning naming it.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from posttrain.errors import ConfigError, DataError, RewardFunctionError

logger = logging.getLogger(__name__)

# a reward call slower than this is reported (a generation step waits for every reward function)
DEFAULT_SLOW_CALL_SECONDS = 30.0

RewardFunction = Callable[..., Sequence[float | None]]

# Argument names the computer passes itself; dataset columns with these names are not forwarded.
RESERVED_NAMES = ("prompts", "completions", "completion_ids", "trainer_state")
# Columns already given to the function under another name.
REDUNDANT_COLUMNS = ("prompt", "completion")


@dataclass
class RewardOutput:
    """Rewards of one batch.

    Attributes:
        per_function: ``(N, F)`` float32, one column per function, NaN where it returned None.
        total: ``(N,)`` float32, ``sum_f w_f * r_f`` over the functions that scored the row. A row no
            function scored gets 0.0 and is flagged in ``all_none``.
        all_none: ``(N,)`` bool, rows that no function scored.
        names: the function names, one per column.
        weights: the weights used, one per column.
    """

    per_function: torch.Tensor
    total: torch.Tensor
    all_none: torch.Tensor
    names: list[str]
    weights: list[float]

    def metrics(self) -> dict[str, float]:
        """Mean and std of each function's rewards (over the rows it scored) and of the total, for logging."""
        result: dict[str, float] = {}
        for column, name in enumerate(self.names):
            values = self.per_function[:, column]
            values = values[~torch.isnan(values)]
            result[f"rewards/{name}/mean"] = values.mean().item() if values.numel() else float("nan")
            result[f"rewards/{name}/std"] = values.std(unbiased=False).item() if values.numel() else float("nan")
        result["reward"] = self.total.mean().item()
        result["reward_std"] = self.total.std(unbiased=False).item()
        result["frac_reward_all_none"] = self.all_none.float().mean().item()
        return result


def reward_function_name(function: Callable) -> str:
    """A readable name: ``__name__``, else the class name of a callable object."""
    name = getattr(function, "__name__", None)
    if isinstance(name, str) and name and name != "<lambda>":
        return name
    if name == "<lambda>":
        return "lambda"
    return type(function).__name__


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    result = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        result.append(name if count == 0 else f"{name}_{count}")
    return result


def _as_float(value: Any) -> float | None:
    """A returned value as a float (NaN for None), or None when it is not a number."""
    if value is None:
        return math.nan
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, numbers.Real):
        return float(value)
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item):
        try:
            value = item()
        except (TypeError, ValueError):
            return None
        if isinstance(value, numbers.Real):
            return float(value)
    return None


class RewardComputer:
    """Calls each reward function on a batch and combines the results into one reward per row.

    Args:
        reward_funcs: callables following the protocol (see module docs); a string is resolved with
            :func:`posttrain.rewards.load_reward_funcs` (built-in name, ``module:function``,
            ``file.py:function`` or a reward-model directory).
        reward_weights: one weight per function; default 1.0 each.
        names: one name per function, used in errors and metrics; default each function's ``__name__``
            (repeated names get ``_1``, ``_2`` suffixes).
        slow_call_seconds: a call taking longer than this is reported with a warning naming the
            function (once per function); None never warns.
    """

    def __init__(
        self,
        reward_funcs: Sequence[RewardFunction | str] | RewardFunction | str,
        reward_weights: Sequence[float] | None = None,
        names: Sequence[str] | None = None,
        slow_call_seconds: float | None = DEFAULT_SLOW_CALL_SECONDS,
    ) -> None:
        if callable(reward_funcs) or isinstance(reward_funcs, str):
            reward_funcs = [reward_funcs]
        reward_funcs = list(reward_funcs)
        if not reward_funcs:
            raise ConfigError("no reward functions given", field="reward_funcs", fix="pass at least one, e.g. ['accuracy']")
        if any(isinstance(f, str) for f in reward_funcs):
            from posttrain.rewards.loader import load_reward_funcs

            reward_funcs = load_reward_funcs(reward_funcs)
        for index, function in enumerate(reward_funcs):
            if not callable(function):
                raise ConfigError(
                    f"reward function {index} is a {type(function).__name__}, not a callable",
                    field="reward_funcs",
                    fix="pass functions f(prompts, completions, **kwargs) -> list[float | None]",
                )
        if reward_weights is None:
            reward_weights = [1.0] * len(reward_funcs)
        reward_weights = [float(w) for w in reward_weights]
        if len(reward_weights) != len(reward_funcs):
            raise ConfigError(
                f"{len(reward_weights)} reward weights for {len(reward_funcs)} reward functions",
                field="reward_weights",
                fix="give exactly one weight per reward function, or none for equal weights",
            )
        if names is not None and len(names) != len(reward_funcs):
            raise ConfigError(
                f"{len(names)} names for {len(reward_funcs)} reward functions",
                field="reward_names",
                fix="give exactly one name per reward function",
            )
        self.reward_funcs = reward_funcs
        self.reward_weights = reward_weights
        self.names = _unique(list(names) if names is not None else [reward_function_name(f) for f in reward_funcs])
        self.num_all_none_rows = 0  # running count, for the trainer's logs
        self.slow_call_seconds = slow_call_seconds
        self._reported_slow: set[str] = set()

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]],
        columns: dict[str, Sequence[Any]] | None = None,
        trainer_state: Any = None,
    ) -> RewardOutput:
        num_rows = len(completions)
        columns = dict(columns or {})
        for name, values in [("prompts", prompts), ("completion_ids", completion_ids)] + list(columns.items()):
            if len(values) != num_rows:
                raise DataError(
                    "reward inputs are not aligned with the completions",
                    column=name,
                    expected=f"{num_rows} values (one per completion)",
                    found=f"{len(values)}",
                )
        extra = {k: list(v) for k, v in columns.items() if k not in RESERVED_NAMES and k not in REDUNDANT_COLUMNS}
        id_lists = [ids.tolist() if hasattr(ids, "tolist") else list(ids) for ids in completion_ids]
        per_function = torch.full((num_rows, len(self.reward_funcs)), math.nan, dtype=torch.float32)
        for column, (function, name) in enumerate(zip(self.reward_funcs, self.names)):
            # fresh lists per function, so one function mutating its inputs cannot affect the next
            arguments = dict(
                prompts=list(prompts),
                completions=list(completions),
                completion_ids=[list(ids) for ids in id_lists],
                trainer_state=trainer_state,
                **{k: list(v) for k, v in extra.items()},
            )
            started = time.perf_counter()
            per_function[:, column] = self._call_one(function, name, num_rows, arguments)
            self._note_duration(name, time.perf_counter() - started, num_rows)
        weights = torch.tensor(self.reward_weights, dtype=torch.float32)
        scored = ~torch.isnan(per_function)
        total = torch.where(scored, per_function * weights, torch.zeros(())).sum(dim=1)
        all_none = ~scored.any(dim=1)
        if all_none.any():
            count = int(all_none.sum())
            self.num_all_none_rows += count
            names = ", ".join(self.names)
            logger.warning(
                "%d of %d completions got None from every reward function (%s); their total reward is 0", count, num_rows, names
            )
        return RewardOutput(per_function, total, all_none, list(self.names), list(self.reward_weights))

    def _note_duration(self, name: str, seconds: float, num_rows: int) -> None:
        if self.slow_call_seconds is None or seconds <= self.slow_call_seconds or name in self._reported_slow:
            return
        self._reported_slow.add(name)
        logger.warning(
            "reward function '%s' took %.1f s for %d completions (more than %.1f s); every generation step waits "
            "for it (reported once)", name, seconds, num_rows, self.slow_call_seconds,
        )

    @staticmethod
    def _call_one(function: RewardFunction, name: str, num_rows: int, kwargs: dict[str, Any]) -> torch.Tensor:
        try:
            returned = function(**kwargs)
        except RewardFunctionError:
            raise
        except Exception as error:  # a user function may raise anything; report it with its name
            raise RewardFunctionError(f"reward function '{name}' raised {type(error).__name__}: {error}") from error
        if isinstance(returned, torch.Tensor):
            returned = returned.reshape(-1).tolist()
        elif hasattr(returned, "tolist") and not isinstance(returned, (list, tuple)):
            returned = returned.tolist()
        if not isinstance(returned, (list, tuple)):
            raise RewardFunctionError(
                f"reward function '{name}' must return a list of {num_rows} floats or None, "
                f"returned {type(returned).__name__} {returned!r:.80}"
            )
        if len(returned) != num_rows:
            raise RewardFunctionError(
                f"reward function '{name}' returned {len(returned)} values for {num_rows} completions; "
                f"expected a list of length {num_rows}"
            )
        values = []
        for row, value in enumerate(returned):
            number = _as_float(value)
            if number is None:
                raise RewardFunctionError(
                    f"reward function '{name}' returned a {type(value).__name__} at row {row} ({value!r:.80}); "
                    "expected a float or None"
                )
            if math.isinf(number) or (math.isnan(number) and value is not None):
                raise RewardFunctionError(
                    f"reward function '{name}' returned {number} at row {row}; expected a finite float, or None "
                    "for a row it does not apply to. Fix: return None there, or find why the score is not finite"
                )
            values.append(number)
        return torch.tensor(values, dtype=torch.float32)
