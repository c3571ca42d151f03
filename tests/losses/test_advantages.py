"""Advantage estimators against loops over Python floats."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from posttrain.errors import ConfigError, DataError
from posttrain.losses.advantages import (
    ADVANTAGE_ESTIMATORS,
    decoupled_group_advantages,
    gae,
    group_relative_advantages,
    kl_penalized_scores,
    leave_one_out_advantages,
    local_mean_std,
    token_level_kl_rewards,
)

# two prompts, three completions each; the second group is all-equal (zero std)
REWARDS = [1.0, 0.0, 0.5, 2.0, 2.0, 2.0]
GROUP = 3


def t(values):
    return torch.tensor(values, dtype=torch.float64)


# ----- GRPO -------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_relative_advantages(scale):
    advantages, stats = group_relative_advantages(t(REWARDS), GROUP, scale_rewards=scale)
    expected = []
    batch_std = statistics.stdev(REWARDS)
    for g in range(2):
        group = REWARDS[g * GROUP : (g + 1) * GROUP]
        mean, std = statistics.mean(group), statistics.stdev(group)
        for r in group:
            if scale == "group":
                expected.append((r - mean) / (std + 1e-4))
            elif scale == "batch":
                expected.append((r - mean) / (batch_std + 1e-4))
            else:
                expected.append(r - mean)
    torch.testing.assert_close(advantages, t(expected))
    torch.testing.assert_close(stats.mean, t([0.5, 2.0]))
    torch.testing.assert_close(stats.std, t([0.5, 0.0]))
    assert stats.frac_zero_std == 0.5


def test_grpo_skips_nan_rewards():
    rewards = t([1.0, float("nan"), 3.0, 0.0, 4.0, float("nan")])
    advantages, stats = group_relative_advantages(rewards, 3, scale_rewards="none")
    torch.testing.assert_close(advantages, t([-1.0, 0.0, 1.0, -2.0, 2.0, 0.0]))
    torch.testing.assert_close(stats.mean, t([2.0, 2.0]))
    torch.testing.assert_close(stats.std, t([math.sqrt(2.0), math.sqrt(8.0)]))


def test_grpo_group_of_one_gives_zero_advantages():
    advantages, stats = group_relative_advantages(t([1.0, 5.0]), 1)
    torch.testing.assert_close(advantages, t([0.0, 0.0]))
    assert stats.frac_zero_std == 1.0


def test_grpo_bad_input():
    with pytest.raises(DataError, match="whole groups"):
        group_relative_advantages(t([1.0, 2.0, 3.0, 4.0]), 3)
    with pytest.raises(ConfigError, match="scale_rewards"):
        group_relative_advantages(t(REWARDS), GROUP, scale_rewards="std")


# ----- RLOO -------------------------------------------------------------------------------------


def rloo_reference(rewards, group_size):
    out = []
    for g in range(len(rewards) // group_size):
        group = rewards[g * group_size : (g + 1) * group_size]
        for i, r in enumerate(group):
            others = [v for j, v in enumerate(group) if j != i]
            out.append(r - sum(others) / len(others))
    return out


def test_leave_one_out_advantages():
    rewards = [1.0, 0.0, 0.5, 0.25, 3.0, 2.0, 2.0, -1.0]
    torch.testing.assert_close(leave_one_out_advantages(t(rewards), 4), t(rloo_reference(rewards, 4)))


def test_leave_one_out_normalised():
    rewards = [1.0, 0.0, 0.5, 0.25, 3.0, 2.0, 2.0, -1.0]
    raw = rloo_reference(rewards, 4)
    mean, std = statistics.mean(raw), statistics.stdev(raw)
    expected = [(a - mean) / (std + 1e-4) for a in raw]
    torch.testing.assert_close(leave_one_out_advantages(t(rewards), 4, normalize=True), t(expected))


def test_leave_one_out_with_nan_and_singletons():
    rewards = t([1.0, float("nan"), 3.0, 5.0, float("nan"), float("nan")])
    # group 1: baseline of 1.0 is 3.0 and vice versa; group 2 has one scored completion: no baseline
    torch.testing.assert_close(leave_one_out_advantages(rewards, 3), t([-2.0, 0.0, 2.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(leave_one_out_advantages(t([1.0, 2.0]), 1), t([0.0, 0.0]))


# ----- GDPO -------------------------------------------------------------------------------------


def test_decoupled_group_advantages():
    per_function = [[1.0, 0.0], [0.0, 10.0], [1.0, 20.0], [0.0, 5.0]]
    weights = [1.0, 0.5]
    summed = []
    for g in range(2):
        rows = per_function[g * 2 : (g + 1) * 2]
        columns = list(zip(*rows))
        means = [statistics.mean(c) for c in columns]
        stds = [statistics.stdev(c) for c in columns]
        for row in rows:
            summed.append(sum(w * (v - m) / (s + 1e-4) for w, v, m, s in zip(weights, row, means, stds)))
    mean, std = statistics.mean(summed), statistics.stdev(summed)
    expected = [(s - mean) / (std + 1e-4) for s in summed]
    advantages, _ = decoupled_group_advantages(t(per_function), t(weights), 2)
    torch.testing.assert_close(advantages, t(expected))


# ----- GAE --------------------------------------------------------------------------------------


def gae_reference(rewards, values, lengths, gamma, lam):
    advantages = [[0.0] * len(rewards[0]) for _ in rewards]
    returns = [[0.0] * len(rewards[0]) for _ in rewards]
    for b, length in enumerate(lengths):
        running = 0.0
        for step in reversed(range(length)):
            next_value = values[b][step + 1] if step + 1 < length else 0.0
            delta = rewards[b][step] + gamma * next_value - values[b][step]
            running = delta + gamma * lam * running
            advantages[b][step] = running
            returns[b][step] = running + values[b][step]
    return advantages, returns


def test_gae_matches_a_loop_and_ignores_padding():
    torch.manual_seed(0)
    rewards = torch.randn(3, 5, dtype=torch.float64)
    values = torch.randn(3, 5, dtype=torch.float64)
    lengths = [5, 3, 1]
    mask = torch.tensor([[1] * n + [0] * (5 - n) for n in lengths])
    # garbage in the padding must not matter
    rewards = rewards.masked_fill(mask == 0, 1e6)
    values = values.masked_fill(mask == 0, float("nan"))
    gamma, lam = 0.9, 0.8
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    expected_advantages, expected_returns = gae_reference(rewards.tolist(), values.tolist(), lengths, gamma, lam)
    torch.testing.assert_close(advantages, t(expected_advantages))
    torch.testing.assert_close(returns, t(expected_returns))


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    rewards = t([[0.0, 0.0, 1.0]])
    values = t([[0.2, 0.4, 0.6]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), 1.0, 1.0)
    torch.testing.assert_close(advantages, t([[0.8, 0.6, 0.4]]))
    torch.testing.assert_close(returns, t([[1.0, 1.0, 1.0]]))


# ----- KL-shaped rewards ------------------------------------------------------------------------


def test_token_level_kl_rewards_k1_and_k3():
    logps = t([[-1.0, -2.0, -0.5, -9.0], [-0.3, -0.4, -7.0, -7.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = t([[-1.5, -1.0, -0.5, -1.0], [-0.1, -0.9, -1.0, -1.0], [-2.0, -2.0, -2.0, -2.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    scores = t([2.0, -1.0, 5.0])
    coef = 0.1
    rewards = token_level_kl_rewards(scores, logps, ref, mask, kl_coef=coef)
    expected = [
        [-coef * 0.5, -coef * -1.0, -coef * 0.0 + 2.0, 0.0],
        [-coef * -0.2, -coef * 0.5 - 1.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],  # no valid token: nowhere to put the score
    ]
    torch.testing.assert_close(rewards, t(expected))

    rewards_k3 = token_level_kl_rewards(scores, logps, ref, mask, kl_coef=coef, kl_estimator="k3")
    k3 = lambda a, b: math.exp(b - a) - (b - a) - 1  # noqa: E731
    assert rewards_k3[0, 0].item() == pytest.approx(-coef * k3(-1.0, -1.5))
    assert rewards_k3[1, 1].item() == pytest.approx(-coef * k3(-0.4, -0.9) - 1.0)


def test_kl_penalized_scores():
    logps = t([[-1.0, -2.0, -5.0], [-0.5, -0.5, -0.5]])
    ref = t([[-1.5, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    penalised = kl_penalized_scores(t([1.0, 2.0]), logps, ref, mask, kl_coef=0.5)
    torch.testing.assert_close(penalised, t([1.0 - 0.5 * (0.5 - 1.0), 2.0 - 0.5 * 1.5]))


def test_advantage_registry():
    assert ADVANTAGE_ESTIMATORS.names() == ["grpo", "rloo"]
    advantages, stats = ADVANTAGE_ESTIMATORS.get("grpo")(t(REWARDS), GROUP, scale_rewards="none")
    torch.testing.assert_close(advantages, t([0.5, -0.5, 0.0, 0.0, 0.0, 0.0]))
    advantages, stats = ADVANTAGE_ESTIMATORS.get("rloo")(t(REWARDS), GROUP)
    torch.testing.assert_close(advantages, t(rloo_reference(REWARDS, GROUP)))
    assert stats.frac_zero_std == 0.5
    with pytest.raises(ConfigError, match="advantage_estimator"):
        ADVANTAGE_ESTIMATORS.get("ppo")


# ----- batch statistics over several processes ---------------------------------------------------

# four prompts, two completions each, one unscorable; two functions for GDPO
SPLIT_REWARDS = torch.tensor([1.0, 0.0, 3.0, float("nan"), 0.5, 2.5, -1.0, 4.0], dtype=torch.float64)
SPLIT_PER_FUNCTION = torch.stack([SPLIT_REWARDS, torch.tensor([0.0, 1.0, 1.0, 2.0, 5.0, 0.0, 1.0, 1.0], dtype=torch.float64)], 1)


def _batch_advantages(rewards, per_function, batch_mean_std):
    return {
        "grpo_batch": group_relative_advantages(rewards, 2, "batch", batch_mean_std=batch_mean_std)[0],
        "rloo_normalize": leave_one_out_advantages(rewards, 2, normalize=True, batch_mean_std=batch_mean_std),
        "gdpo": decoupled_group_advantages(per_function, t([1.0, 0.5]), 2, batch_mean_std=batch_mean_std)[0],
    }


def _split_worker(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    from posttrain.ops.distributed import global_mean_std

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    half = slice(0, 4) if rank == 0 else slice(4, 8)
    advantages = _batch_advantages(SPLIT_REWARDS[half], SPLIT_PER_FUNCTION[half], global_mean_std)
    torch.save(advantages, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.distributed
def test_batch_statistics_over_two_processes_equal_one_process(tmp_path):
    """Each of two gloo processes holds two prompts' groups; with the global statistics their advantages
    are those of one process holding all four (with each process's own statistics they are not)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "advantages")
    # fork: the worker lives in this test module, which a spawned interpreter could not import by name
    mp.start_processes(_split_worker, args=(port, out), nprocs=2, join=True, start_method="fork")
    halves = [torch.load(f"{out}.{rank}") for rank in (0, 1)]
    whole = _batch_advantages(SPLIT_REWARDS, SPLIT_PER_FUNCTION, local_mean_std)
    for name, expected in whole.items():
        torch.testing.assert_close(torch.cat([halves[0][name], halves[1][name]]), expected, msg=name)
        local = torch.cat([_batch_advantages(SPLIT_REWARDS[s], SPLIT_PER_FUNCTION[s], local_mean_std)[name]
                           for s in (slice(0, 4), slice(4, 8))])
        assert not torch.allclose(local, expected), name  # per-process statistics would be wrong


def test_local_mean_std_skips_nan_and_matches_statistics():
    mean, std = local_mean_std(SPLIT_REWARDS)
    kept = [v for v in SPLIT_REWARDS.tolist() if not math.isnan(v)]
    assert mean.item() == pytest.approx(statistics.mean(kept)) and std.item() == pytest.approx(statistics.stdev(kept))
    assert local_mean_std(t([2.0]))[1].item() == 0.0 and math.isnan(local_mean_std(t([float("nan")]))[0].item())


def test_turn_level_advantages_by_hand():
    from posttrain.losses.advantages import broadcast_turn_advantages, turn_level_advantages

    nan = float("nan")
    turn_rewards = torch.tensor([[1.0, 0.0], [0.0, nan], [0.5, 0.5], [0.0, 1.0]])
    final = torch.tensor([1.0, 0.0, 0.0, 0.0])
    # reward-to-go: row 0 [2, 1], row 1 [0, -], row 2 [1, 0.5], row 3 [1, 1]
    got = turn_level_advantages(turn_rewards, final, group_size=2, eps=0.0)
    root2 = math.sqrt(2.0)
    expected = torch.tensor([[1 / root2, 0.0],  # turn 1 reached by one completion of the group: no signal
                             [-1 / root2, 0.0],  # a turn never reached: 0
                             [0.0, -0.25 / math.sqrt(0.125)],
                             [0.0, 0.25 / math.sqrt(0.125)]])
    torch.testing.assert_close(got, expected)
    centred = turn_level_advantages(turn_rewards, final, group_size=2, scale_rewards="none")
    torch.testing.assert_close(centred, torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, -0.25], [0.0, 0.25]]))
    turn_index = torch.tensor([[0, 0, -1, 1, -1], [0, -1, -1, -1, -1], [0, 1, 1, -1, -1], [1, 1, 1, 1, 1]])
    tokens = broadcast_turn_advantages(got, turn_index)
    a = 1 / root2
    b = 0.25 / math.sqrt(0.125)
    torch.testing.assert_close(tokens, torch.tensor([[a, a, 0.0, 0.0, 0.0], [-a, 0.0, 0.0, 0.0, 0.0],
                                                     [0.0, -b, -b, 0.0, 0.0], [b, b, b, b, b]]))
    with pytest.raises(ConfigError, match="scale_rewards"):
        turn_level_advantages(turn_rewards, final, group_size=2, scale_rewards="batch")
