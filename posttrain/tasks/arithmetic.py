"""Small-number arithmetic: a task with a checkable answer, in every dataset format posttrain reads.

A problem is ``a <op> b`` with operands in ``[min_operand, max_operand]``. The whole problem space
is split once, by a stable hash of each problem, into a train part and a test part, so no test
question is ever seen in training. ``max_operand`` is the difficulty knob: with 10 (the default)
the ``small`` tiny model, trained from scratch, answers about half of the unseen test problems after
a minute or two of SFT on a CPU, leaving room for RL; 15 and 20 are markedly harder.
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Any, Sequence

from posttrain.errors import ConfigError, DataError
from posttrain.tasks.base import Task

SUPPORTED_OPS = ("+", "-", "*")
SPLITS = ("train", "test")
_ENUMERATE_LIMIT = 200_000  # problem spaces up to this size are enumerated; larger ones are sampled

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
# An integer or decimal, optionally signed and with thousands groups ("1,234"). A sign counts only when
# it does not follow a word character, so "12-5" reads as 12 and 5, while "= -5" reads as -5.
_NUMBER = re.compile(r"(?:(?<![\w.])[-+\u2212])?(?<![\d.])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def extract_final_number(text: str | None) -> float | None:
    """The last number in ``text``, or in its last ``<answer>...</answer>`` block when there is one.

    Tolerates whitespace, a leading '+', a Unicode minus, thousands commas and trailing punctuation.
    Returns ``None`` when no number is found.
    """
    if not text:
        return None
    blocks = _ANSWER_BLOCK.findall(text)
    if blocks:
        text = blocks[-1]
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    token = matches[-1].replace("\u2212", "-").replace(",", "")
    return float(token)


class ArithmeticTask(Task):
    """Addition / subtraction (and optionally multiplication) of small integers.

    Args:
        max_operand: largest operand (inclusive); the difficulty knob.
        ops: operators to draw from, any of ``+``, ``-``, ``*``.
        seed: fixes which problems belong to the test split (not the order they are drawn in).
        min_operand: smallest operand (inclusive).
        allow_negative: when False, subtraction keeps ``a >= b`` so every answer is >= 0.
        test_fraction: share of the problem space reserved for the test split.
        answer_format: ``"plain"`` completions are the number (``"19"``); ``"tagged"`` wraps it
            as ``"<answer>19</answer>"``.
    """

    name = "arithmetic"

    def __init__(
        self,
        max_operand: int = 10,
        ops: Sequence[str] = ("+", "-"),
        seed: int = 0,
        *,
        min_operand: int = 0,
        allow_negative: bool = False,
        test_fraction: float = 0.2,
        answer_format: str = "plain",
    ) -> None:
        ops = tuple(ops)
        if not ops or any(op not in SUPPORTED_OPS for op in ops):
            raise ConfigError(f"unsupported operators {ops!r}", field="ops", fix=f"choose from {SUPPORTED_OPS}")
        if min_operand < 0 or max_operand < min_operand:
            raise ConfigError(f"operand range [{min_operand}, {max_operand}] is empty or negative",
                              field="max_operand", fix="use 0 <= min_operand <= max_operand")
        if not 0.0 < test_fraction < 1.0:
            raise ConfigError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}",
                              field="test_fraction", fix="use e.g. 0.2")
        if answer_format not in ("plain", "tagged"):
            raise ConfigError(f"unknown answer_format {answer_format!r}", field="answer_format", fix="use 'plain' or 'tagged'")
        self.max_operand = max_operand
        self.min_operand = min_operand
        self.ops = ops
        self.seed = seed
        self.allow_negative = allow_negative
        self.test_fraction = test_fraction
        self.answer_format = answer_format

    def __repr__(self) -> str:
        return (f"ArithmeticTask(max_operand={self.max_operand}, ops={self.ops}, seed={self.seed}, "
                f"min_operand={self.min_operand}, allow_negative={self.allow_negative})")

    # ------------------------------------------------------------------ problems

    def _valid(self, a: int, op: str, b: int) -> bool:
        return self.allow_negative or op != "-" or a >= b

    def split_of(self, a: int, op: str, b: int) -> str:
        """``"train"`` or ``"test"``: a stable hash of the problem and the task seed decides."""
        digest = hashlib.blake2b(f"{self.seed}|{a}{op}{b}".encode(), digest_size=8).digest()
        return "test" if int.from_bytes(digest, "big") / 2**64 < self.test_fraction else "train"

    def problem_space_size(self) -> int:
        n = self.max_operand - self.min_operand + 1
        size = 0
        for op in self.ops:
            size += n * (n + 1) // 2 if (op == "-" and not self.allow_negative) else n * n
        return size

    def split_size(self, split: str) -> int:
        """How many distinct problems ``split`` holds (``make_problems(split_size(split))`` deals each once)."""
        return len(self._pool(split))

    def _problem(self, a: int, op: str, b: int) -> dict[str, Any]:
        value = a + b if op == "+" else a - b if op == "-" else a * b
        return {"question": f"What is {a} {op} {b}?", "answer": value}

    def _pool(self, split: str) -> list[tuple[int, str, int]]:
        span = range(self.min_operand, self.max_operand + 1)
        return [(a, op, b) for op in self.ops for a in span for b in span
                if self._valid(a, op, b) and self.split_of(a, op, b) == split]

    def make_problems(self, n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
        """``n`` problems ``{"question": "What is 7 + 12?", "answer": 19}`` from one split.

        Deterministic in ``(task, n, seed, split)``. For spaces small enough to enumerate, the split's
        problems are shuffled and dealt out in full before any repeats (each pass reshuffled), so the
        first ``len(split)`` problems are distinct; larger spaces are sampled at random.
        """
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}", field="split", fix="use 'train' or 'test'")
        if n < 0:
            raise ConfigError(f"cannot make {n} problems", field="n", fix="ask for n >= 0")
        rng = random.Random(f"arithmetic|{seed}|{split}")
        chosen: list[tuple[int, str, int]] = []
        if self.problem_space_size() <= _ENUMERATE_LIMIT:
            pool = self._pool(split)
            if not pool:
                raise ConfigError(f"the {split} split of {self!r} is empty", field="test_fraction",
                                  fix="widen the operand range or change test_fraction")
            while len(chosen) < n:
                order = pool[:]
                rng.shuffle(order)
                chosen.extend(order[: n - len(chosen)])
        else:
            while len(chosen) < n:
                a = rng.randint(self.min_operand, self.max_operand)
                b = rng.randint(self.min_operand, self.max_operand)
                op = rng.choice(self.ops)
                if self._valid(a, op, b) and self.split_of(a, op, b) == split:
                    chosen.append((a, op, b))
        return [self._problem(a, op, b) for a, op, b in chosen]

    # ------------------------------------------------------------------ checking

    def format_answer(self, answer: Any) -> str:
        """The completion text a perfect model would write."""
        text = str(answer)
        return f"<answer>{text}</answer>" if self.answer_format == "tagged" else text

    def check(self, completion: str | None, answer: Any) -> bool:
        """Whether the final number in ``completion`` (see :func:`extract_final_number`) equals ``answer``."""
        found = extract_final_number(completion)
        if found is None:
            return False
        expected = answer if isinstance(answer, (int, float)) else extract_final_number(str(answer))
        return expected is not None and abs(found - float(expected)) < 1e-9

    def wrong_answer(self, problem: dict[str, Any], rng: random.Random) -> int:
        """A plausible wrong answer: off by one or two, off by ten, digits swapped, or the other operator."""
        value = int(problem["answer"])
        a, op, b = _parse_question(problem["question"])
        candidates = [value + 1, value - 1, value + 2, value - 2, value + 10, value - 10]
        digits = str(abs(value))
        if len(digits) >= 2 and digits[-1] != digits[-2]:
            swapped = int(digits[:-2] + digits[-1] + digits[-2])
            candidates += [swapped if value >= 0 else -swapped] * 2  # weight the classic slip
        if op in ("+", "-"):
            candidates.append(a - b if op == "+" else a + b)
        plausible = [c for c in candidates if c != value and (self.allow_negative or c >= 0)]
        return rng.choice(plausible or [value + 1])


_QUESTION = re.compile(r"What is (\d+) ([-+*]) (\d+)\?")


def _parse_question(question: str) -> tuple[int, str, int]:
    match = _QUESTION.fullmatch(question)
    if match is None:
        raise DataError("not an arithmetic question", source="arithmetic problems", column="question",
                        expected="'What is <a> <op> <b>?'", found=question,
                        fix="pass problems made by ArithmeticTask.make_problems")
    return int(match.group(1)), match.group(2), int(match.group(3))
