"""Accuracy of a model on tool-use problems, with the tools executed: a greedy multi-turn loop over
``model.generate``, independent of any trainer's rollout code.

Each turn the model writes until its end-of-turn token; a ``<tool_call>`` JSON block in that turn is run
on the problem's environment, and ``<|im_start|>tool\\n{result}<|im_end|>\\n<|im_start|>assistant\\n``
(the template's rendering of a tool message and the next assistant header) is appended to the tokens;
a turn without a call ends the episode. ``use_tools=False`` asks the same questions without tools in the
prompt and runs no call: the model must answer from its own weights.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from transformers import GenerationConfig

from posttrain.errors import ConfigError
from posttrain.eval.accuracy import _batches, _eval_mode


def _tool_message_suffix(tokenizer: Any, content: str) -> str:
    """What the chat template writes after an assistant turn's end token for one tool message, then the
    next assistant header (e.g. ``\\n<|im_start|>tool\\n42<|im_end|>\\n<|im_start|>assistant\\n``)."""
    before = tokenizer.apply_chat_template([{"role": "user", "content": "q"}], tokenize=False,
                                           add_generation_prompt=True)
    turn = before + "x" + tokenizer.eos_token
    after = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"},
         {"role": "tool", "content": content}], tokenize=False, add_generation_prompt=True)
    if not after.startswith(turn):
        raise ConfigError("the chat template does not render a tool message after an assistant turn ending in EOS",
                          field="processing_class", fix="use a template that renders tool messages turn by turn")
    return after[len(turn):]


def evaluate_with_tools(
    model: torch.nn.Module,
    tokenizer: Any,
    task: Any,
    problems: list[dict[str, Any]],
    *,
    use_tools: bool = True,
    max_iterations: int = 4,
    max_new_tokens: int = 48,
    batch_size: int = 32,
    environment_factory: Callable[[], Any] | None = None,
    n_samples: int = 5,
) -> dict[str, Any]:
    """Greedy multi-turn episodes on ``problems`` (rows with ``question``, ``answer``, ``oracle_calls``).

    ``task`` gives the prompts (``chat_prompt``), the checker (``check``) and the per-turn ground truth
    (``environment_factory`` defaults to ``task.environment``): an environment with ``reset(**row)``,
    ``call(name, arguments) -> str`` and ``get_turn_rewards()``. At most ``max_iterations`` tool calls are
    run per episode; a turn calling a tool after that ends the episode (it has no final answer).

    Returns ``{"accuracy", "n", "correct", "call_accuracy" (share of oracle turns matched; None without
    tools), "turns" (mean assistant turns), "samples": [{"question", "messages", "answer", "correct"}]}``.
    """
    if max_iterations < 0 or max_new_tokens < 1 or batch_size < 1:
        raise ConfigError("max_iterations must be >= 0 and max_new_tokens, batch_size >= 1", field="max_iterations",
                          fix="pass non-negative / positive values")
    from posttrain.tasks.tool_use import completion_calls, strip_tool_calls, tool_schemas

    make_env = environment_factory or task.environment
    schemas = tool_schemas(getattr(task, "tool_names", lambda: None)()) if use_tools else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generation_config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id)
    device = next(model.parameters()).device
    results: list[dict[str, Any]] = []
    with _eval_mode(model, tokenizer), torch.inference_mode():
        for batch in _batches(list(problems), batch_size):
            envs = [make_env() for _ in batch]
            for env, problem in zip(envs, batch):
                env.reset(**problem)
            conversations = [task.chat_prompt(problem) for problem in batch]
            texts = [tokenizer.apply_chat_template(c, tools=schemas, tokenize=False, add_generation_prompt=True)
                     for c in conversations]
            ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
            calls_made = [0] * len(batch)
            active = list(range(len(batch)))
            while active:
                width = max(len(ids[i]) for i in active)
                input_ids = torch.tensor([[pad_id] * (width - len(ids[i])) + ids[i] for i in active], device=device)
                mask = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in active], device=device)
                output = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=generation_config)
                still_active = []
                for row, index in enumerate(active):
                    new = output[row, width:].tolist()
                    if tokenizer.eos_token_id in new:
                        new = new[: new.index(tokenizer.eos_token_id) + 1]
                    ids[index] += new
                    text = tokenizer.decode(new, skip_special_tokens=True)
                    calls = completion_calls(text) if use_tools else []
                    message: dict[str, Any] = {"role": "assistant", "content": text}
                    conversations[index].append(message)
                    ended = not new or new[-1] != tokenizer.eos_token_id
                    if not calls or ended or calls_made[index] >= max_iterations:
                        continue
                    message["content"] = strip_tool_calls(text).strip()
                    message["tool_calls"] = [{"type": "function", "function": call} for call in calls if call]
                    for call in calls:
                        calls_made[index] += 1
                        content = (envs[index].call(call["name"], call["arguments"]) if call
                                   else "error: the tool call is not valid JSON with 'name' and 'arguments'")
                        conversations[index].append({"role": "tool", "name": call["name"] if call else "",
                                                     "content": content})
                        ids[index] += tokenizer(_tool_message_suffix(tokenizer, content),
                                                add_special_tokens=False)["input_ids"]
                    still_active.append(index)
                active = still_active
            for problem, env, conversation in zip(batch, envs, conversations):
                completion = conversation[len(task.chat_prompt(problem)):]
                per_turn = env.get_turn_rewards() if use_tools else []
                results.append({"question": problem["question"], "messages": completion, "answer": problem["answer"],
                                "correct": bool(task.check(completion, problem["answer"])),
                                "call_accuracy": sum(per_turn) / len(per_turn) if per_turn else 0.0,
                                "turns": sum(m["role"] == "assistant" for m in completion)})
    correct = sum(r["correct"] for r in results)
    n = len(results)
    return {
        "accuracy": correct / n if n else 0.0,
        "n": n,
        "correct": correct,
        "call_accuracy": sum(r["call_accuracy"] for r in results) / n if n and use_tools else None,
        "turns": sum(r["turns"] for r in results) / n if n else 0.0,
        "samples": [{key: r[key] for key in ("question", "messages", "answer", "correct")}
                    for r in results[:n_samples]],
    }
