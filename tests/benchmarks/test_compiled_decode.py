"""The compiled-decode benchmark's fixed-width KV cache: the lean step over it decodes what the engine's cache decodes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from benchmarks import compiled_decode
from posttrain.models.tiny import tiny_model_path
from posttrain.rollout.lean_decode import LeanDecoder


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_fixed_width_cache_decodes_the_same_tokens_as_the_reserved_cache(arch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path(arch=arch)).eval()
    lean = LeanDecoder.build(model)
    assert lean is not None
    prompt_ids = torch.randint(10, model.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(1))
    lean.prepare(7 + 12 + 1, torch.device("cpu"))
    _, engine_tokens, engine_logits = compiled_decode.greedy_decode(model, lean, lean.step, prompt_ids, 12, fixed=False)
    _, fixed_tokens, fixed_logits = compiled_decode.greedy_decode(model, lean, lean.step, prompt_ids, 12, fixed=True)
    assert torch.equal(engine_tokens, fixed_tokens)
    torch.testing.assert_close(fixed_logits, engine_logits, rtol=0, atol=1e-5)
    # the greedy tokens are the model's own forward's, one full forward per token
    ids = prompt_ids
    with torch.no_grad():
        for _ in range(12):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ids[:, 7:], engine_tokens)


def test_unknown_variants_are_refused():
    with pytest.raises(SystemExit):
        compiled_decode.main(["--variants", "fixed,frozen"])
