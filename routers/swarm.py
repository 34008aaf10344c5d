"""POST /swarm: several agents answer one prompt, as the swarm memory policy allows."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.deps import SwarmDep
from services.swarm.policy import Agent
from services.swarm.runner import SwarmRun

router = APIRouter(tags=["swarm"])

Tier = Literal["fast", "medium", "deep", "reasoning", "vision"]


class SwarmAgent(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(min_length=1, max_length=64, description="Unique name of the agent.")
    role: str = Field("", max_length=1000, description="Who the agent is, e.g. `a sceptic`.")
    model: Tier = Field("fast", description="The tier the agent asks for.")


class SwarmRequest(BaseModel):
    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "prompt": "Is a hot dog a sandwich?",
                    "agents": [
                        {"name": "ada", "role": "a logician", "model": "medium"},
                        {"name": "bo", "role": "a cook", "model": "deep"},
                    ],
                    "rounds": 2,
                    "synthesize": True,
                }
            ]
        },
    )
    prompt: str = Field(min_length=1, max_length=20_000, description="What every agent answers.")
    agents: list[SwarmAgent] = Field(
        min_length=1, max_length=64, description="At most `swarm.max_agents`."
    )
    rounds: int = Field(
        1, ge=1, le=3, description="From round 2 each agent sees the others' previous answers."
    )
    synthesize: bool = Field(
        False,
        description="Add one final answer integrating the last round's, on the fast tier "
        "(the fallback tier in degraded mode).",
    )
    images: list[str] = Field(
        default_factory=list,
        max_length=8,
        description="Image URLs or data URIs; only agents on the vision tier see them.",
    )
    max_tokens: int = Field(64, ge=1, le=4096, description="Most tokens per agent answer.")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


class PolicyOut(BaseModel):
    mode: Literal["normal", "time_slice", "degraded"]
    reason: str
    free_vram_mb: float = Field(description="Usable memory on the device (RAM on a CPU host).")
    threshold_mb: float = Field(description="`swarm.degraded_threshold_mb`.")
    heavy_needed: int = Field(description="Distinct heavy tiers the agents ask for.")
    device: str = Field(description="The device the figures are of (the roomiest, with several).")
    heavy_slots: int = Field(description="Heavy slots: one per device Edison places on.")


class GroupOut(BaseModel):
    model: str = Field(description="The tier this group runs on.")
    agents: list[str]


class AgentErrorOut(BaseModel):
    code: str
    message: str


class AgentAnswerOut(BaseModel):
    agent: str
    model: str = Field(description="The tier the agent asked for.")
    tier: str | None = Field(description="The tier that answered (null: none could).")
    round: int
    content: str | None
    fallback_reason: str | None = Field(
        None, description="Why another tier answered (degraded mode, vision, a failed load)."
    )
    error: AgentErrorOut | None = Field(None, description="Why this agent has no answer.")
    peers_shown: int = Field(
        0, description="Other agents' previous answers this agent saw (cut to fit its context)."
    )


class SynthesisOut(BaseModel):
    model: str
    tier: str | None
    content: str | None
    fallback_reason: str | None = None
    error: AgentErrorOut | None = None


class RoundOut(BaseModel):
    round: int
    order: list[str] = Field(description="Tiers in the order their groups ran.")
    concurrent: bool = Field(description="Whether groups overlapped (normal mode).")
    loads: int = Field(description="Model loads the manager recorded during the round.")


class TimingsOut(BaseModel):
    policy: float = Field(description="Deciding the policy, ms.")
    rounds: list[float] = Field(description="Each round, ms.")
    synthesis: float | None = Field(description="The synthesis, ms (null: none asked).")
    total: float


class SwarmResponse(BaseModel):
    policy: PolicyOut
    groups: list[GroupOut]
    responses: list[AgentAnswerOut]
    synthesis: SynthesisOut | None
    schedule: list[RoundOut]
    timings_ms: TimingsOut


@router.post(
    "/swarm",
    summary="Several agents answer one prompt; the memory policy decides how they share the GPU",
    description="normal: agents run side by side; time_slice: grouped by tier, one group "
    "after another; degraded: all on `swarm.fallback_tier`. `policy` says which and why.",
    response_model=SwarmResponse,
)
async def swarm(req: SwarmRequest, service: SwarmDep) -> SwarmResponse:
    run = SwarmRun(
        prompt=req.prompt,
        agents=[Agent(a.name, a.role, a.model) for a in req.agents],
        rounds=req.rounds,
        synthesize=req.synthesize,
        images=req.images,
        max_tokens=req.max_tokens,
    )
    result = await service.run(run)
    return SwarmResponse.model_validate(result, from_attributes=True)
