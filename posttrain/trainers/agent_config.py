"""The online-config fields for tools, environments and custom rollouts (GRPO and RLOO share them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.errors import ConfigError

CREDIT_ASSIGNMENTS = ("trajectory", "turn")


@dataclass
class AgentFields:
    """Mixed into :class:`~posttrain.trainers.online_config.OnlineConfig`; read only when the trainer gets
    ``tools``, ``environment_factory`` or ``rollout_func``."""

    max_tool_calling_iterations: int | None = field(
        default=None,
        metadata={"help": "Most tool-calling rounds per completion (None: until a turn calls no tool or "
                  "max_completion_length, which counts tool-result tokens too, is spent)."},
    )
    tool_timeout: float = field(
        default=30.0,
        metadata={"help": "Seconds one tool call may take; past it the model reads 'error: tool NAME timed out "
                  "after N s' and the call counts as failed (posttrain only)."},
    )
    tool_replay_path: str | None = field(
        default=None,
        metadata={"help": "An episodes.jsonl (or a run directory) recorded earlier: tool calls of the episodes it "
                  "holds return the recorded results instead of running, so a step re-runs bit-identically; other "
                  "episodes call their tools (posttrain only)."},
    )
    record_episodes: bool = field(
        default=True,
        metadata={"help": "With tools, environments or rollout_func, write every episode turn by turn (token ids, "
                  "tool calls and results, log-probs, rewards) to <output_dir>/episodes.jsonl (posttrain only)."},
    )
    credit_assignment: str = field(
        default="trajectory",
        metadata={"help": "'trajectory': one advantage per completion; 'turn' (GRPO): each sampled turn gets the "
                  "group-normalised reward-to-go of its environment's get_turn_rewards() plus the final reward "
                  "(posttrain only)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_tool_calling_iterations is not None and self.max_tool_calling_iterations < 0:
            raise ConfigError(f"max_tool_calling_iterations must be >= 0 or None, got {self.max_tool_calling_iterations}",
                              field="max_tool_calling_iterations", fix="use None for no limit, or a count such as 4")
        if self.tool_timeout is None or not self.tool_timeout > 0:
            raise ConfigError(f"tool_timeout must be > 0 seconds, got {self.tool_timeout!r}", field="tool_timeout",
                              fix="give the most seconds one tool call may take, e.g. 30")
        if self.credit_assignment not in CREDIT_ASSIGNMENTS:
            raise ConfigError(f"unknown credit_assignment {self.credit_assignment!r}", field="credit_assignment",
                              fix=f"use one of {', '.join(CREDIT_ASSIGNMENTS)}")
