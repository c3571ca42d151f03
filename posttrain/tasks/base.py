"""What every embedded task offers: deterministic problems with checkable answers, and builders that
turn them into a ``datasets.Dataset`` in each format posttrain's trainers read.

A task implements :meth:`Task.make_problems` (dicts with ``question`` and ``answer``),
:meth:`Task.check`, :meth:`Task.format_answer` and :meth:`Task.wrong_answer`; the builders here do the rest.

Formats and their columns:

=========================  ==============================  ==========================================
builder                    columns                         used by
=========================  ==============================  ==========================================
``as_text``                ``text``                        SFT (language modeling)
``as_prompt_completion``   ``prompt``, ``completion``      SFT (loss on the completion)
``as_messages``            ``messages``                    SFT (conversational)
``as_preference``          ``prompt``, ``chosen``,         reward modeling, DPO family
                           ``rejected``
``as_unpaired_preference`` ``prompt``, ``completion``,     KTO-style methods
                           ``label``
``as_prompt_only``         ``prompt``, ``answer``          GRPO, RLOO, PPO, online DPO, evaluation
=========================  ==============================  ==========================================
"""

from __future__ import annotations

import random
from typing import Any, Union

from datasets import Dataset

from posttrain.errors import DataError

Problems = Union[int, list[dict[str, Any]]]
Message = dict[str, str]


class Task:
    """Base class of embedded tasks. Subclasses set ``name`` and implement the four methods below."""

    name = "task"
    # the plain-text prompt template; the model continues after "Answer:"
    text_prompt_template = "Question: {question}\nAnswer:"

    def make_problems(self, n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
        raise NotImplementedError

    def check(self, completion: str | None, answer: Any) -> bool:
        raise NotImplementedError

    def format_answer(self, answer: Any) -> str:
        raise NotImplementedError

    def wrong_answer(self, problem: dict[str, Any], rng: random.Random) -> Any:
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers

    def _resolve(self, problems: Problems, split: str, seed: int) -> list[dict[str, Any]]:
        if isinstance(problems, int):
            return self.make_problems(problems, seed=seed, split=split)
        for row, problem in enumerate(problems):
            if not isinstance(problem, dict) or "question" not in problem or "answer" not in problem:
                raise DataError("a problem must be a dict with 'question' and 'answer'", source=f"{self.name} problems",
                                row=row, expected="{'question': str, 'answer': ...}", found=problem,
                                fix=f"pass an int or the output of {type(self).__name__}.make_problems")
        return list(problems)

    def text_prompt(self, problem: dict[str, Any]) -> str:
        return self.text_prompt_template.format(question=problem["question"])

    def chat_prompt(self, problem: dict[str, Any], system_prompt: str | None = None) -> list[Message]:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return messages + [{"role": "user", "content": problem["question"]}]

    def _prompt(self, problem: dict[str, Any], conversational: bool, system_prompt: str | None):
        return self.chat_prompt(problem, system_prompt) if conversational else self.text_prompt(problem)

    @staticmethod
    def _completion(text: str, conversational: bool):
        return [{"role": "assistant", "content": text}] if conversational else " " + text

    def _wrong_rng(self, seed: int, split: str) -> random.Random:
        return random.Random(f"{self.name}|wrong|{seed}|{split}")

    # ------------------------------------------------------------------ builders

    def as_text(self, problems: Problems, *, split: str = "train", seed: int = 0) -> Dataset:
        """Column ``text``: ``"Question: What is 7 + 12?\\nAnswer: 19"``."""
        rows = self._resolve(problems, split, seed)
        return Dataset.from_dict({"text": [self.text_prompt(p) + " " + self.format_answer(p["answer"]) for p in rows]})

    def as_prompt_completion(
        self, problems: Problems, *, conversational: bool = True, system_prompt: str | None = None,
        split: str = "train", seed: int = 0,
    ) -> Dataset:
        """Columns ``prompt``, ``completion``: message lists when ``conversational``, else strings."""
        rows = self._resolve(problems, split, seed)
        return Dataset.from_dict({
            "prompt": [self._prompt(p, conversational, system_prompt) for p in rows],
            "completion": [self._completion(self.format_answer(p["answer"]), conversational) for p in rows],
        })

    def as_messages(
        self, problems: Problems, *, system_prompt: str | None = None, split: str = "train", seed: int = 0
    ) -> Dataset:
        """Column ``messages``: ``[system?, user question, assistant answer]``."""
        rows = self._resolve(problems, split, seed)
        return Dataset.from_dict({
            "messages": [self.chat_prompt(p, system_prompt) + [{"role": "assistant", "content": self.format_answer(p["answer"])}]
                         for p in rows]
        })

    def as_preference(
        self, problems: Problems, *, conversational: bool = True, system_prompt: str | None = None,
        split: str = "train", seed: int = 0, rejected: str = "plausible",
    ) -> Dataset:
        """Columns ``prompt``, ``chosen`` (the correct answer) and ``rejected``.

        ``rejected="plausible"``: a plausible wrong answer (:meth:`wrong_answer`, e.g. off by one).
        ``rejected="other_answer"``: the correct answer of another problem in ``problems``. Plausible
        wrong answers are not distributed like correct ones (some numbers are rejected more often than
        they are right), so a reward model trained on them alone can learn to like or dislike a number
        for itself; with other problems' answers, only the match between question and answer separates
        chosen from rejected. Mixing both kinds makes a better judge.
        """
        if rejected not in ("plausible", "other_answer"):
            raise DataError(f"unknown rejected={rejected!r}", column="rejected",
                            fix="use rejected='plausible' or rejected='other_answer'")
        rows = self._resolve(problems, split, seed)
        if rejected == "plausible":
            rng = self._wrong_rng(seed, split)
            wrong = [self.wrong_answer(p, rng) for p in rows]
        else:
            if len({p["answer"] for p in rows}) < 2:
                raise DataError("rejected='other_answer' needs problems with at least two different answers",
                                column="rejected", fix="pass more problems, or use rejected='plausible'")
            rng = random.Random(seed)
            wrong = []
            for problem in rows:
                other = rng.choice(rows)
                while other["answer"] == problem["answer"]:
                    other = rng.choice(rows)
                wrong.append(other["answer"])
        return Dataset.from_dict({
            "prompt": [self._prompt(p, conversational, system_prompt) for p in rows],
            "chosen": [self._completion(self.format_answer(p["answer"]), conversational) for p in rows],
            "rejected": [self._completion(self.format_answer(answer), conversational) for answer in wrong],
        })

    def as_unpaired_preference(
        self, problems: Problems, *, conversational: bool = True, system_prompt: str | None = None,
        split: str = "train", seed: int = 0,
    ) -> Dataset:
        """Columns ``prompt``, ``completion``, ``label``: two rows per problem, the correct answer
        (``label=True``) then a plausible wrong one (``label=False``)."""
        rows = self._resolve(problems, split, seed)
        rng = self._wrong_rng(seed, split)
        prompts, completions, labels = [], [], []
        for p in rows:
            prompt = self._prompt(p, conversational, system_prompt)
            for answer, label in ((p["answer"], True), (self.wrong_answer(p, rng), False)):
                prompts.append(prompt)
                completions.append(self._completion(self.format_answer(answer), conversational))
                labels.append(label)
        return Dataset.from_dict({"prompt": prompts, "completion": completions, "label": labels})

    def as_prompt_only(
        self, problems: Problems, *, conversational: bool = True, system_prompt: str | None = None,
        split: str = "train", seed: int = 0,
    ) -> Dataset:
        """Columns ``prompt`` and ``answer`` (what :meth:`check` compares against), for online methods."""
        rows = self._resolve(problems, split, seed)
        return Dataset.from_dict({
            "prompt": [self._prompt(p, conversational, system_prompt) for p in rows],
            "answer": [p["answer"] for p in rows],
        })
