"""Evaluation of saved models, several side by side: what ``posttrain eval`` runs.

Four kinds of figure, each a function of loaded models and plain rows:

* :func:`evaluate_generations`: sample completions on prompts (greedy, and ``k`` draws when asked),
  score them with reward functions; rates with Wilson intervals, pass@k, and the mean score of a
  reward model.
* :func:`win_rates`: per-prompt reward-model scores of each model against a baseline's.
* :func:`evaluate_preferences`: pairwise accuracy and mean margin of a reward model, or of a DPO
  policy's implicit reward against its reference.
* :func:`evaluate_language_modeling`: per-token NLL and perplexity on SFT-format rows.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from posttrain.errors import ConfigError
from posttrain.eval.stats import mean_interval, pass_at_k, wilson_interval, win_rate

logger = logging.getLogger("posttrain")

POLICY = "policy"
REWARD_MODEL = "reward_model"


@dataclass
class EvalModel:
    """A loaded model under evaluation.

    ``kind`` is ``"policy"`` (a causal LM, possibly with a PEFT adapter) or ``"reward_model"`` (a
    sequence classifier with one label).
    """

    name: str
    model: torch.nn.Module
    tokenizer: Any
    kind: str
    source: str


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _architectures(source: str) -> list[str]:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read a model config at {source!r}: {str(error).splitlines()[0]}", field="model",
                          fix="pass a saved model directory (with config.json), a PEFT adapter directory, "
                              "or a hub id in the local cache") from None
    return list(getattr(config, "architectures", None) or [])


def is_sequence_classifier(source: str) -> bool:
    """True when the saved model at ``source`` is a sequence classifier (a reward model)."""
    return any(name.endswith("ForSequenceClassification") for name in _architectures(source))


def load_eval_model(source: str, *, name: str | None = None, device: str | torch.device = "cpu") -> EvalModel:
    """Load a model directory, a PEFT adapter directory or a hub id for evaluation, in eval mode.

    Sequence classifiers load as reward models; anything else as a causal LM. An adapter directory
    (``adapter_config.json``) loads its base model, then the adapter on top.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from posttrain.models.packed_attention import use_packed_attention

    name = name or os.path.basename(str(source).rstrip("/")) or str(source)
    adapter = _read_json(os.path.join(source, "adapter_config.json")) if os.path.isdir(source) else None
    base = adapter.get("base_model_name_or_path") if adapter else source
    if adapter and not base:
        raise ConfigError(f"the adapter at {source!r} does not name its base model", field="model",
                          fix="set base_model_name_or_path in adapter_config.json")
    kind = REWARD_MODEL if is_sequence_classifier(base) else POLICY
    auto_class = AutoModelForSequenceClassification if kind == REWARD_MODEL else AutoModelForCausalLM
    try:
        model = auto_class.from_pretrained(base, dtype=torch.float32)
        tokenizer_source = source if os.path.isfile(os.path.join(source, "tokenizer_config.json")) else base
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot load model {source!r}: {str(error).splitlines()[0]}", field="model",
                          fix="pass a directory saved with save_pretrained, or a hub id in the local cache") from None
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # long padded batches (log-probs, reward scores) then run as one packed row, without a (B, 1, L, L) mask
    use_packed_attention(model)
    return EvalModel(name=name, model=model.to(device).eval(), tokenizer=tokenizer, kind=kind, source=str(source))


def check_same_vocabulary(first: EvalModel, second: EvalModel, why: str) -> None:
    """Models compared token by token must share one tokenizer's vocabulary."""
    if first.tokenizer.get_vocab() != second.tokenizer.get_vocab():
        raise ConfigError(
            f"{first.name!r} and {second.name!r} have different tokenizers, so {why}",
            field="ref_model", fix="compare models trained from the same base (the same tokenizer)",
        )


# ----------------------------------------------------------------------------- generation


@dataclass
class Generations:
    """Completions of one model on ``P`` prompts: one greedy each, and ``k`` sampled each when asked."""

    greedy: list[Any]
    sampled: list[list[Any]] = field(default_factory=list)


def _as_completion(text: str, conversational: bool) -> Any:
    return [{"role": "assistant", "content": text}] if conversational else text


def generate(
    candidate: EvalModel,
    rows: Sequence[dict[str, Any]],
    *,
    max_new_tokens: int = 64,
    num_samples: int = 0,
    temperature: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> Generations:
    """Greedy completions for every row's ``prompt`` (and ``num_samples`` sampled ones when > 0).

    Prompts go through the data path the trainers use (:func:`posttrain.data.tokenize_prompts`), and
    completions come from the rollout engine, so evaluation sees what training sampled from.
    """
    from datasets import Dataset

    from posttrain.data import tokenize_prompts
    from posttrain.rollout import HFRolloutEngine, SamplingParams

    if candidate.kind != POLICY:
        raise ConfigError(f"{candidate.name!r} is a reward model; it cannot generate", field="model",
                          fix="pass reward models with --reward_model, and policies with --model")
    prompts = [row["prompt"] for row in rows]
    conversational = bool(prompts) and not isinstance(prompts[0], str)
    prompt_ids = tokenize_prompts(Dataset.from_dict({"prompt": prompts}), candidate.tokenizer)["prompt_input_ids"]
    engine = HFRolloutEngine(candidate.model, candidate.tokenizer)
    device = engine.device
    greedy_params = SamplingParams(max_completion_length=max_new_tokens, do_sample=False)
    sample_params = SamplingParams(max_completion_length=max_new_tokens, temperature=temperature)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    result = Generations(greedy=[])
    for start in range(0, len(prompts), batch_size):
        ids = [list(p) for p in prompt_ids[start : start + batch_size]]
        batch = engine.generate(ids, sampling=greedy_params)
        result.greedy += [_as_completion(t, conversational) for t in batch.decode_completions(candidate.tokenizer)]
        if num_samples > 0:
            batch = engine.generate(ids, num_generations=num_samples, sampling=sample_params, generator=generator)
            texts = batch.decode_completions(candidate.tokenizer)
            for g in range(len(ids)):
                result.sampled.append([_as_completion(t, conversational)
                                       for t in texts[g * num_samples : (g + 1) * num_samples]])
        if progress is not None:
            progress(len(ids))
    return result


# ----------------------------------------------------------------------------- scoring


def task_reward(task) -> Callable:
    """A reward function (1.0 / 0.0) from an embedded task's own answer check, named ``correct``."""

    def correct(prompts, completions, answer=None, **kwargs):
        from posttrain.rewards.text import completion_text

        return [1.0 if task.check(completion_text(c), a) else 0.0 for c, a in zip(completions, answer)]

    return correct


def _columns(rows: Sequence[dict[str, Any]], repeat: int = 1) -> dict[str, list[Any]]:
    names = [name for name in rows[0] if name != "prompt"] if rows else []
    return {name: [row[name] for row in rows for _ in range(repeat)] for name in names}


def _is_binary(values: Sequence[float]) -> bool:
    return all(v in (0.0, 1.0) for v in values)


def _rate_or_mean(values: list[float]) -> dict[str, float]:
    """Mean with its 95% interval: Wilson's for 0/1 values, the normal one otherwise."""
    kept = [v for v in values if not math.isnan(v)]
    if kept and _is_binary(kept):
        low, high = wilson_interval(sum(kept), len(kept))
        return {"mean": sum(kept) / len(kept), "low": low, "high": high, "n": len(kept), "rate": True}
    mean, low, high = mean_interval(kept)
    return {"mean": mean, "low": low, "high": high, "n": len(kept), "rate": False}


def evaluate_generations(
    rows: Sequence[dict[str, Any]],
    generations: Generations,
    reward_funcs: Sequence[Callable],
    *,
    reward_model: Callable | None = None,
) -> dict[str, Any]:
    """Score one model's completions.

    Returns ``{function name: {"greedy": {mean, low, high, n}, "mean@k": ..., "pass@k": ...}}`` for
    each reward function (pass@k only for functions that return 0/1), plus ``"reward_model"`` with the
    mean score of the greedy completions and ``"reward_model_scores"`` (one per prompt) when a reward
    model is given.
    """
    from posttrain.rewards.computer import RewardComputer

    prompts = [row["prompt"] for row in rows]
    results: dict[str, Any] = {}
    if reward_funcs:
        computer = RewardComputer(list(reward_funcs))
        greedy = computer(prompts=prompts, completions=generations.greedy,
                          completion_ids=[[] for _ in prompts], columns=_columns(rows))
        for column, name in enumerate(greedy.names):
            results[name] = {"greedy": _rate_or_mean(greedy.per_function[:, column].tolist())}
        if generations.sampled:
            k = len(generations.sampled[0])
            flat = [c for group in generations.sampled for c in group]
            sampled = computer(prompts=[p for p in prompts for _ in range(k)], completions=flat,
                               completion_ids=[[] for _ in flat], columns=_columns(rows, repeat=k))
            for column, name in enumerate(sampled.names):
                values = sampled.per_function[:, column].tolist()
                results[name][f"mean@{k}"] = _rate_or_mean(values)
                if _is_binary([v for v in values if not math.isnan(v)]):
                    per_prompt = [pass_at_k(k, int(sum(values[g * k : (g + 1) * k])), k) for g in range(len(prompts))]
                    results[name][f"pass@{k}"] = _rate_or_mean(per_prompt)
    if reward_model is not None:
        scores = [float(s) for s in reward_model(prompts=prompts, completions=generations.greedy)]
        results["reward_model"] = {"greedy": _rate_or_mean(scores)}
        results["reward_model_scores"] = scores
    return results


def win_rates(scores_by_model: dict[str, list[float]], baseline: str) -> dict[str, dict[str, float]]:
    """Win rate (ties half) of every model's greedy completions against ``baseline``'s, prompt by prompt."""
    if baseline not in scores_by_model:
        raise ConfigError(f"baseline {baseline!r} is not one of the evaluated models ({', '.join(scores_by_model)})",
                          field="baseline", fix="name one of the --model entries (its directory name or path)")
    reference = scores_by_model[baseline]
    rates = {}
    for name, scores in scores_by_model.items():
        if name != baseline:
            rate, low, high = win_rate(scores, reference)
            rates[name] = {"mean": rate, "low": low, "high": high, "n": len(scores), "rate": True}
    return rates


# ----------------------------------------------------------------------------- log-prob figures


def _padded(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)


def _sequence_logps(candidate: EvalModel, ids_rows: list[list[int]], target_rows: list[list[int]],
                    batch_size: int) -> tuple[list[float], list[int]]:
    """Summed log-probs and counts of each row's target tokens (``target_rows`` marks them with 1)."""
    from posttrain.models.lm_head import token_logps

    sums: list[float] = []
    counts: list[int] = []
    device = next(candidate.model.parameters()).device
    pad_id = candidate.tokenizer.pad_token_id or 0
    with torch.no_grad():
        for start in range(0, len(ids_rows), batch_size):
            ids = _padded(ids_rows[start : start + batch_size], pad_id).to(device)
            targets = _padded(target_rows[start : start + batch_size], 0).to(device)
            attention = _padded([[1] * len(r) for r in ids_rows[start : start + batch_size]], 0).to(device)
            result = token_logps(candidate.model, ids, targets, attention_mask=attention)
            sums += result.sequence_sums().double().tolist()
            counts += result.token_counts().long().tolist()
    return sums, counts


def evaluate_language_modeling(candidate: EvalModel, dataset, *, max_length: int = 1024, batch_size: int = 8) -> dict[str, Any]:
    """Per-token NLL and perplexity on SFT-format rows; only completion tokens when the data marks them."""
    from posttrain.data import tokenize_sft

    if candidate.kind != POLICY:
        raise ConfigError(f"{candidate.name!r} is a reward model; perplexity needs a causal LM", field="lm_dataset",
                          fix="evaluate language modeling on policies only")
    tokenized = tokenize_sft(dataset, candidate.tokenizer, max_length=max_length)
    sums, counts = _sequence_logps(candidate, list(tokenized["input_ids"]), list(tokenized["completion_mask"]), batch_size)
    tokens = sum(counts)
    nll = -sum(sums) / tokens if tokens else float("nan")
    return {"nll": nll, "perplexity": math.exp(nll) if tokens else float("nan"), "tokens": tokens, "rows": len(counts)}


def evaluate_preferences(
    candidate: EvalModel, dataset, *, reference: EvalModel | None = None, beta: float = 0.1,
    max_length: int = 1024, batch_size: int = 8,
) -> dict[str, Any]:
    """Pairwise accuracy and mean margin on preference rows (``prompt``/``chosen``/``rejected``).

    A reward model is scored directly (margin = score(chosen) - score(rejected)). A policy is scored
    by DPO's implicit reward ``beta * (log pi(y|x) - log pi_ref(y|x))`` against ``reference``
    (Rafailov et al., arXiv:2305.18290, eq. 5); the margin is chosen minus rejected. Ties count half.
    """
    from posttrain.data import tokenize_preference

    if candidate.kind == REWARD_MODEL:
        from posttrain.data.formats import extract_prompt
        from posttrain.rewards.model_scorer import RewardModelScorer

        scorer = RewardModelScorer(candidate.model, tokenizer=candidate.tokenizer, batch_size=batch_size, max_length=max_length)
        prompts, chosen, rejected = [], [], []
        for row in dataset:
            prompt, good, bad = (row["prompt"], row["chosen"], row["rejected"]) if "prompt" in row else extract_prompt(
                row["chosen"], row["rejected"])
            prompts.append(prompt)
            chosen.append(good)
            rejected.append(bad)
        margins = [a - b for a, b in zip(scorer(prompts=prompts, completions=chosen),
                                         scorer(prompts=prompts, completions=rejected))]
    else:
        if reference is None:
            raise ConfigError(f"{candidate.name!r} is a policy: its preference accuracy needs the reference model it "
                              "was trained against", field="ref_model", fix="pass --ref_model DIR (e.g. the SFT model)")
        check_same_vocabulary(candidate, reference, "their log-probabilities cannot be compared")
        tokenized = tokenize_preference(dataset, candidate.tokenizer, max_length=max_length)
        margins = [0.0] * len(tokenized)
        for side, sign in (("chosen_input_ids", 1.0), ("rejected_input_ids", -1.0)):
            ids_rows = [list(p) + list(c) for p, c in zip(tokenized["prompt_input_ids"], tokenized[side])]
            target_rows = [[0] * len(p) + [1] * len(c) for p, c in zip(tokenized["prompt_input_ids"], tokenized[side])]
            policy, _ = _sequence_logps(candidate, ids_rows, target_rows, batch_size)
            ref, _ = _sequence_logps(reference, ids_rows, target_rows, batch_size)
            margins = [m + sign * beta * (p - r) for m, p, r in zip(margins, policy, ref)]
    wins = [1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins]
    low, high = wilson_interval(sum(wins), len(wins))
    mean_margin, margin_low, margin_high = mean_interval(margins)
    return {
        "accuracy": {"mean": sum(wins) / len(wins) if wins else float("nan"), "low": low, "high": high, "n": len(wins),
                     "rate": True},
        "margin": {"mean": mean_margin, "low": margin_low, "high": margin_high, "n": len(margins), "rate": False},
    }
