"""The agent's memory: recent messages verbatim, older ones folded into a running summary.

Every answer sends the model the conversation's messages since its summary boundary verbatim
(`AnswerRequest.history`), and the summary of everything before it (`AnswerRequest.summary`).
Once the verbatim part passes `MEMORY_TOKEN_BUDGET` (estimated tokens, counted when an answer is
stored), the `summarize_conversation` job (`helpline.agents.tasks`) folds its older messages into
the summary, keeping the newest `keep_tokens(budget)` verbatim, so the prompt stays about the
budget's size however long the conversation grows.

The summary is written by the same chat model that answers: the previous summary and the
messages to fold go in the system prompt (`prompts/summary.md`), and a short fixed request is
the user message — so a customer's words are summarised, never read as instructions.
"""

from __future__ import annotations

from collections.abc import Sequence

from helpline.agents.chat import closing_stream
from helpline.agents.prompts import load_prompt
from helpline.agents.schemas import ChatMessage, ChatModel, TextDelta

SUMMARY_JOB = "summarize_conversation"
SUMMARY_REQUEST = "Write the updated summary of this conversation now."

SPEAKERS = {"user": "Customer", "assistant": "Assistant", "agent": "Support agent"}


class EmptySummary(Exception):
    """The model answered the summary request with no text."""


def keep_tokens(budget: int) -> int:
    """Tokens of the newest messages kept verbatim when a conversation is summarised.

    Half the budget: the next summary is then due only after another half of it.
    """
    return budget // 2


def transcript(messages: Sequence[tuple[str, str]]) -> str:
    """`(role, content)` pairs (`user`, `assistant`, `agent`) as a readable transcript."""
    return "\n\n".join(
        f"{SPEAKERS.get(role, role.capitalize())}: {content.strip()}"
        for role, content in messages
        if content.strip()
    )


def summary_messages(
    previous: str | None, messages: Sequence[tuple[str, str]]
) -> list[ChatMessage]:
    """The prompt that asks the model for the new running summary."""
    parts = [load_prompt("summary")]
    parts.append("## The summary so far\n\n" + (previous.strip() if previous else "(none yet)"))
    parts.append("## Messages to add to it\n\n" + transcript(messages))
    return [
        ChatMessage(role="system", content="\n\n".join(parts)),
        ChatMessage(role="user", content=SUMMARY_REQUEST),
    ]


async def summarize(
    model: ChatModel, *, previous: str | None, messages: Sequence[tuple[str, str]]
) -> str:
    """The running summary with `messages` folded into `previous`, written by `model`."""
    parts: list[str] = []
    async with closing_stream(model.stream(summary_messages(previous, messages))) as events:
        async for event in events:
            if isinstance(event, TextDelta):
                parts.append(event.text)
    summary = "".join(parts).strip()
    if not summary:
        raise EmptySummary("The model wrote an empty summary")
    return summary


def memory_section(summary: str | None) -> str:
    """The system prompt's section holding the summary of the conversation's older messages."""
    if not summary:
        return ""
    return (
        "## Earlier in this conversation\n\n"
        "A summary of the conversation's older messages (the newest ones follow verbatim):\n\n"
        f"{summary.strip()}"
    )
