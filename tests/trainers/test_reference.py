"""ReferencePolicy: reference log-probs in evaluation mode, leaving the policy's modes as they were."""

import torch
import transformers

from posttrain.trainers.reference import ReferencePolicy


def test_token_logps_restore_each_modules_own_mode():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                     resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)
    policy = transformers.GPT2LMHeadModel(config)
    policy.train()
    # a mixed state a caller may set on purpose: one block and the embedding dropout frozen in eval mode
    policy.transformer.h[0].eval()
    policy.transformer.drop.eval()
    before = {name: module.training for name, module in policy.named_modules()}
    assert len(set(before.values())) == 2

    input_ids = torch.randint(0, 40, (2, 6))
    completion_mask = torch.tensor([[0, 0, 0, 1, 1, 1]] * 2)
    reference = ReferencePolicy("policy_before_training")
    first = reference.token_logps(policy, input_ids, completion_mask).logps
    second = reference.token_logps(policy, input_ids, completion_mask).logps

    assert {name: module.training for name, module in policy.named_modules()} == before
    # inside the call every dropout was off: the result is deterministic and equals eval mode's
    torch.testing.assert_close(first, second)
    policy.eval()
    with torch.no_grad():
        logits = policy(input_ids).logits
    expected = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, input_ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(first * completion_mask[:, 1:], expected * completion_mask[:, 1:], atol=1e-5, rtol=1e-5)
