"""A tool-use task with ground truth per turn: a calculator and a shop's price list, called as tools.

A problem is a question whose answer needs one or two tool calls, with the oracle's call sequence:

==============  ==========================================  ===============================================
kind            question                                    oracle calls
==============  ==========================================  ===============================================
``add``         "What is 4821 + 3967?"                      ``add(a=4821, b=3967)``
``multiply``    "What is 347 * 29?"                         ``multiply(a=347, b=29)``
``price``       "How much does one kettle cost?"            ``lookup(item="kettle")``
``price_times`` "How much do 7 kettles cost?"               ``lookup(item="kettle")``, ``multiply(a=<price>, b=7)``
``price_sum``   "How much do one kettle and one lamp cost?" ``lookup(item="kettle")``, ``lookup(item="lamp")``,
                                                            ``add(a=<price 1>, b=<price 2>)``
==============  ==========================================  ===============================================

The tools are plain functions with type hints and Google-style docstrings (``transformers.utils.get_json_schema``
derives their schemas), usable as ``tools=[add, multiply, lookup]``; :class:`ToolUseEnv` offers the same
tools as methods of an environment (``reset(**row)``, ``get_reward()``, ``get_turn_rewards()``), and
:class:`ToolFaults` makes seeded slow or hanging variants for timeout tests.

Problems are split once into train and test by a stable hash of the kind and its arguments, as in
:class:`~posttrain.tasks.arithmetic.ArithmeticTask`. ``max_operand`` (the calculator's operand range) and
``kinds`` are the difficulty knobs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
import threading
import time
from typing import Any, Callable, Sequence

from datasets import Dataset, Features, Json, List

from posttrain.errors import ConfigError, DataError
from posttrain.tasks.arithmetic import extract_final_number
from posttrain.tasks.base import Problems, Task

KINDS = ("add", "multiply", "price", "price_times", "price_sum")
SPLITS = ("train", "test")
#: arguments of one problem per kind (to find the tools a kind calls)
_EXAMPLE: dict[str, tuple] = {"add": (1, 2), "multiply": (1, 2), "price": ("lamp",), "price_times": ("lamp", 2),
                              "price_sum": ("lamp", "rope")}

#: the shop's price list (whole units per item); fixed, so a lookup's answer never changes
INVENTORY: dict[str, int] = {
    "apple": 12, "lemon": 17, "pencil": 23, "candle": 31, "hammer": 46, "bottle": 19, "basket": 58, "helmet": 74,
    "lamp": 66, "blanket": 83, "kettle": 39, "mirror": 91, "ladder": 77, "shovel": 54, "wrench": 28, "magnet": 15,
    "button": 11, "ribbon": 14, "anchor": 96, "rope": 27,
}


# ----------------------------------------------------------------------------- the tools


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: first number.
        b: second number.
    """
    return int(a) + int(b)


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: first number.
        b: second number.
    """
    return int(a) * int(b)


def lookup(item: str) -> int:
    """Price of one item in the shop.

    Args:
        item: the item's name.
    """
    key = str(item).strip().lower()
    if key not in INVENTORY:
        raise KeyError(f"no item named {item!r}")
    return INVENTORY[key]


TOOLS: dict[str, Callable[..., int]] = {"add": add, "multiply": multiply, "lookup": lookup}


def tool_schemas(names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The JSON schemas of :data:`TOOLS`, or of the ones named in ``names`` (what a chat template renders
    in the system turn)."""
    from transformers.utils import get_json_schema

    return [get_json_schema(TOOLS[name]) for name in (TOOLS if names is None else names)]


class ToolFaults:
    """Seeded slowness and hangs for tool calls, for timeout tests.

    Call ``i`` (counted from 0 over this object's life) first sleeps ``delay_seconds``; it hangs when
    ``random.Random(f"{seed}|{i}").random() < hang_rate``: it blocks until :meth:`release` is called or
    ``hang_seconds`` pass, then returns its normal result. Which calls hang depends only on ``seed`` and
    the call's index, so a run is reproducible.
    """

    def __init__(self, delay_seconds: float = 0.0, hang_rate: float = 0.0, seed: int = 0,
                 hang_seconds: float = 60.0) -> None:
        if delay_seconds < 0 or not 0.0 <= hang_rate <= 1.0 or hang_seconds < 0:
            raise ConfigError(f"delay_seconds={delay_seconds}, hang_rate={hang_rate}, hang_seconds={hang_seconds}",
                              field="hang_rate", fix="use delay_seconds >= 0, 0 <= hang_rate <= 1, hang_seconds >= 0")
        self.delay_seconds, self.hang_rate, self.seed, self.hang_seconds = delay_seconds, hang_rate, seed, hang_seconds
        self.calls = 0
        self._released = threading.Event()
        self._lock = threading.Lock()

    def hangs(self, call_index: int) -> bool:
        return random.Random(f"{self.seed}|{call_index}").random() < self.hang_rate

    def release(self) -> None:
        """Let every hanging call (present and future) return."""
        self._released.set()

    def before_call(self) -> None:
        with self._lock:
            index, self.calls = self.calls, self.calls + 1
        if self.delay_seconds:
            time.sleep(self.delay_seconds)
        if self.hangs(index):
            self._released.wait(self.hang_seconds)

    def wrap(self, function: Callable[..., int]) -> Callable[..., int]:
        """``function`` with this object's delay and hangs; same name, signature and docstring (same schema)."""

        @functools.wraps(function)
        def faulty(*args: Any, **kwargs: Any) -> int:
            self.before_call()
            return function(*args, **kwargs)

        return faulty


def make_tools(faults: ToolFaults | None = None, names: Sequence[str] | None = None) -> list[Callable[..., int]]:
    """``[add, multiply, lookup]`` (or the ones named in ``names``), slowed or hanging as ``faults`` says (as
    they are when it is None)."""
    functions = [TOOLS[name] for name in (TOOLS if names is None else names)]
    return [faults.wrap(f) if faults else f for f in functions]


# ----------------------------------------------------------------------------- completions


_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_UNCLOSED_CALL = re.compile(r"<tool_call>.*", re.DOTALL)


def parse_tool_calls(text: str) -> list[dict[str, Any] | None]:
    """The ``{"name", "arguments"}`` of every ``<tool_call>`` block in ``text``; None for a block that is
    not a JSON object with a string ``name`` and an object ``arguments``."""
    calls: list[dict[str, Any] | None] = []
    for body in _TOOL_CALL.findall(text or ""):
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            calls.append(None)
            continue
        ok = isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(call.get("arguments"), dict)
        calls.append({"name": call["name"], "arguments": call["arguments"]} if ok else None)
    return calls


def strip_tool_calls(text: str) -> str:
    """``text`` without its tool-call blocks (closed or not): what is left is prose and answers."""
    return _UNCLOSED_CALL.sub("", _TOOL_CALL.sub("", text or ""))


def _message_calls(message: dict[str, Any]) -> list[dict[str, Any] | None]:
    calls: list[dict[str, Any] | None] = []
    for call in message.get("tool_calls") or []:
        function = call.get("function", call) if isinstance(call, dict) else None
        arguments = function.get("arguments") if isinstance(function, dict) else None
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = None
        ok = isinstance(function, dict) and isinstance(function.get("name"), str) and isinstance(arguments, dict)
        calls.append({"name": function["name"], "arguments": arguments} if ok else None)
    return calls + parse_tool_calls(message.get("content") or "")


def completion_calls(completion: Any) -> list[dict[str, Any] | None]:
    """Every tool call of a completion, in order: text (``<tool_call>`` blocks) or a message list
    (assistant ``tool_calls``, parsed or JSON strings, and blocks left in assistant content)."""
    if isinstance(completion, str):
        return parse_tool_calls(completion)
    return [call for message in completion or [] if message.get("role") == "assistant"
            for call in _message_calls(message)]


def final_answer_text(completion: Any) -> str:
    """The text of the completion's last assistant turn that makes no tool call ('' when there is none).

    For text, the part after the last tool call or tool result, without tool-call blocks."""
    if isinstance(completion, str):
        tail = re.split(r"</tool_call>|<\|im_start\|>tool|<tool_response>", completion)[-1]
        return strip_tool_calls(tail)
    for message in reversed(completion or []):
        if message.get("role") != "assistant":
            continue
        if _message_calls(message):
            return ""
        content = message.get("content") or ""
        return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)
    return ""


def _same_value(left: Any, right: Any) -> bool:
    try:
        return float(left) == float(right)
    except (TypeError, ValueError):
        return str(left).strip().lower() == str(right).strip().lower()


def same_call(call: dict[str, Any] | None, oracle: dict[str, Any]) -> bool:
    """Whether ``call`` is the oracle's call: same tool name, same argument names, equal values
    (numbers compared as numbers, names case-insensitively)."""
    if call is None or call["name"] != oracle["name"] or set(call["arguments"]) != set(oracle["arguments"]):
        return False
    return all(_same_value(call["arguments"][key], value) for key, value in oracle["arguments"].items())


def turn_rewards(calls: Sequence[dict[str, Any] | None], oracle_calls: Sequence[dict[str, Any]]) -> list[float]:
    """Per-turn ground truth: 1.0 where call ``i`` is the oracle's call ``i``, else 0.0, one entry per
    turn of the longer of the two sequences (a missing or extra call scores 0)."""
    return [float(i < len(calls) and i < len(oracle_calls) and same_call(calls[i], oracle_calls[i]))
            for i in range(max(len(calls), len(oracle_calls)))]


def _oracle(value: Any) -> list[dict[str, Any]]:
    return json.loads(value) if isinstance(value, str) else list(value)


# ----------------------------------------------------------------------------- reward functions (TRL signature)


def tool_answer_reward(completions: list[Any], answer: list[Any], **kwargs: Any) -> list[float]:
    """1.0 when the final answer (last assistant turn without a tool call) equals ``answer``, else 0.0."""
    rewards = []
    for completion, expected in zip(completions, answer):
        found = extract_final_number(final_answer_text(completion))
        rewards.append(float(found is not None and abs(found - float(expected)) < 1e-9))
    return rewards


def tool_format_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """1.0 when every tool call parses and names a known tool with its argument names, at least one call
    is made, and a final answer with a number follows; else 0.0."""
    rewards = []
    for completion in completions:
        calls = completion_calls(completion)
        well_formed = bool(calls) and all(
            call is not None and call["name"] in TOOLS
            and set(call["arguments"]) == set(_parameters(call["name"])) for call in calls)
        rewards.append(float(well_formed and extract_final_number(final_answer_text(completion)) is not None))
    return rewards


def tool_call_reward(completions: list[Any], oracle_calls: list[Any], **kwargs: Any) -> list[float]:
    """The mean of :func:`turn_rewards`: the share of turns whose call is the oracle's (1.0 for the oracle)."""
    rewards = []
    for completion, oracle in zip(completions, oracle_calls):
        per_turn = turn_rewards(completion_calls(completion), _oracle(oracle))
        rewards.append(sum(per_turn) / len(per_turn) if per_turn else 1.0)
    return rewards


@functools.lru_cache(maxsize=None)
def _parameters(name: str) -> tuple[str, ...]:
    import inspect

    return tuple(inspect.signature(TOOLS[name]).parameters)


# ----------------------------------------------------------------------------- the environment


class ToolUseEnv:
    """One episode's tools, for ``environment_factory``-style trainers and for evaluation.

    ``reset(**row)`` starts an episode from a dataset row (it reads ``oracle_calls`` when present); the
    public methods ``add``, ``multiply`` and ``lookup`` are the tools (same schemas as the functions);
    each call is recorded. ``get_reward()`` is the share of the oracle's calls matched turn by turn and
    ``get_turn_rewards()`` the per-turn list (see :func:`turn_rewards`). ``faults`` slows or hangs calls.
    """

    def __init__(self, faults: ToolFaults | None = None) -> None:
        self.faults = faults
        self.calls: list[dict[str, Any]] = []
        self.results: list[Any] = []
        self.oracle_calls: list[dict[str, Any]] = []

    def reset(self, **row: Any) -> None:
        self.calls, self.results = [], []
        self.oracle_calls = _oracle(row["oracle_calls"]) if row.get("oracle_calls") is not None else []

    def _run(self, name: str, **arguments: Any) -> int:
        self.calls.append({"name": name, "arguments": arguments})
        if self.faults is not None:
            self.faults.before_call()
        result = TOOLS[name](**arguments)
        self.results.append(result)
        return result

    def add(self, a: int, b: int) -> int:
        return self._run("add", a=a, b=b)

    def multiply(self, a: int, b: int) -> int:
        return self._run("multiply", a=a, b=b)

    def lookup(self, item: str) -> int:
        return self._run("lookup", item=item)

    add.__doc__, multiply.__doc__, lookup.__doc__ = (TOOLS[name].__doc__ for name in ("add", "multiply", "lookup"))

    def call(self, name: str, arguments: dict[str, Any]) -> str:
        """Run tool ``name`` and return the text a tool message carries; an unknown tool, bad arguments or
        an exception become an ``error: ...`` text for the model, never an exception."""
        if name not in TOOLS:
            return f"error: unknown tool {name!r}; the tools are {', '.join(TOOLS)}"
        try:
            return json.dumps(getattr(self, name)(**arguments))
        except Exception as error:  # noqa: BLE001 - a tool's failure is reported to the model
            return f"error: {type(error).__name__}: {error}"

    def get_turn_rewards(self) -> list[float]:
        return turn_rewards(self.calls, self.oracle_calls)

    def get_reward(self) -> float:
        per_turn = self.get_turn_rewards()
        return sum(per_turn) / len(per_turn) if per_turn else 1.0


# ----------------------------------------------------------------------------- the task


class ToolUseTask(Task):
    """Questions answered with the calculator and price-list tools; see the module docstring.

    Args:
        max_operand: largest operand of ``add``/``multiply`` questions (smallest: ``min_operand``).
        kinds: which kinds of question to draw, uniformly.
        seed: fixes which problems belong to the test split.
        min_operand: smallest calculator operand.
        max_quantity: largest count in ``price_times`` questions (from 2).
        test_fraction: share of the problem space reserved for the test split.
    """

    name = "tool_use"

    def __init__(self, max_operand: int = 999, kinds: Sequence[str] = KINDS, seed: int = 0, *,
                 min_operand: int = 10, max_quantity: int = 20, test_fraction: float = 0.2) -> None:
        kinds = tuple(kinds)
        if not kinds or any(kind not in KINDS for kind in kinds):
            raise ConfigError(f"unknown kinds {kinds!r}", field="kinds", fix=f"choose from {KINDS}")
        if min_operand < 0 or max_operand < min_operand or max_quantity < 2:
            raise ConfigError(f"operand range [{min_operand}, {max_operand}] or max_quantity {max_quantity} is empty",
                              field="max_operand", fix="use 0 <= min_operand <= max_operand and max_quantity >= 2")
        if not 0.0 < test_fraction < 1.0:
            raise ConfigError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}",
                              field="test_fraction", fix="use e.g. 0.2")
        self.max_operand, self.min_operand, self.max_quantity = max_operand, min_operand, max_quantity
        self.kinds, self.seed, self.test_fraction = kinds, seed, test_fraction

    def __repr__(self) -> str:
        return f"ToolUseTask(max_operand={self.max_operand}, kinds={self.kinds}, seed={self.seed})"

    # ------------------------------------------------------------------ problems

    def split_of(self, kind: str, arguments: tuple) -> str:
        """``"train"`` or ``"test"``: a stable hash of the problem and the task seed decides."""
        digest = hashlib.blake2b(f"{self.seed}|{kind}|{arguments}".encode(), digest_size=8).digest()
        return "test" if int.from_bytes(digest, "big") / 2**64 < self.test_fraction else "train"

    def _draw(self, kind: str, rng: random.Random) -> tuple:
        items = sorted(INVENTORY)
        if kind in ("add", "multiply"):
            return rng.randint(self.min_operand, self.max_operand), rng.randint(self.min_operand, self.max_operand)
        if kind == "price":
            return (rng.choice(items),)
        if kind == "price_times":
            return rng.choice(items), rng.randint(2, self.max_quantity)
        return tuple(rng.sample(items, 2))

    @staticmethod
    def problem(kind: str, arguments: tuple) -> dict[str, Any]:
        """The question, answer and oracle calls of one problem (``kind`` with its drawn ``arguments``)."""
        if kind in ("add", "multiply"):
            a, b = arguments
            question = f"What is {a} {'+' if kind == 'add' else '*'} {b}?"
            calls = [{"name": kind, "arguments": {"a": a, "b": b}}]
        elif kind == "price":
            question = f"How much does one {arguments[0]} cost?"
            calls = [{"name": "lookup", "arguments": {"item": arguments[0]}}]
        elif kind == "price_times":
            item, count = arguments
            question = f"How much do {count} {item}s cost?"
            calls = [{"name": "lookup", "arguments": {"item": item}},
                     {"name": "multiply", "arguments": {"a": INVENTORY[item], "b": count}}]
        else:
            first, second = arguments
            question = f"How much do one {first} and one {second} cost?"
            calls = [{"name": "lookup", "arguments": {"item": first}},
                     {"name": "lookup", "arguments": {"item": second}},
                     {"name": "add", "arguments": {"a": INVENTORY[first], "b": INVENTORY[second]}}]
        results = [TOOLS[call["name"]](**call["arguments"]) for call in calls]
        return {"question": question, "answer": results[-1], "kind": kind, "oracle_calls": json.dumps(calls)}

    def make_problems(self, n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
        """``n`` problems ``{"question", "answer", "kind", "oracle_calls"}`` (calls as a JSON string) from one
        split; deterministic in ``(task, n, seed, split)``. Kinds are drawn uniformly, then arguments."""
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}", field="split", fix="use 'train' or 'test'")
        if n < 0:
            raise ConfigError(f"cannot make {n} problems", field="n", fix="ask for n >= 0")
        rng = random.Random(f"tool_use|{seed}|{split}")
        problems: list[dict[str, Any]] = []
        attempts = 0
        while len(problems) < n:
            attempts += 1
            if attempts > 1000 * (n + 10):
                raise ConfigError(f"the {split} split of {self!r} is too small to draw from", field="test_fraction",
                                  fix="widen max_operand, add kinds, or change test_fraction")
            kind = rng.choice(self.kinds)
            arguments = self._draw(kind, rng)
            if self.split_of(kind, arguments) == split:
                problems.append(self.problem(kind, arguments))
        return problems

    def tool_names(self) -> tuple[str, ...]:
        """The tools this task's kinds call, in :data:`TOOLS` order (a one-kind task offers fewer schemas,
        so its prompts are shorter)."""
        needed = {call["name"] for kind in self.kinds
                  for call in json.loads(self.problem(kind, _EXAMPLE[kind])["oracle_calls"])}
        return tuple(name for name in TOOLS if name in needed)

    def environment(self, faults: ToolFaults | None = None) -> ToolUseEnv:
        """A fresh :class:`ToolUseEnv` (the ``environment_factory`` of this task)."""
        return ToolUseEnv(faults)

    # ------------------------------------------------------------------ checking

    def format_answer(self, answer: Any) -> str:
        return str(answer)

    def check(self, completion: Any, answer: Any) -> bool:
        """Whether the final answer (see :func:`final_answer_text`) is the number ``answer``."""
        return tool_answer_reward([completion], [answer])[0] == 1.0

    def wrong_answer(self, problem: dict[str, Any], rng: random.Random) -> int:
        return int(problem["answer"]) + rng.choice([-10, -2, -1, 1, 2, 10])

    # ------------------------------------------------------------------ builders

    def oracle_messages(self, problem: dict[str, Any], system_prompt: str | None = None) -> list[dict[str, Any]]:
        """The oracle's conversation: the question, one assistant turn per tool call (each followed by its
        tool result), then the assistant's answer."""
        messages: list[dict[str, Any]] = self.chat_prompt(problem, system_prompt)
        for call in _oracle(problem["oracle_calls"]):
            messages.append({"role": "assistant", "content": "",
                             "tool_calls": [{"type": "function", "function": call}]})
            messages.append({"role": "tool", "name": call["name"],
                             "content": json.dumps(TOOLS[call["name"]](**call["arguments"]))})
        messages.append({"role": "assistant", "content": self.format_answer(problem["answer"])})
        return messages

    def as_tool_messages(self, problems: Problems, *, system_prompt: str | None = None, split: str = "train",
                         seed: int = 0) -> Dataset:
        """Columns ``messages`` (the oracle conversation) and ``tools`` (the schemas): conversational SFT
        rows with tool calls. Both are stored as JSON values, so each row keeps its own argument names."""
        rows = self._resolve(problems, split, seed)
        schemas = tool_schemas(self.tool_names())
        return Dataset.from_dict(
            {"messages": [self.oracle_messages(p, system_prompt) for p in rows], "tools": [schemas] * len(rows)},
            features=Features({"messages": List(Json()), "tools": List(Json())}),
        )

    def as_turn_completions(self, problems: Problems, tokenizer: Any, *, system_prompt: str | None = None,
                            split: str = "train", seed: int = 0, tool_names: Sequence[str] | None = None) -> Dataset:
        """Text ``prompt``/``completion`` rows, one per assistant turn of each oracle conversation: the
        prompt is everything the template renders before the turn (tool schemas, question, earlier calls and
        tool results), the completion is the turn. SFT on them trains the assistant's calls and answers, never
        the tool results, with any trainer that reads prompt/completion text. ``tool_names`` picks the schemas
        the prompts render (default :meth:`tool_names`; ``()`` renders none, a short prompt)."""
        from posttrain.data.templates import render_prompt_completion

        rows = self._resolve(problems, split, seed)
        schemas = tool_schemas(self.tool_names() if tool_names is None else tool_names) or None
        prompts, completions = [], []
        for problem in rows:
            messages = self.oracle_messages(problem, system_prompt)
            for index, message in enumerate(messages):
                if message["role"] == "assistant":
                    prompt, completion = render_prompt_completion(tokenizer, messages[:index], [message], tools=schemas)
                    prompts.append(prompt)
                    completions.append(completion)
        return Dataset.from_dict({"prompt": prompts, "completion": completions})

    def as_prompt_only(self, problems: Problems, *, conversational: bool = True, system_prompt: str | None = None,
                       split: str = "train", seed: int = 0) -> Dataset:
        """Columns ``prompt``, ``answer``, ``kind`` and ``oracle_calls`` (JSON), for GRPO with ``tools=``
        and for evaluation; the reward functions read ``answer`` and ``oracle_calls``."""
        rows = self._resolve(problems, split, seed)
        if not conversational:
            raise DataError("tool-use prompts are conversations (the chat template renders the tools)",
                            source=self.name, fix="call as_prompt_only with conversational=True")
        return Dataset.from_dict({
            "prompt": [self.chat_prompt(p, system_prompt) for p in rows],
            "answer": [p["answer"] for p in rows],
            "kind": [p["kind"] for p in rows],
            "oracle_calls": [p["oracle_calls"] for p in rows],
        })
