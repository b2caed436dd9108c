"""The support agent: a LangGraph graph answering from the knowledge base, with tools.

The answerer for `LLM_PROVIDER` `openai`, `anthropic` and `fake`. One answer runs the graph

    retrieve ─▶ model ─┬─▶ finish
                  ▲    └─▶ tools ─┬─▶ model          (at most `max_tool_rounds` times)
                  └───────────────┘  └─▶ handoff ─▶ finish   (after a successful escalation)

- **retrieve** searches the knowledge base for the question (a short follow-up together with
  the previous question) and keeps the relevant passages, numbered [1], [2], …;
- **model** sends the system prompt (`prompts/agent.md`, or `AGENT_PROMPT_FILE`), the running
  summary of older messages, the passages, the recent messages, the question and the tool
  exchange so far to the chat model, offering the tools while rounds are left (and asking
  again without them when the server refuses tools with a 400), and streams its text as it
  comes;
- **tools** runs the tool calls the model made (`helpline.agents.tools`), with the identity of
  the answer from the run's context (`AgentContext`), and gives the model their results;
- **handoff** ends the answer once the conversation was handed to a person, telling the
  customer so (the assistant stays silent from then on);
- **finish** works out the sources and the usage.

Events of `SupportAgent.answer`, in order:

- `TextDelta` — the answer's text, piece by piece as the model streams it (the texts of several
  model calls are joined by a blank line, and the handoff notice follows the same way);
- `ToolActivity` — `started`, then `finished` or `failed`, around every tool call;
- `SourcesFound` — the passages the answer cites (`[n]`), or, when it cites none, those whose
  words it reuses; left out when there are none;
- `Usage` — exactly one, last: the sum over the answer's model calls of the provider's figures
  (`estimated` when any of them was an estimate).

The nodes write these events with LangGraph's stream writer and `answer` relays them
(`stream_mode="custom"`). Cancelling the task that iterates `answer` — or closing it — closes
the graph's stream, which cancels the node running and waits for it: the model's stream is
closed in the node (`closing_stream`), so the provider's HTTP response is closed before the
cancellation completes. The graph has no subgraphs, whose cancellation LangGraph does not
propagate reliably.
"""

from __future__ import annotations

import operator
import re
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any, Literal, TypedDict

import structlog
from langgraph.graph.state import CompiledStateGraph, StateGraph
from langgraph.runtime import Runtime

from helpline.agents.chat import DEFAULT_HISTORY_TOKEN_BUDGET, build_messages, closing_stream
from helpline.agents.exceptions import ConfigurationError, LLMServiceError
from helpline.agents.memory import memory_section
from helpline.agents.prompts import load_prompt
from helpline.agents.providers.streaming import ProviderFailure
from helpline.agents.schemas import (
    AnswerEvent,
    AnswerRequest,
    ChatMessage,
    Escalate,
    Source,
    SourcesFound,
    TextDelta,
    ToolActivity,
    ToolCall,
    ToolCallingChatModel,
    Usage,
)
from helpline.agents.tokens import estimate_prompt_tokens, estimate_tokens
from helpline.agents.tools import (
    EscalateToHuman,
    Passage,
    SearchKnowledgeBase,
    Tool,
    ToolRun,
    number_passages,
    render_passages,
    run_tool,
)
from helpline.knowledge.lexicon import stems, terms
from helpline.knowledge.search import KnowledgeBase

log = structlog.get_logger(__name__)

MAX_TOOL_ROUNDS = 3
CONTEXT_PASSAGES = 4
# Calibrated relevance below which a retrieved passage stays out of the prompt: an unrelated
# passage invites a confident wrong answer, where "no passage matched" invites a search.
MIN_RELEVANCE = 0.25
FOLLOW_UP_MAX_TERMS = 3
# Without citations, a passage counts as a source when the answer reuses this share of its
# own distinctive words from it (and at least `REUSE_MIN_WORDS` of them).
REUSE_SHARE = 0.5
REUSE_MIN_WORDS = 3
SEPARATOR = "\n\n"
HANDOFF_NOTICE = (
    "I've asked a member of our support team to join this conversation. They will reply here "
    "as soon as they can."
)
NO_PASSAGES = (
    "No help-centre passage matched the customer's message. Search the knowledge base with "
    "other words, or say that you don't know and offer to bring in a person."
)
_CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")


@dataclass(frozen=True, slots=True)
class AgentContext:
    """The run's context: who the answer is for. Tools read identity from here only."""

    request: AnswerRequest


class AgentState(TypedDict):
    passages: Annotated[list[Passage], operator.add]  # every passage shown, numbered
    context_count: int  # how many of them are the retrieved context (the rest: searches)
    exchange: Annotated[list[ChatMessage], operator.add]  # tool calls and results so far
    texts: Annotated[list[str], operator.add]  # the text streamed, piece groups in order
    usages: Annotated[list[Usage], operator.add]  # one per model call
    pending: list[ToolCall]  # the last model call's tool calls
    rounds: int  # tool rounds done
    escalated: bool


def render_prompt(template: str, *, assistant_name: str, company_name: str) -> str:
    """The system prompt template with its `{{assistant_name}}` and `{{company_name}}` filled."""
    return (
        template.replace("{{assistant_name}}", assistant_name)
        .replace("{{company_name}}", company_name)
        .strip()
    )


def load_agent_prompt(path: Path | None = None) -> str:
    """The agent's prompt template: `path` (`AGENT_PROMPT_FILE`) or the bundled `agent.md`."""
    if path is None:
        return load_prompt("agent")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"AGENT_PROMPT_FILE={path} cannot be read: {exc}") from exc
    if not text.strip():
        raise ConfigurationError(f"AGENT_PROMPT_FILE={path} is empty")
    return text


def knowledge_section(passages: Sequence[Passage]) -> str:
    if not passages:
        return f"## Help-centre passages\n\n{NO_PASSAGES}"
    return "## Help-centre passages\n\n" + render_passages(passages)


def cited_numbers(text: str) -> list[int]:
    """The passage numbers `text` cites (`[2]`, `[1, 3]`), in order of first citation."""
    numbers: list[int] = []
    for match in _CITATION.finditer(text):
        for part in match.group(1).split(","):
            number = int(part)
            if number not in numbers:
                numbers.append(number)
    return numbers


def used_passages(text: str, passages: Sequence[Passage]) -> list[Passage]:
    """The passages the answer draws on: those it cites, else those whose words it reuses."""
    by_number = {passage.number: passage for passage in passages}
    cited = [by_number[number] for number in cited_numbers(text) if number in by_number]
    if cited:
        return cited
    answer = stems(text)
    if not answer:
        return []
    reused: list[Passage] = []
    for passage in passages:
        own = stems(passage.result.content)
        shared = answer & own
        if len(shared) >= REUSE_MIN_WORDS and len(shared) >= REUSE_SHARE * min(
            len(own), len(answer)
        ):
            reused.append(passage)
    return reused


def refused_tools(error: LLMServiceError) -> bool:
    """Whether the model call failed, before any text, because tools were offered (HTTP 400)."""
    failure = error.__cause__
    return isinstance(failure, ProviderFailure) and failure.status == HTTPStatus.BAD_REQUEST


def total_usage(usages: Sequence[Usage]) -> Usage:
    """The answer's usage: the figures of its model calls (each provider's, or its estimate)."""
    return Usage(
        prompt_tokens=sum(usage.prompt_tokens for usage in usages),
        completion_tokens=sum(usage.completion_tokens for usage in usages),
        estimated=any(usage.estimated for usage in usages),
    )


class SupportAgent:
    """The LangGraph support agent (see the module docstring)."""

    name = "agent"

    def __init__(
        self,
        chat_model: ToolCallingChatModel,
        knowledge: KnowledgeBase,
        *,
        escalate: Escalate | None = None,
        prompt_template: str | None = None,
        assistant_name: str = "Helpline Assistant",
        company_name: str = "our company",
        history_token_budget: int = DEFAULT_HISTORY_TOKEN_BUDGET,
        max_tool_rounds: int = MAX_TOOL_ROUNDS,
        context_passages: int = CONTEXT_PASSAGES,
        min_relevance: float = MIN_RELEVANCE,
    ) -> None:
        self.chat_model = chat_model
        self.model = chat_model.model
        self.knowledge = knowledge
        template = load_agent_prompt() if prompt_template is None else prompt_template
        self.system_prompt = render_prompt(
            template, assistant_name=assistant_name, company_name=company_name
        )
        self.history_token_budget = history_token_budget
        self.max_tool_rounds = max_tool_rounds
        self.context_passages = context_passages
        self.min_relevance = min_relevance
        # No tool without a backend: without a way to hand over, there is no escalation tool.
        self.tools: list[Tool] = [SearchKnowledgeBase(knowledge)]
        if escalate is not None:
            self.tools.append(EscalateToHuman(escalate))
        self.graph = self._build()

    # -- the graph -----------------------------------------------------------------------------

    def _build(self) -> CompiledStateGraph[AgentState, AgentContext, AgentState, AgentState]:
        builder = StateGraph(AgentState, context_schema=AgentContext)
        builder.add_node("retrieve", self._retrieve)
        builder.add_node("model", self._call_model)
        builder.add_node("tools", self._run_tools)
        builder.add_node("handoff", self._handoff)
        builder.add_node("finish", self._finish)
        builder.set_entry_point("retrieve")
        builder.add_edge("retrieve", "model")
        builder.add_conditional_edges("model", self._after_model, ["tools", "finish"])
        builder.add_conditional_edges("tools", self._after_tools, ["model", "handoff"])
        builder.add_edge("handoff", "finish")
        builder.set_finish_point("finish")
        return builder.compile(name="support-agent")

    @staticmethod
    def _after_model(state: AgentState) -> Literal["tools", "finish"]:
        return "tools" if state["pending"] else "finish"

    @staticmethod
    def _after_tools(state: AgentState) -> Literal["model", "handoff"]:
        return "handoff" if state["escalated"] else "model"

    async def answer(self, request: AnswerRequest) -> AsyncGenerator[AnswerEvent, None]:
        """Run the graph for `request`, relaying its events (see the module docstring)."""
        initial: AgentState = {
            "passages": [],
            "context_count": 0,
            "exchange": [],
            "texts": [],
            "usages": [],
            "pending": [],
            "rounds": 0,
            "escalated": False,
        }
        stream: AsyncIterator[Any] = self.graph.astream(
            initial,
            {"recursion_limit": 4 * self.max_tool_rounds + 10},
            context=AgentContext(request=request),
            stream_mode="custom",
        )
        # Closed also when the reader stops early: that cancels the node still running.
        async with closing_stream(stream) as events:
            async for event in events:
                if isinstance(event, TextDelta | SourcesFound | ToolActivity | Usage):
                    yield event

    # -- nodes ---------------------------------------------------------------------------------

    def retrieval_query(self, request: AnswerRequest) -> str:
        """What to search for: the question, with the previous one when it is a bare follow-up."""
        question = request.question.strip()
        if len(terms(question)) > FOLLOW_UP_MAX_TERMS:
            return question
        previous = next((m.content for m in reversed(request.history) if m.role == "user"), None)
        if not previous or previous.strip() == question:
            return question
        return f"{previous.strip()}\n{question}"

    async def _retrieve(self, state: AgentState, runtime: Runtime[AgentContext]) -> dict[str, Any]:
        del state
        request = runtime.context.request
        try:
            results = await self.knowledge.search(
                query=self.retrieval_query(request), k=self.context_passages
            )
        except Exception:
            # The model can still answer from the conversation, search again or hand over.
            log.exception("agent.retrieval_failed", conversation_id=str(request.conversation_id))
            results = []
        relevant = [result for result in results if result.relevance >= self.min_relevance]
        passages = number_passages(relevant, ())
        return {"passages": passages, "context_count": len(passages)}

    def build_messages(
        self,
        request: AnswerRequest,
        context: Sequence[Passage],
        exchange: Sequence[ChatMessage] = (),
    ) -> list[ChatMessage]:
        """The prompt: system prompt, summary, passages, recent messages, question, tool turns."""
        sections = [self.system_prompt]
        if memory := memory_section(request.summary):
            sections.append(memory)
        sections.append(knowledge_section(context))
        messages = build_messages(
            request, SEPARATOR.join(sections), history_token_budget=self.history_token_budget
        )
        messages.extend(exchange)
        return messages

    async def _call_model(
        self, state: AgentState, runtime: Runtime[AgentContext]
    ) -> dict[str, Any]:
        request = runtime.context.request
        messages = self.build_messages(
            request, state["passages"][: state["context_count"]], state["exchange"]
        )
        offer_tools = state["rounds"] < self.max_tool_rounds
        separator = SEPARATOR if any(state["texts"]) else ""
        try:
            text, calls, usage = await self._stream_model(
                messages, offer_tools=offer_tools, separator=separator, runtime=runtime
            )
        except LLMServiceError as exc:
            if not offer_tools or not refused_tools(exc):
                raise
            # Self-hosted servers often take no tools (a model without a tool template, a
            # server started without a tool parser) and say so with a 400: answer without.
            log.warning("agent.tools_refused", model=self.model, error=exc.message)
            text, calls, usage = await self._stream_model(
                messages, offer_tools=False, separator=separator, runtime=runtime
            )
        update: dict[str, Any] = {"texts": [text], "pending": calls}
        if usage is not None:
            update["usages"] = [usage]
        if calls:
            spoken = text[len(separator) :] if separator else text
            update["exchange"] = [
                ChatMessage(role="assistant", content=spoken, tool_calls=tuple(calls))
            ]
        return update

    async def _stream_model(
        self,
        messages: Sequence[ChatMessage],
        *,
        offer_tools: bool,
        separator: str,
        runtime: Runtime[AgentContext],
    ) -> tuple[str, list[ToolCall], Usage | None]:
        """One model call, its text streamed out as it comes: the text, tool calls and usage."""
        pieces: list[str] = []
        calls: list[ToolCall] = []
        usage: Usage | None = None
        if offer_tools:
            stream = self.chat_model.stream(messages, tools=[tool.spec for tool in self.tools])
        else:
            stream = self.chat_model.stream(messages)
        async with closing_stream(stream) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    if not event.text:
                        continue
                    text = event.text
                    if not pieces and separator:
                        text = separator + text.lstrip()
                    pieces.append(text)
                    runtime.stream_writer(TextDelta(text))
                elif isinstance(event, ToolCall):
                    calls.append(event)
                else:
                    usage = event
        return "".join(pieces), calls, usage

    async def _run_tools(self, state: AgentState, runtime: Runtime[AgentContext]) -> dict[str, Any]:
        request = runtime.context.request
        known = list(state["passages"])
        found: list[Passage] = []
        results: list[ChatMessage] = []
        escalated = False
        for call in state["pending"]:
            runtime.stream_writer(ToolActivity(name=call.name, status="started"))
            outcome = await run_tool(
                self.tools, call, ToolRun(request=request, passages=(*known, *found))
            )
            found.extend(outcome.passages)
            escalated = escalated or outcome.escalated
            results.append(ChatMessage(role="tool", content=outcome.text, tool_call_id=call.id))
            runtime.stream_writer(
                ToolActivity(
                    name=call.name,
                    status="failed" if outcome.failed else "finished",
                    detail=outcome.detail,
                )
            )
        return {
            "exchange": results,
            "passages": found,
            "pending": [],
            "rounds": state["rounds"] + 1,
            "escalated": escalated,
        }

    async def _handoff(self, state: AgentState, runtime: Runtime[AgentContext]) -> dict[str, Any]:
        notice = (SEPARATOR if any(state["texts"]) else "") + HANDOFF_NOTICE
        runtime.stream_writer(TextDelta(notice))
        return {"texts": [notice]}

    async def _finish(self, state: AgentState, runtime: Runtime[AgentContext]) -> dict[str, Any]:
        request = runtime.context.request
        text = "".join(state["texts"])
        used = used_passages(text, state["passages"])
        if used:
            runtime.stream_writer(
                SourcesFound(
                    [
                        Source(
                            document_id=passage.result.document_id,
                            title=passage.result.title,
                            chunk_id=passage.result.chunk_id,
                        )
                        for passage in used
                    ]
                )
            )
        if state["usages"]:
            usage = total_usage(state["usages"])
        else:
            # Providers always end with a usage; this is for a model that would not.
            context = state["passages"][: state["context_count"]]
            usage = Usage(
                prompt_tokens=estimate_prompt_tokens(self.build_messages(request, context)),
                completion_tokens=estimate_tokens(text),
                estimated=True,
            )
        runtime.stream_writer(usage)
        log.info(
            "agent.answered",
            conversation_id=str(request.conversation_id),
            model_calls=len(state["usages"]),
            tool_rounds=state["rounds"],
            sources=len(used),
            escalated=state["escalated"],
        )
        return {}
