"""A prompt shared by several rows runs through the model once; values and gradients must not change."""

from __future__ import annotations

import pytest
import torch
import transformers

import posttrain.models.lm_head as lm_head
from posttrain.models.lm_head import can_share_prompt, token_logps
from posttrain.rollout.sequences import RolloutSequences, completion_token_logps

VOCAB = 97


def _config_kwargs() -> dict:
    return dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, max_position_embeddings=256, pad_token_id=0, bos_token_id=None, eos_token_id=1)


def build(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_config_kwargs()))
    elif arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_config_kwargs(), attention_bias=True))
    elif arch == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**_config_kwargs(), head_dim=16))
    else:
        raise ValueError(arch)
    with torch.no_grad():  # logits far from uniform, so that comparisons mean something
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.3)
    return model.train()


def grouped_rows(num_prompts: int = 3, group: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded prompts of different lengths, each repeated ``group`` times, with ragged completions; shuffled."""
    generator = torch.Generator().manual_seed(seed)
    width, completion = 9, 7
    prompt_ids = torch.randint(2, VOCAB, (num_prompts, width), generator=generator)
    prompt_mask = torch.ones(num_prompts, width, dtype=torch.long)
    for row in range(num_prompts):
        prompt_mask[row, : 2 * row] = 0
    prompt_ids = prompt_ids * prompt_mask
    rows = num_prompts * group
    completion_ids = torch.randint(2, VOCAB, (rows, completion), generator=generator)
    completion_mask = torch.ones(rows, completion, dtype=torch.long)
    for row in range(rows):
        completion_mask[row, 1 + row % completion:] = 0
    completion_ids = completion_ids * completion_mask
    batch = {"prompt_ids": prompt_ids.repeat_interleave(group, 0), "prompt_mask": prompt_mask.repeat_interleave(group, 0),
             "completion_ids": completion_ids, "completion_mask": completion_mask}
    order = torch.randperm(rows, generator=generator)
    return {name: value[order] for name, value in batch.items()}


def layout(rows: dict[str, torch.Tensor]) -> RolloutSequences:
    """The rows as the trainers hand them to :func:`completion_token_logps`."""
    return RolloutSequences(**rows, loss_mask=rows["completion_mask"],
                            is_truncated=torch.zeros(rows["completion_ids"].shape[0], dtype=torch.bool))


def _logps_and_grads(model, rows, share: bool, monkeypatch) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    monkeypatch.setattr(lm_head, "can_share_prompt", can_share_prompt if share else (lambda model: False))
    model.zero_grad()
    logps, entropy = completion_token_logps(model, layout(rows), with_entropy=True)
    (logps * torch.linspace(0.5, 1.5, logps.shape[1], device=logps.device)).sum().backward()
    grads = [param.grad.clone() for param in model.parameters() if param.grad is not None]
    return logps.detach(), entropy, grads


class ForwardRecorder:
    """Counts the rows and columns of every forward the model runs."""

    def __init__(self, model) -> None:
        self.shapes: list[tuple[int, int]] = []
        model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids")
        self.shapes.append(tuple(ids.shape) if ids is not None else tuple(kwargs["inputs_embeds"].shape[:2]))


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3"])
def test_shared_prompt_matches_full_forward_values_and_gradients(arch, monkeypatch):
    model = build(arch)
    rows = grouped_rows()
    full_logps, full_entropy, full_grads = _logps_and_grads(model, rows, False, monkeypatch)
    logps, entropy, grads = _logps_and_grads(model, rows, True, monkeypatch)
    assert (full_logps != 0).sum() == rows["completion_mask"].sum()  # zero exactly on padding
    torch.testing.assert_close(logps, full_logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, full_entropy, atol=1e-5, rtol=1e-5)
    assert len(grads) == len(full_grads)
    for grad, full in zip(grads, full_grads):
        assert full.norm() > 0
        assert (grad - full).norm() <= 1e-5 * full.norm()


def test_each_distinct_prompt_runs_once():
    model = build("qwen2")
    recorder = ForwardRecorder(model)
    rows = grouped_rows(num_prompts=3, group=4)
    lookups = []
    model.get_input_embeddings().register_forward_hook(lambda module, args, output: lookups.append(output.shape))
    completion_token_logps(model, layout(rows))
    prompt_width, completion_width = rows["prompt_ids"].shape[1], rows["completion_ids"].shape[1]
    assert recorder.shapes == [(3, prompt_width), (12, completion_width)]
    # one lookup over the full rows: each extra one would build another dense (V, d) embedding gradient
    assert [tuple(shape[:2]) for shape in lookups] == [(12, prompt_width + completion_width)]


def test_distinct_prompts_take_one_full_forward():
    model = build("qwen2")
    recorder = ForwardRecorder(model)
    rows = grouped_rows(num_prompts=4, group=1)
    completion_token_logps(model, layout(rows))
    assert recorder.shapes == [(4, rows["prompt_ids"].shape[1] + rows["completion_ids"].shape[1])]


def test_gradient_checkpointing_in_training_falls_back():
    model = build("qwen2")
    model.gradient_checkpointing_enable()
    assert not can_share_prompt(model)
    recorder = ForwardRecorder(model)
    rows = grouped_rows()
    logps, _ = completion_token_logps(model, layout(rows))
    logps.sum().backward()
    assert len(recorder.shapes) == 1
    model.eval()  # the cache is only turned off in training mode
    assert can_share_prompt(model)


def test_wrapped_and_unknown_models_fall_back():
    model = build("qwen2")
    assert can_share_prompt(model)
    assert not can_share_prompt(torch.nn.Sequential(model))  # e.g. a DDP-style wrapper around the model
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=1)).eval()
    assert not can_share_prompt(gpt2)
    rows = grouped_rows()
    inputs = torch.cat([rows["prompt_ids"], rows["completion_ids"]], 1)
    targets = torch.cat([torch.zeros_like(rows["prompt_mask"]), rows["completion_mask"]], 1)
    mask = torch.cat([rows["prompt_mask"], rows["completion_mask"]], 1)
    shared = token_logps(gpt2, inputs, targets, mask, prompt_width=rows["prompt_ids"].shape[1])
    plain = token_logps(gpt2, inputs, targets, mask)
    torch.testing.assert_close(shared.logps, plain.logps)


def test_peft_adapter_matches_full_forward(monkeypatch):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"],
                                                                init_lora_weights=False))
    rows = grouped_rows(num_prompts=2, group=3)
    full_logps, _, full_grads = _logps_and_grads(model, rows, False, monkeypatch)
    logps, _, grads = _logps_and_grads(model, rows, True, monkeypatch)
    torch.testing.assert_close(logps, full_logps, atol=1e-5, rtol=1e-5)
    assert len(grads) == len(full_grads) > 0  # only the adapter weights train
    for grad, full in zip(grads, full_grads):
        assert full.norm() > 0
        assert (grad - full).norm() <= 1e-5 * full.norm()


def test_prompt_learning_adapters_fall_back():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(build("qwen2"), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    assert not can_share_prompt(model)  # virtual tokens are prepended in forward: the prompt split would misalign
    lora = peft.get_peft_model(build("qwen2"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert can_share_prompt(lora)
