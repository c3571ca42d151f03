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
* ``log_extra(column, values)``: adds a column to the completions table (``values``: one per row).
* ``log_metric(name, value)``: logs a scalar; a trainer averages it over the calls of a logging step
  and writes it with its own metrics (``metrics.jsonl``, ``report_to``).

A function may be ``async def`` (or return an awaitable): the awaitables of one batch run
concurrently on one background event loop, which lives as long as the process, so a client the
function keeps (an HTTP session, say) stays bound to the same loop from one call to the next.

A function must accept ``**kwargs`` it does not use, since the set of columns depends on the
dataset. It returns one number per row, or None for a row it does not apply to (that row is then
left out of this function's share of the total rather than counted as 0). NaN and inf are not
rewards: they raise :class:`~posttrain.errors.RewardFunctionError` naming the function and the row
(they would otherwise reach the advantages as a silent 0 or poison the whole batch). A call slower
than ``slow_call_seconds`` is reported once per function with a warning naming it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import numbers
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from posttrain.errors import ConfigError, DataError, RewardFunctionError

logger = logging.getLogger(__name__)

# a reward call slower than this is reported (a generation step waits for every reward function)
DEFAULT_SLOW_CALL_SECONDS = 30.0

RewardFunction = Callable[..., Sequence[float | None]]

# Argument names the computer passes itself; dataset columns with these names are not forwarded.
RESERVED_NAMES = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")
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
        extra_columns: what the functions passed to ``log_extra``: column -> one value per row.
        logged_metrics: what the functions passed to ``log_metric``: name -> the value of each call.
    """

    per_function: torch.Tensor
    total: torch.Tensor
    all_none: torch.Tensor
    names: list[str]
    weights: list[float]
    extra_columns: dict[str, list[Any]] = field(default_factory=dict)
    logged_metrics: dict[str, list[float]] = field(default_factory=dict)

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
        for name, values in self.logged_metrics.items():
            result[name] = sum(values) / len(values)
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
        self._watchdog = _SlowCallWatchdog()

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
        reported = _ReportedValues(num_rows)
        pending: list[tuple[int, str, Awaitable]] = []
        for column, (function, name) in enumerate(zip(self.reward_funcs, self.names)):
            # fresh lists per function, so one function mutating its inputs cannot affect the next
            arguments = dict(
                prompts=list(prompts),
                completions=list(completions),
                completion_ids=[list(ids) for ids in id_lists],
                trainer_state=trainer_state,
                log_extra=reported.extra_logger(name),
                log_metric=reported.metric_logger(name),
                **{k: list(v) for k, v in extra.items()},
            )
            started = time.perf_counter()
            with self._still_running_warning(name, num_rows):
                returned = self._invoke(function, name, arguments)
            if inspect.isawaitable(returned):  # an async function: awaited below, with the others
                pending.append((column, name, returned))
                continue
            per_function[:, column] = self._as_row_rewards(name, num_rows, returned)
            self._note_duration(name, time.perf_counter() - started, num_rows)
        with self._still_running_warning(", ".join(name for _, name, _ in pending), num_rows, active=bool(pending)):
            finished = _await_concurrently(pending)
        for column, name, returned, seconds in finished:
            per_function[:, column] = self._as_row_rewards(name, num_rows, returned)
            self._note_duration(name, seconds, num_rows)
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
        return RewardOutput(per_function, total, all_none, list(self.names), list(self.reward_weights),
                            extra_columns=reported.columns, logged_metrics=reported.metrics)

    @contextmanager
    def _still_running_warning(self, name: str, num_rows: int, active: bool = True):
        """While the block runs, warn once it has taken ``slow_call_seconds``: a hung reward function is
        reported while training waits for it, not only after it returns."""
        if not active or self.slow_call_seconds is None:
            yield
            return
        self._watchdog.arm(self.slow_call_seconds, (
            "reward function '%s' has run for %.1f s on %d completions and has not returned; training waits for it",
            name, self.slow_call_seconds, num_rows))
        try:
            yield
        finally:
            self._watchdog.disarm()

    def _note_duration(self, name: str, seconds: float, num_rows: int) -> None:
        if self.slow_call_seconds is None or seconds <= self.slow_call_seconds or name in self._reported_slow:
            return
        self._reported_slow.add(name)
        logger.warning(
            "reward function '%s' took %.1f s for %d completions (more than %.1f s); every generation step waits "
            "for it (reported once)", name, seconds, num_rows, self.slow_call_seconds,
        )

    @staticmethod
    def _invoke(function: RewardFunction, name: str, kwargs: dict[str, Any]) -> Any:
        try:
            return function(**kwargs)
        except RewardFunctionError:
            raise
        except Exception as error:  # a user function may raise anything; report it with its name
            raise RewardFunctionError(f"reward function '{name}' raised {type(error).__name__}: {error}") from error

    @staticmethod
    def _as_row_rewards(name: str, num_rows: int, returned: Any) -> torch.Tensor:
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


class _ReportedValues:
    """What the reward functions of one batch pass to ``log_extra`` and ``log_metric``."""

    def __init__(self, num_rows: int) -> None:
        self.num_rows = num_rows
        self.columns: dict[str, list[Any]] = {}
        self.metrics: dict[str, list[float]] = {}
        self._lock = threading.Lock()  # async functions report from the event loop's thread

    def extra_logger(self, function_name: str) -> Callable[[str, Sequence[Any]], None]:
        def log_extra(column: str, values: Sequence[Any]) -> None:
            values = values.tolist() if hasattr(values, "tolist") else list(values)
            if not isinstance(column, str) or len(values) != self.num_rows:
                raise RewardFunctionError(
                    f"reward function '{function_name}' called log_extra({column!r:.40}, <{len(values)} values>); "
                    f"expected a column name (str) and one value per completion ({self.num_rows})"
                )
            with self._lock:
                if column in self.columns:
                    raise RewardFunctionError(
                        f"reward function '{function_name}' logged the extra column {column!r} a second time in one "
                        "batch; each column takes one value per completion, once. Fix: give each column its own name"
                    )
                self.columns[column] = values

        return log_extra

    def metric_logger(self, function_name: str) -> Callable[[str, float], None]:
        def log_metric(name: str, value: float) -> None:
            number = _as_float(value)
            if not isinstance(name, str) or value is None or number is None:
                raise RewardFunctionError(
                    f"reward function '{function_name}' called log_metric({name!r:.40}, {value!r:.40}); "
                    "expected a metric name (str) and one number"
                )
            with self._lock:
                self.metrics.setdefault(name, []).append(number)

        return log_metric


_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def _event_loop() -> asyncio.AbstractEventLoop:
    """The process's background event loop for async reward functions (started on first use, a daemon thread).

    A loop of its own, rather than ``asyncio.run`` per batch: it works where the caller already runs a
    loop (a notebook), and objects an async function created on an earlier call stay usable.
    """
    global _loop
    with _loop_lock:
        if _loop is None or _loop.is_closed():
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="posttrain-async-rewards", daemon=True).start()
        return _loop


def _await_concurrently(pending: list[tuple[int, str, Awaitable]]) -> list[tuple[int, str, Any, float]]:
    """Await every ``(column, name, awaitable)`` at once; ``(column, name, result, seconds)`` in the given order.

    All of them run to the end before the first failure (in the given order) is raised, named.
    """
    if not pending:
        return []

    async def timed(awaitable: Awaitable) -> tuple[Any, BaseException | None, float]:
        started = time.perf_counter()
        try:
            return await awaitable, None, time.perf_counter() - started
        except Exception as error:  # a user function may raise anything; reported with its name below
            return None, error, time.perf_counter() - started

    async def gather() -> list[tuple[Any, BaseException | None, float]]:
        return await asyncio.gather(*(timed(awaitable) for _, _, awaitable in pending))

    outcomes = asyncio.run_coroutine_threadsafe(gather(), _event_loop()).result()
    results = []
    for (column, name, _), (returned, error, seconds) in zip(pending, outcomes):
        if isinstance(error, RewardFunctionError):
            raise error
        if error is not None:
            raise RewardFunctionError(f"reward function '{name}' raised {type(error).__name__}: {error}") from error
        results.append((column, name, returned, seconds))
    return results


class _SlowCallWatchdog:
    """Warns when an armed call is still running at its deadline, from one background thread.

    Arming takes a lock and rarely a wake-up; starting a ``threading.Timer`` per call, as before, took
    from 0.05 to 4 ms on a busy 2-core machine, once per generation step. The thread ends after a
    minute unarmed and the next ``arm`` starts another.
    """

    IDLE_SECONDS = 60.0

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._armed: tuple[float, tuple] | None = None  # (deadline on the monotonic clock, logger.warning args)
        self._thread: threading.Thread | None = None
        self._wakes_at = math.inf  # when the thread's current wait ends by itself

    def arm(self, seconds: float, warning: tuple) -> None:
        with self._condition:
            deadline = time.monotonic() + seconds
            self._armed = (deadline, warning)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="posttrain-reward-watchdog", daemon=True)
                self._thread.start()
            elif deadline < self._wakes_at:
                # otherwise the thread wakes in time by itself, at an earlier call's deadline, and no
                # context switch is paid per call
                self._condition.notify()

    def disarm(self) -> None:
        with self._condition:
            self._armed = None  # no wake-up needed: the thread finds nothing armed at its deadline

    def _watch(self) -> None:
        with self._condition:
            while True:
                if self._armed is None:
                    self._wakes_at = math.inf
                    notified = self._condition.wait(self.IDLE_SECONDS)
                    if not notified and self._armed is None:
                        self._thread = None
                        return
                    continue
                deadline, warning = self._armed
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    self._wakes_at = deadline
                    self._condition.wait(remaining)
                    continue
                self._armed = None
                logger.warning(*warning)
