"""The agent's tools, each with a real backend behind it.

- `search_knowledge_base(query)` runs the knowledge base's hybrid search and gives the model the
  passages it found, numbered for citing (a passage already known keeps its number).
- `escalate_to_human(reason)` hands the conversation to the support team through the
  conversations service (`waiting_for_agent`, a system note and a `status` frame).

Who the tools act for — the conversation and the customer — comes from the `ToolRun` the graph
builds from the answer's `AnswerRequest`, never from the model's arguments: arguments a tool
does not take (a `conversation_id`, say) are ignored. A tool's result is plain text for the
model. Bad arguments are reported to the model as a sentence by `run_tool`, and so is a tool
that fails (after logging it): the model can then try again, or tell the customer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from helpline.agents.schemas import AnswerRequest, Escalate, ToolCall, ToolSpec
from helpline.core import telemetry
from helpline.core.errors import AppError
from helpline.knowledge.search import KnowledgeBase, SearchResult

log = structlog.get_logger(__name__)

SEARCH_TOOL = "search_knowledge_base"
ESCALATE_TOOL = "escalate_to_human"
QUERY_MAX_LENGTH = 500
REASON_MAX_LENGTH = 500


@dataclass(frozen=True, slots=True)
class Passage:
    """A knowledge-base passage shown to the model during one answer, with its citation number."""

    number: int
    result: SearchResult


def render_passage(passage: Passage) -> str:
    heading = passage.result.heading_path or passage.result.title
    return f"[{passage.number}] {heading}\n{passage.result.content.strip()}"


def render_passages(passages: Sequence[Passage]) -> str:
    return "\n\n".join(render_passage(passage) for passage in passages)


def number_passages(results: Sequence[SearchResult], known: Sequence[Passage]) -> list[Passage]:
    """`results` as passages: a chunk already known keeps its number, new ones get the next."""
    by_chunk = {passage.result.chunk_id: passage for passage in known}
    next_number = max((passage.number for passage in known), default=0) + 1
    numbered: list[Passage] = []
    for result in results:
        passage = by_chunk.get(result.chunk_id)
        if passage is None:
            passage = Passage(number=next_number, result=result)
            by_chunk[result.chunk_id] = passage
            next_number += 1
        if passage not in numbered:
            numbered.append(passage)
    return numbered


@dataclass(frozen=True, slots=True)
class ToolRun:
    """What a tool may use while it runs: the answer's identity and the passages shown so far."""

    request: AnswerRequest
    passages: Sequence[Passage] = ()


@dataclass(slots=True)
class ToolOutcome:
    """A tool's result: `text` for the model, `detail` for logs, and what it changed."""

    text: str
    detail: str = ""
    failed: bool = False
    passages: list[Passage] = field(default_factory=list)  # new passages to cite
    escalated: bool = False


class Tool(Protocol):
    spec: ToolSpec

    async def run(self, arguments: dict[str, Any], run: ToolRun) -> ToolOutcome: ...


class SearchArguments(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    query: str = Field(min_length=1, max_length=QUERY_MAX_LENGTH)


class EscalateArguments(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    reason: str = Field(default="", max_length=REASON_MAX_LENGTH)


class SearchKnowledgeBase:
    """Searches the help centre for the model."""

    spec = ToolSpec(
        name=SEARCH_TOOL,
        description=(
            "Search the company's help-centre articles. Use it when the passages you were given "
            "do not answer the question, with the words an article would use. Returns numbered "
            "passages; cite the ones you use by their number, e.g. [3]."
        ),
        parameters={
            "type": "object",
            "properties": {
                "query": {
                    "type": "string",
                    "description": "What to look for, in a few words.",
                    "maxLength": QUERY_MAX_LENGTH,
                }
            },
            "required": ["query"],
        },
    )

    def __init__(self, knowledge: KnowledgeBase, *, k: int = 4, min_relevance: float = 0.1):
        self.knowledge = knowledge
        self.k = k
        self.min_relevance = min_relevance

    async def run(self, arguments: dict[str, Any], run: ToolRun) -> ToolOutcome:
        query = SearchArguments.model_validate(arguments).query
        results = await self.knowledge.search(query=query, k=self.k)
        found = [result for result in results if result.relevance >= self.min_relevance]
        if not found:
            return ToolOutcome(
                text=f"No help-centre passage matches “{query}”.", detail="no passages"
            )
        passages = number_passages(found, run.passages)
        known = {passage.number for passage in run.passages}
        return ToolOutcome(
            text="Passages found (cite them by their number):\n\n" + render_passages(passages),
            detail=f"{len(passages)} passages",
            passages=[passage for passage in passages if passage.number not in known],
        )


class EscalateToHuman:
    """Hands the conversation over to the support team."""

    spec = ToolSpec(
        name=ESCALATE_TOOL,
        description=(
            "Hand this conversation over to a human support agent, who will join it. Use it "
            "when the customer asks for a person, needs something done on their account, "
            "order or payment, is upset, or when the help centre does not answer the question."
        ),
        parameters={
            "type": "object",
            "properties": {
                "reason": {
                    "type": "string",
                    "description": "Why a person is needed, in one sentence for the agent.",
                    "maxLength": REASON_MAX_LENGTH,
                }
            },
            "required": ["reason"],
        },
    )

    def __init__(self, escalate: Escalate) -> None:
        self.escalate = escalate

    async def run(self, arguments: dict[str, Any], run: ToolRun) -> ToolOutcome:
        reason = EscalateArguments.model_validate(arguments).reason
        request = run.request
        await self.escalate(request.conversation_id, request.user_id, reason)
        return ToolOutcome(
            text=(
                "Done: the conversation now waits for a member of the support team, who will "
                "join it here."
            ),
            detail="handed over to the support team",
            escalated=True,
        )


class BadArguments(Exception):
    """A tool call's arguments are not a JSON object."""


def _arguments(call: ToolCall) -> dict[str, Any]:
    try:
        value = json.loads(call.arguments or "{}")
    except ValueError as exc:
        raise ValueError("its arguments are not valid JSON") from exc
    if not isinstance(value, dict):
        raise ValueError("its arguments must be a JSON object")
    return value


def _invalid(error: ValidationError) -> str:
    problems = []
    for issue in error.errors():
        where = ".".join(str(part) for part in issue["loc"]) or "arguments"
        problems.append(f"{where}: {issue['msg']}")
    return "; ".join(problems)


async def run_tool(tools: Sequence[Tool], call: ToolCall, run: ToolRun) -> ToolOutcome:
    """Run the tool `call` names; whatever goes wrong becomes a sentence for the model."""
    tool = next((tool for tool in tools if tool.spec.name == call.name), None)
    if tool is None:
        names = ", ".join(tool.spec.name for tool in tools) or "none"
        return ToolOutcome(
            text=f"There is no tool called {call.name!r}. The tools are: {names}.",
            detail="unknown tool",
            failed=True,
        )
    context = {
        "tool": call.name,
        "conversation_id": str(run.request.conversation_id),
        "message_id": str(run.request.assistant_message_id),
    }
    with telemetry.get_tracer().start_as_current_span(
        f"tool {call.name}", attributes={"helpline.tool": call.name}
    ) as span:
        try:
            try:
                arguments = _arguments(call)
            except ValueError as exc:
                raise BadArguments(str(exc)) from exc
            outcome = await tool.run(arguments, run)
        except (BadArguments, ValidationError) as exc:
            # The model can fix its call: tell it what was wrong.
            detail = _invalid(exc) if isinstance(exc, ValidationError) else str(exc)
            log.info("agent.tool_bad_arguments", error=detail, **context)
            span.set_attribute("helpline.tool_outcome", "bad_arguments")
            return ToolOutcome(
                text=f"The {call.name} tool was not run: {detail}.",
                detail="bad arguments",
                failed=True,
            )
        except AppError as exc:
            # Expected refusals (e.g. a person already handles the conversation) say why.
            log.warning("agent.tool_failed", error=exc.message, **context)
            span.set_attribute("helpline.tool_outcome", "failed")
            return ToolOutcome(
                text=f"The {call.name} tool failed: {exc.message.rstrip('.')}.",
                detail=exc.code,
                failed=True,
            )
        except Exception:
            log.exception("agent.tool_failed", **context)
            span.set_attribute("helpline.tool_outcome", "failed")
            return ToolOutcome(
                text=(
                    f"The {call.name} tool failed because of a technical problem; it did not "
                    "do anything. Do not retry it in this answer."
                ),
                detail="error",
                failed=True,
            )
        span.set_attribute("helpline.tool_outcome", "ok")
    log.info("agent.tool_finished", detail=outcome.detail, **context)
    return outcome
