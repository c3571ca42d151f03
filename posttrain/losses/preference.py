"""Direct preference optimisation (DPO) and its variants, as pure functions of sequence log-probs.

Every loss reads a :class:`PreferenceLogps` (summed log-probs of the chosen and rejected
completions under the policy and the frozen reference) and returns a per-example loss of shape
(B,). They are registered by name in :data:`PREFERENCE_LOSSES`; :func:`combined_preference_loss`
mixes several of them with weights, adds the RPO term and reports the usual metrics.

Notation used in the docstrings (all per example, shape (B,)):

* ``c = policy_chosen - ref_chosen`` and ``r = policy_rejected - ref_rejected`` (log-ratios);
* ``s_c = f(c)``, ``s_r = f(r)``: scores, equal to the log-ratios unless an f-divergence is chosen
  (:func:`f_divergence_scores`); ``Delta = s_c - s_r``;
* ``beta``: the regularisation strength; ``eps``: ``label_smoothing``; ``sigma``: the logistic
  function, ``log sigma`` is computed with ``logsigmoid``.

Options every loss accepts (and ignores if it has no use for them): ``f_divergence_type``,
``f_alpha_divergence_coef``, ``average_log_probs`` (ipo), ``discopop_tau``, ``running_mean`` and
``update_running_mean`` (bco_pair).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from posttrain.errors import ConfigError, DataError
from posttrain.losses.registry import Registry
from posttrain.ops.distributed import all_reduce_sum

PreferenceLoss = Callable[..., torch.Tensor]
PREFERENCE_LOSSES: Registry[PreferenceLoss] = Registry("preference loss", field="loss_type")

#: Loss types built on the score difference ``Delta``; only these accept a non-default f-divergence.
F_DIVERGENCE_LOSS_TYPES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
#: Loss types that sort the batch, so an example's loss is not its own: per-pair weights cannot apply.
SORTING_LOSS_TYPES = frozenset({"aot", "aot_unpaired"})
KNOWN_OPTIONS = frozenset(
    {"f_divergence_type", "f_alpha_divergence_coef", "average_log_probs", "discopop_tau", "running_mean",
     "update_running_mean"}
)  # fmt: skip
EXO_DEFAULT_EPSILON = 1e-3


@dataclass
class PreferenceLogps:
    """Sequence log-probs of a batch of preference pairs; every field has shape (B,).

    ``policy_*`` / ``ref_*`` are log-probs summed over the completion tokens under the trained policy
    and the frozen reference. ``*_num_tokens`` are the completion lengths (float counts); they are
    needed by the losses that average per token (``ipo``, ``sigmoid_norm``, ``sft``).
    ``policy_chosen_plain``: the plain sums of the chosen completions when ``policy_chosen`` is
    length-weighted (LD-DPO, :func:`length_desensitized_logps`); the NLL terms (``sft``, RPO) use it,
    since a likelihood weighs every token once. ``None``: ``policy_chosen`` is already plain.
    """

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_num_tokens: torch.Tensor | None = None
    rejected_num_tokens: torch.Tensor | None = None
    policy_chosen_plain: torch.Tensor | None = None

    def __post_init__(self) -> None:
        shape = self.policy_chosen.shape
        for name in ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected", "chosen_num_tokens",
                     "rejected_num_tokens", "policy_chosen_plain"):  # fmt: skip
            value = getattr(self, name)
            if value is not None and (value.dim() != 1 or value.shape != shape):
                raise DataError(
                    f"PreferenceLogps.{name} must be a vector as long as policy_chosen",
                    expected=f"shape {tuple(shape)}",
                    found=f"shape {tuple(value.shape)}",
                    fix="pass one summed log-prob (or token count) per example",
                )

    @property
    def chosen_likelihood_logps(self) -> torch.Tensor:
        """(B,) plain summed log-probs of the chosen completions (every token weighed once)."""
        return self.policy_chosen if self.policy_chosen_plain is None else self.policy_chosen_plain

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.policy_chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.policy_rejected - self.ref_rejected

    def num_tokens(self, loss_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) completion lengths, clamped to at least 1."""
        if self.chosen_num_tokens is None or self.rejected_num_tokens is None:
            raise DataError(
                f"the '{loss_type}' loss averages log-probs per token and needs the completion lengths",
                expected="PreferenceLogps.chosen_num_tokens and rejected_num_tokens",
                found="None",
                fix="pass the number of completion tokens of each chosen and rejected sequence",
            )
        dtype = self.policy_chosen.dtype
        return self.chosen_num_tokens.to(dtype).clamp_min(1.0), self.rejected_num_tokens.to(dtype).clamp_min(1.0)


class RunningMean:
    """Mean of the batch means passed to :meth:`update` so far; the explicit state of ``bco_pair``.

    A batch's mean is taken over every process (global sum / global count via
    :func:`posttrain.ops.distributed.all_reduce_sum`), so every process holds the same value and it
    does not depend on how the batch was split between processes. Keep one per trainer, save
    :meth:`state_dict` with checkpoints for an exact resume.
    """

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    @torch.no_grad()
    def update(self, values: torch.Tensor | float) -> None:
        """Add the mean of ``values`` (any shape) over every process: a collective call when several run."""
        values = torch.as_tensor(values).detach().double().reshape(-1)
        moments = torch.stack([values.sum(), torch.tensor(float(values.numel()), dtype=torch.float64, device=values.device)])
        total, count = all_reduce_sum(moments).tolist()
        if count > 0:
            self.total += total / count
            self.count += 1

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def state_dict(self) -> dict[str, float]:
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.total, self.count = float(state["total"]), int(state["count"])


def dpo_rewards(logps: PreferenceLogps, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Implicit DPO rewards ``beta * (policy - ref)`` of the chosen and rejected completions, (B,) each."""
    return beta * logps.chosen_logratios, beta * logps.rejected_logratios


def f_divergence_scores(
    logratios: torch.Tensor, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5
) -> torch.Tensor:
    """Map log-ratios ``x = log(pi/pi_ref)`` to f-DPO scores ``f'(exp(x))``.

    Paper: Wang et al., "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse
    Divergence Constraints", arXiv:2309.16240.

    * ``reverse_kl``: ``x`` (standard DPO);
    * ``forward_kl``: ``1 - exp(-x)``;
    * ``js_divergence``: ``log 2 + log sigma(x)``;
    * ``alpha_divergence``: ``(exp((a - 1) x) - 1) / (a - 1)`` with ``a = f_alpha_divergence_coef``
      (``x`` itself when ``a`` is 1); the exponent is capped at 80 so float32 cannot overflow.

    Shapes: any -> same.
    """
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return -torch.expm1(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2.0) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        shift = f_alpha_divergence_coef - 1.0
        if abs(shift) < 1e-6:
            return logratios
        exponent = (shift * logratios.float()).clamp(max=11.0 if logratios.dtype == torch.float16 else 80.0)
        return (torch.expm1(exponent) / shift).to(logratios.dtype)
    raise ConfigError(
        f"unknown f-divergence {f_divergence_type!r}",
        field="f_divergence_type",
        fix=f"use one of {', '.join(F_DIVERGENCE_TYPES)}",
    )


def _scores(logps: PreferenceLogps, options: dict) -> tuple[torch.Tensor, torch.Tensor]:
    kind = options.get("f_divergence_type", "reverse_kl")
    alpha = options.get("f_alpha_divergence_coef", 0.5)
    return (f_divergence_scores(logps.chosen_logratios, kind, alpha),
            f_divergence_scores(logps.rejected_logratios, kind, alpha))  # fmt: skip


def _score_difference(logps: PreferenceLogps, options: dict) -> torch.Tensor:
    chosen_scores, rejected_scores = _scores(logps, options)
    return chosen_scores - rejected_scores


def _smoothed_logistic(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``-(1 - eps) log sigma(z) - eps log sigma(-z)``: the logistic loss with a flipped-label probability."""
    loss = -F.logsigmoid(logits)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss


@PREFERENCE_LOSSES.register("sigmoid")
def sigmoid_loss(logps: PreferenceLogps, *, beta: float, label_smoothing: float = 0.0, **options) -> torch.Tensor:
    """DPO, with conservative DPO's label smoothing.

    Papers: Rafailov et al., "Direct Preference Optimization", arXiv:2305.18290 (eq. 7); label
    smoothing (cDPO) from Mitchell, "A note on DPO with noisy preferences and relationship to IPO" (2023).

    ``loss = -(1 - eps) log sigma(beta Delta) - eps log sigma(-beta Delta)``; (B,) -> (B,).
    """
    return _smoothed_logistic(beta * _score_difference(logps, options), label_smoothing)


@PREFERENCE_LOSSES.register("sigmoid_norm")
def sigmoid_norm_loss(logps: PreferenceLogps, *, beta: float, label_smoothing: float = 0.0, **options) -> torch.Tensor:
    """Length-normalised DPO: DPO on per-token averaged scores.

    Paper: Lambert et al., "Tulu 3: Pushing Frontiers in Open Language Model Post-Training",
    arXiv:2411.15124 (length-normalised DPO).

    ``loss = smoothed_logistic(beta (s_c / n_c - s_r / n_r))`` with n the completion lengths; (B,) -> (B,).
    """
    chosen_scores, rejected_scores = _scores(logps, options)
    chosen_tokens, rejected_tokens = logps.num_tokens("sigmoid_norm")
    difference = chosen_scores / chosen_tokens - rejected_scores / rejected_tokens
    return _smoothed_logistic(beta * difference, label_smoothing)


@PREFERENCE_LOSSES.register("hinge")
def hinge_loss(logps: PreferenceLogps, *, beta: float, label_smoothing: float = 0.0, **options) -> torch.Tensor:
    """SLiC hinge loss on the DPO log-ratio difference.

    Paper: Zhao et al., "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", arXiv:2305.10425.

    ``loss = max(0, 1 - beta Delta)``; (B,) -> (B,).
    """
    return torch.relu(1.0 - beta * _score_difference(logps, options))


@PREFERENCE_LOSSES.register("ipo")
def ipo_loss(
    logps: PreferenceLogps, *, beta: float, label_smoothing: float = 0.0, average_log_probs: bool = True, **options
) -> torch.Tensor:
    """Identity preference optimisation; ``beta`` plays the paper's tau.

    Paper: Azar et al., "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", arXiv:2310.12036 (eq. 17).

    ``loss = (Delta' - 1 / (2 beta))^2``. With ``average_log_probs=True`` (the default, and the
    convention the IPO authors used for their results) ``Delta' = s_c / n_c - s_r / n_r``, the
    per-token average, so the target margin does not depend on completion length; with False
    ``Delta' = Delta`` on summed log-probs. Shapes: (B,) -> (B,).
    """
    if average_log_probs:
        chosen_scores, rejected_scores = _scores(logps, options)
        chosen_tokens, rejected_tokens = logps.num_tokens("ipo")
        difference = chosen_scores / chosen_tokens - rejected_scores / rejected_tokens
    else:
        difference = _score_difference(logps, options)
    return (difference - 1.0 / (2.0 * beta)) ** 2


@PREFERENCE_LOSSES.register("robust")
def robust_loss(logps: PreferenceLogps, *, beta: float, label_smoothing: float = 0.0, **options) -> torch.Tensor:
    """Robust DPO: an unbiased loss under preference labels flipped with probability ``eps``.

    Paper: Chowdhury et al., "Provably Robust DPO: Aligning Language Models with Noisy Feedback",
    arXiv:2403.00409 (eq. 9).

    ``loss = (-(1 - eps) log sigma(beta Delta) + eps log sigma(-beta Delta)) / (1 - 2 eps)``,
    ``0 <= eps < 0.5``; (B,) -> (B,).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(
            f"the 'robust' loss reads label_smoothing as a label-flip probability in [0, 0.5); got {label_smoothing}",
            field="label_smoothing",
            fix="set label_smoothing to the estimated fraction of flipped labels, e.g. 0.1",
        )
    logits = beta * _score_difference(logps, options)
    clean = -(1.0 - label_smoothing) * F.logsigmoid(logits)
    flipped = -label_smoothing * F.logsigmoid(-logits)
    return (clean - flipped) / (1.0 - 2.0 * label_smoothing)


@PREFERENCE_LOSSES.register("exo_pair")
def exo_pair_loss(logps: PreferenceLogps, *, beta: float, label_smoothing: float = 0.0, **options) -> torch.Tensor:
    """EXO (pairwise): reverse KL from the policy's pair distribution to the smoothed label.

    Paper: Ji et al., "Towards Efficient Exact Optimization of Language Model Alignment",
    arXiv:2402.00856 (eq. 16, K = 2).

    With ``q = sigma(beta Delta)`` the policy's probability that chosen wins and labels
    ``(1 - eps, eps)``: ``loss = q (log q - log(1 - eps)) + (1 - q) (log(1 - q) - log eps)``.
    ``label_smoothing = 0`` selects the paper's recommended ``eps = 1e-3`` (``eps`` must be > 0: the
    loss has a ``log eps`` term). Shapes: (B,) -> (B,).
    """
    epsilon = label_smoothing or EXO_DEFAULT_EPSILON
    if not 0.0 < epsilon < 1.0:
        raise ConfigError(
            f"the 'exo_pair' loss needs 0 < label_smoothing < 1; got {label_smoothing}",
            field="label_smoothing",
            fix="use the EXO paper's 1e-3",
        )
    logits = beta * _score_difference(logps, options)
    chosen_wins = torch.sigmoid(logits)
    rejected_wins = torch.sigmoid(-logits)
    return (chosen_wins * (F.logsigmoid(logits) - math.log1p(-epsilon))
            + rejected_wins * (F.logsigmoid(-logits) - math.log(epsilon)))  # fmt: skip


@PREFERENCE_LOSSES.register("discopop")
def discopop_loss(
    logps: PreferenceLogps, *, beta: float, label_smoothing: float = 0.0, discopop_tau: float = 0.05, **options
) -> torch.Tensor:
    """DiscoPOP: a log-ratio modulated blend of the logistic and exponential losses.

    Paper: Chris Lu et al., "Discovering Preference Optimization Algorithms with and for Large
    Language Models", arXiv:2406.08414 (eq. 5).

    With ``z = beta Delta`` and ``m = sigma(z / tau)``: ``loss = (1 - m) (-log sigma(z)) + m exp(-z)``;
    ``tau = discopop_tau`` (default 0.05). Shapes: (B,) -> (B,).
    """
    logits = beta * _score_difference(logps, options)
    modulation = torch.sigmoid(logits / discopop_tau)
    return (1.0 - modulation) * -F.logsigmoid(logits) + modulation * torch.exp(-logits)


@PREFERENCE_LOSSES.register("nca_pair")
def nca_pair_loss(logps: PreferenceLogps, *, beta: float, label_smoothing: float = 0.0, **options) -> torch.Tensor:
    """Noise-contrastive alignment (pairwise NCA).

    Paper: Chen et al., "Noise Contrastive Alignment of Language Models with Explicit Rewards",
    arXiv:2402.05369.

    With ``u_c = beta c``, ``u_r = beta r``:
    ``loss = -log sigma(u_c) - 0.5 log sigma(-u_c) - 0.5 log sigma(-u_r)``; (B,) -> (B,).
    """
    chosen_rewards, rejected_rewards = dpo_rewards(logps, beta)
    return -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)


@PREFERENCE_LOSSES.register("bco_pair")
def bco_pair_loss(
    logps: PreferenceLogps,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    running_mean: RunningMean | None = None,
    update_running_mean: bool = True,
    **options,
) -> torch.Tensor:
    """Binary classifier optimisation on pairs: chosen is "good", rejected is "bad".

    Paper: Jung et al., "Binary Classifier Optimization for Large Language Model Alignment",
    arXiv:2404.04656.

    With ``u_c = beta c``, ``u_r = beta r`` and the reward shift ``delta``:
    ``loss = -log sigma(u_c - delta) - log sigma(-(u_r - delta))``.

    ``delta`` is the running mean of past batch-mean rewards, held in the ``running_mean`` object
    the caller owns (updated here with this batch's mean of ``[u_c, u_r]`` over every process before
    it is read, unless ``update_running_mean=False``, e.g. during evaluation; a collective call when
    several processes run). Without ``running_mean``, ``delta = 0``.
    Shapes: (B,) -> (B,).
    """
    chosen_rewards, rejected_rewards = dpo_rewards(logps, beta)
    shift = 0.0
    if running_mean is not None:
        if update_running_mean:
            running_mean.update(torch.cat([chosen_rewards, rejected_rewards]))
        shift = running_mean.mean
    return -F.logsigmoid(chosen_rewards - shift) - F.logsigmoid(-(rejected_rewards - shift))


@PREFERENCE_LOSSES.register("sppo_hard")
def sppo_hard_loss(logps: PreferenceLogps, *, beta: float, label_smoothing: float = 0.0, **options) -> torch.Tensor:
    """Self-play preference optimisation with hard win probabilities (1 for chosen, 0 for rejected).

    Paper: Wu et al., "Self-Play Preference Optimization for Language Model Alignment",
    arXiv:2405.00675 (eq. 4.7 with P(chosen wins) = 1).

    ``loss = (c - 1 / (2 beta))^2 + (r + 1 / (2 beta))^2`` on the raw log-ratios; (B,) -> (B,).
    """
    target = 0.5 / beta
    return (logps.chosen_logratios - target) ** 2 + (logps.rejected_logratios + target) ** 2


def _aot_from_sorted(difference: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    return _smoothed_logistic(beta * difference, label_smoothing)


@PREFERENCE_LOSSES.register("aot")
def aot_loss(logps: PreferenceLogps, *, beta: float, label_smoothing: float = 0.0, **options) -> torch.Tensor:
    """Alignment via optimal transport, paired form: first-order dominance of policy over reference margins.

    Paper: Melnyk et al., "Distributional Preference Alignment of LLMs via Optimal Transport",
    arXiv:2406.05882.

    ``m = sort(policy_chosen - policy_rejected)``, ``m_ref = sort(ref_chosen - ref_rejected)`` (each
    sorted over the batch independently); ``loss_k = smoothed_logistic(beta (m_k - m_ref,k))``.
    Entry k belongs to the k-th quantile, not to example k. Shapes: (B,) -> (B,).
    """
    policy_margins, _ = torch.sort(logps.policy_chosen - logps.policy_rejected)
    ref_margins, _ = torch.sort(logps.ref_chosen - logps.ref_rejected)
    return _aot_from_sorted(policy_margins - ref_margins, beta, label_smoothing)


@PREFERENCE_LOSSES.register("aot_unpaired", "aot_pair")
def aot_unpaired_loss(logps: PreferenceLogps, *, beta: float, label_smoothing: float = 0.0, **options) -> torch.Tensor:
    """Alignment via optimal transport, unpaired form (older name ``aot_pair``).

    Paper: Melnyk et al., arXiv:2406.05882.

    ``loss_k = smoothed_logistic(beta (sort(c)_k - sort(r)_k))``: the chosen log-ratio distribution
    should dominate the rejected one quantile by quantile. Shapes: (B,) -> (B,).
    """
    chosen_sorted, _ = torch.sort(logps.chosen_logratios)
    rejected_sorted, _ = torch.sort(logps.rejected_logratios)
    return _aot_from_sorted(chosen_sorted - rejected_sorted, beta, label_smoothing)


@PREFERENCE_LOSSES.register("apo_zero")
def apo_zero_loss(logps: PreferenceLogps, *, beta: float, label_smoothing: float = 0.0, **options) -> torch.Tensor:
    """Anchored preference optimisation, APO-zero: raise chosen, lower rejected (both vs. the reference).

    Paper: D'Oosterlinck et al., "Anchored Preference Optimization and Contrastive Revisions",
    arXiv:2408.06266 (eq. 7). Use when the chosen answers are better than what the model writes now.

    ``loss = (1 - sigma(beta c)) + sigma(beta r)``; (B,) -> (B,).
    """
    chosen_rewards, rejected_rewards = dpo_rewards(logps, beta)
    return (1.0 - torch.sigmoid(chosen_rewards)) + torch.sigmoid(rejected_rewards)


@PREFERENCE_LOSSES.register("apo_down")
def apo_down_loss(logps: PreferenceLogps, *, beta: float, label_smoothing: float = 0.0, **options) -> torch.Tensor:
    """APO-down: lower chosen, and lower rejected more.

    Paper: arXiv:2408.06266 (eq. 8). Use when even the chosen answers are worse than the model's own.

    ``loss = sigma(beta c) + (1 - sigma(beta (c - r)))``; (B,) -> (B,).
    """
    chosen_rewards, rejected_rewards = dpo_rewards(logps, beta)
    return torch.sigmoid(chosen_rewards) + (1.0 - torch.sigmoid(chosen_rewards - rejected_rewards))


@PREFERENCE_LOSSES.register("sft")
def sft_loss(logps: PreferenceLogps, *, beta: float = 0.0, label_smoothing: float = 0.0, **options) -> torch.Tensor:
    """Negative log-likelihood of the chosen completions, averaged over every chosen token of the batch.

    ``loss = -sum_i policy_chosen_i / sum_i n_c,i``, the same value repeated for each example (so
    the mean over the batch is that value and every token weighs the same; a per-sequence mean
    would over-weight short completions). Under LD-DPO the plain sums are used
    (:attr:`PreferenceLogps.chosen_likelihood_logps`), not the length-weighted ones. Shapes: (B,) -> (B,).
    """
    chosen_tokens, _ = logps.num_tokens("sft")
    mean_nll = -logps.chosen_likelihood_logps.sum() / chosen_tokens.sum()
    return mean_nll.expand_as(logps.policy_chosen)


def chosen_token_nll(logps: PreferenceLogps) -> torch.Tensor:
    """Mean per-token NLL of the chosen completions over the batch (RPO's NLL term); scalar."""
    return sft_loss(logps, beta=0.0)[0] if logps.policy_chosen.numel() else logps.policy_chosen.new_zeros(())


def validate_preference_config(
    loss_types: Sequence[str],
    loss_weights: Sequence[float] | None = None,
    *,
    beta: float,
    f_divergence_type: str = "reverse_kl",
    weighted_pairs: bool = False,
) -> list[str]:
    """Check a DPO-family configuration; returns the canonical loss names. Raises ConfigError."""
    if isinstance(loss_types, str):
        loss_types = [loss_types]
    if not loss_types:
        raise ConfigError("loss_type is empty", field="loss_type", fix="e.g. loss_type=['sigmoid']")
    names = [PREFERENCE_LOSSES.canonical(name) for name in loss_types]
    if len(set(names)) != len(names):
        raise ConfigError(f"loss_type lists a loss twice: {list(loss_types)}", field="loss_type",
                          fix="list each loss once and use loss_weights to weigh it")  # fmt: skip
    if loss_weights is not None and len(loss_weights) != len(names):
        raise ConfigError(
            f"{len(loss_weights)} loss_weights for {len(names)} loss types",
            field="loss_weights",
            fix="give one weight per entry of loss_type, or none for weights of 1",
        )
    needs_beta = set(names) - {"sft"}
    if needs_beta and not beta > 0:
        raise ConfigError(f"beta must be positive; got {beta}", field="beta", fix="the usual value is 0.1")
    if f_divergence_type != "reverse_kl":
        if f_divergence_type not in F_DIVERGENCE_TYPES:
            f_divergence_scores(torch.zeros(()), f_divergence_type)  # raises the ConfigError naming the choices
        unsupported = sorted(set(names) - F_DIVERGENCE_LOSS_TYPES)
        if unsupported:
            raise ConfigError(
                f"f_divergence_type={f_divergence_type!r} has no valid form for {unsupported}",
                field="f_divergence_type",
                fix=f"use it only with {sorted(F_DIVERGENCE_LOSS_TYPES)}, or keep 'reverse_kl'",
            )
    if weighted_pairs and SORTING_LOSS_TYPES & set(names):
        raise ConfigError(
            "WPO weighting (use_weighting) cannot apply to 'aot'/'aot_unpaired': they sort the batch, so a "
            "loss entry is not one pair's",
            field="use_weighting",
            fix="turn use_weighting off or choose another loss_type",
        )
    return names


def combined_preference_loss(
    logps: PreferenceLogps,
    loss_types: Sequence[str],
    loss_weights: Sequence[float] | None = None,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    rpo_alpha: float | None = None,
    chosen_nll: torch.Tensor | None = None,
    pair_weights: torch.Tensor | None = None,
    **options,
) -> tuple[torch.Tensor, dict[str, float]]:
    """A weighted mixture of DPO-family losses, plus RPO's NLL term, with the standard metrics.

    ``loss = sum_k w_k mean_i(pair_weight_i * loss_k,i) + rpo_alpha * chosen_nll``

    Mixtures such as MPO (``["sigmoid", "bco_pair", "sft"]`` with weights ``[0.8, 0.2, 1.0]``) are one
    call. RPO (Pang et al., "Iterative Reasoning Preference Optimization", arXiv:2404.19733) adds
    ``rpo_alpha`` times the mean per-token NLL of the chosen completions; pass ``chosen_nll`` if the
    trainer computed it, else it is taken from ``logps`` (:func:`chosen_token_nll`).

    Args:
        logps: the batch's sequence log-probs, (B,) each.
        loss_types: names from :data:`PREFERENCE_LOSSES`.
        loss_weights: one per loss type; default 1 each.
        beta, label_smoothing: see the individual losses.
        rpo_alpha: weight of the NLL term, or None for none.
        chosen_nll: scalar mean per-token NLL of the chosen completions.
        pair_weights: optional (B,) per-pair weights (WPO: ``wpo_weights(chosen) * wpo_weights(rejected)``).
        **options: per-loss options (see the module docstring).

    Returns:
        ``(loss, metrics)``: a scalar tensor with gradient, and floats ``loss/<name>`` (each component's
        mean before its weight), ``loss/nll`` (with RPO), ``rewards/chosen``, ``rewards/rejected``,
        ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (batch means).
    """
    unknown = set(options) - KNOWN_OPTIONS
    if unknown:
        raise ConfigError(f"unknown preference-loss option(s) {sorted(unknown)}",
                          fix=f"known options: {sorted(KNOWN_OPTIONS)}")  # fmt: skip
    names = validate_preference_config(
        loss_types, loss_weights, beta=beta, f_divergence_type=options.get("f_divergence_type", "reverse_kl"),
        weighted_pairs=pair_weights is not None,
    )  # fmt: skip
    weights = [1.0] * len(names) if loss_weights is None else [float(w) for w in loss_weights]
    if pair_weights is not None:
        pair_weights = pair_weights.detach().to(logps.policy_chosen.dtype)

    total = logps.policy_chosen.new_zeros(())
    metrics: dict[str, float] = {}
    for name, weight in zip(names, weights):
        per_example = PREFERENCE_LOSSES.get(name)(logps, beta=beta, label_smoothing=label_smoothing, **options)
        if pair_weights is not None:
            per_example = per_example * pair_weights
        component = per_example.mean()
        metrics[f"loss/{name}"] = component.detach().item()
        total = total + weight * component

    if rpo_alpha is not None:
        nll = chosen_token_nll(logps) if chosen_nll is None else chosen_nll
        metrics["loss/nll"] = nll.detach().item()
        total = total + rpo_alpha * nll

    metrics.update(preference_metrics(logps, beta))
    return total, metrics


@torch.no_grad()
def preference_metrics(logps: PreferenceLogps, beta: float) -> dict[str, float]:
    """Batch means of the DPO rewards, their margin and accuracy, and the policy log-probs (floats)."""
    chosen_rewards, rejected_rewards = dpo_rewards(logps, beta)
    return {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": logps.policy_chosen.mean().item(),
        "logps/rejected": logps.policy_rejected.mean().item(),
    }
