"""`LLM_PROVIDER=extractive` (the default): answers from the knowledge base with no model.

It searches the knowledge base for the question, and if the best passage is relevant enough
(the calibrated `relevance` of `helpline.knowledge.search`, at least `threshold`) it answers
with the passage's most relevant run of sentences, quoted from the article, and cites it.
Otherwise it says it does not know and offers a person — it never guesses.

Events of `ExtractiveAnswerer.answer`, in order:

- `TextDelta` — the answer, a few words at a time (concatenated they are the whole text);
- `SourcesFound` — the chunks the answer quotes (only when it answers from the knowledge base);
- `Usage` — exactly one, last: an offline estimate (`estimated=True`): the question and the
  passages read count as the prompt, the answer as the completion.

A short follow-up ("and for annual plans?") is searched together with the previous user
message, since on its own it names no topic.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, Sequence

import structlog

from helpline.agents.schemas import (
    AnswerEvent,
    AnswerRequest,
    ChatMessage,
    Source,
    SourcesFound,
    TextDelta,
    Usage,
)
from helpline.agents.tokens import estimate_prompt_tokens, estimate_tokens
from helpline.knowledge.chunking import split_sentences
from helpline.knowledge.lexicon import stem, stems, terms
from helpline.knowledge.search import KnowledgeBase, SearchResult

log = structlog.get_logger(__name__)

MODEL = "extractive"
# Calibrated on bench/questions/dev.jsonl: answers above it are right far more often than not,
# and most questions the articles do not cover stay below it.
DEFAULT_THRESHOLD = 0.5
# Above this, no "if that does not help" line: the passage almost surely answers.
CONFIDENT = 0.8
MAX_WORDS = 80
WORDS_PER_DELTA = 3
FOLLOW_UP_MAX_TERMS = 3
CANDIDATES = 3  # passages considered for quoting
RANK_BONUS = 0.05  # per search rank, when choosing which passage to quote

DONT_KNOW = (
    "I'm not sure about that — I couldn't find it in our help centre, and I'd rather not "
    "guess. I can connect you with a member of our support team who can help."
)
MAYBE_HUMAN = (
    "If that doesn't answer your question, I can connect you with a member of our support team."
)
_PIECE = re.compile(r"\s*\S+")


def split_deltas(text: str, words: int = WORDS_PER_DELTA) -> list[str]:
    """`text` in pieces of a few words each, whitespace kept: `"".join(...) == text`."""
    pieces = _PIECE.findall(text)
    rest = text[len("".join(pieces)) :]
    grouped = ["".join(pieces[index : index + words]) for index in range(0, len(pieces), words)]
    if rest:
        grouped = [*grouped[:-1], grouped[-1] + rest] if grouped else [rest]
    return grouped


def _units(content: str) -> list[str]:
    """A passage as sentences, list items kept one per unit."""
    units: list[str] = []
    for paragraph in content.split("\n\n"):
        lines = [line for line in paragraph.split("\n") if line.strip()]
        is_list = len(lines) > 1 and all(re.match(r"\s*(?:[-*+]|\d+[.)])\s", ln) for ln in lines)
        if is_list:
            units.extend(line.rstrip() for line in lines)
        else:
            units.extend(split_sentences(paragraph))
    return units


def best_excerpt(question: str, content: str, *, max_words: int = MAX_WORDS) -> str:
    """The run of consecutive sentences of `content` that covers the question best.

    Sentences are scored by the share of the question's words they contain; the window with
    the highest total that fits `max_words` wins (earlier on ties), so a numbered procedure
    or a rule and its exception come out together.
    """
    units = _units(content)
    if not units:
        return content.strip()
    if sum(len(unit.split()) for unit in units) <= max_words:
        return _join(units)
    scores = _unit_scores(question, units)
    best: tuple[float, int, int] = (-1.0, 0, 1)
    for start in range(len(units)):
        words = 0
        total = 0.0
        for end in range(start, len(units)):
            words += len(units[end].split())
            if words > max_words and end > start:
                break
            total += scores[end]
            # A small bonus per sentence keeps context when scores tie.
            candidate = (total + 0.01 * (end - start), -start, end + 1)
            if candidate[0] > best[0]:
                best = (candidate[0], start, end + 1)
    _, start, end = best
    return _join(units[start:end])


def _unit_scores(question: str, units: Sequence[str]) -> list[float]:
    wanted = {stem(term) for term in terms(question)}
    if not wanted:
        return [0.0 for _ in units]
    return [len(wanted & stems(unit)) / len(wanted) for unit in units]


def sentence_score(question: str, content: str) -> float:
    """How well the best sentence of `content` covers the question's words, in [0, 1]."""
    units = _units(content)
    return max(_unit_scores(question, units), default=0.0)


def _join(units: Sequence[str]) -> str:
    text = ""
    for unit in units:
        if not text:
            text = unit
        elif re.match(r"\s*(?:[-*+]|\d+[.)])\s", unit):
            text += "\n" + unit
        elif re.search(r"\n\s*(?:[-*+]|\d+[.)])\s[^\n]*$", "\n" + text.split("\n")[-1]):
            text += "\n\n" + unit
        else:
            text += " " + unit
    return text.strip()


class ExtractiveAnswerer:
    """Quotes the knowledge base; says "I don't know" below `threshold`."""

    name = "extractive"
    model = MODEL

    def __init__(
        self,
        knowledge: KnowledgeBase,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        k: int = 5,
        max_words: int = MAX_WORDS,
    ) -> None:
        self.knowledge = knowledge
        self.threshold = threshold
        self.k = k
        self.max_words = max_words

    def follow_up_query(self, request: AnswerRequest) -> str | None:
        """The question with the previous user message, when it is a bare follow-up."""
        question = request.question.strip()
        if len(terms(question)) > FOLLOW_UP_MAX_TERMS:
            return None
        previous = next((m.content for m in reversed(request.history) if m.role == "user"), None)
        if not previous or previous.strip() == question:
            return None
        return f"{previous.strip()}\n{question}"

    async def _confident(self, query: str) -> list[SearchResult]:
        results = await self.knowledge.search(query=query, k=self.k)
        if not results or results[0].relevance < self.threshold:
            return []
        return results

    async def compose(self, request: AnswerRequest) -> tuple[str, list[SearchResult], str]:
        """The answer's text, the passages it quotes, and the query searched."""
        question = request.question.strip()
        results: list[SearchResult] = []
        query = question
        follow_up = self.follow_up_query(request)
        if follow_up is not None:
            combined = await self._confident(follow_up)
            # Only a follow-up if the passage found also speaks to the new words: "and how long
            # does the link work?" is; "can you recommend a pizza place?" after a 2FA question
            # is not (it is asked on its own below).
            own = {stem(term) for term in terms(question)}
            if combined and own & stems(combined[0].content + " " + combined[0].heading_path):
                results, query = combined, follow_up
        if not results:
            results = await self._confident(question)
        if not results:
            log.info("extractive.no_answer")
            return DONT_KNOW, [], query
        # Full-text ranking favours short passages whose headings match; among the confident
        # top passages, quote the one with the sentence that covers the question best.
        candidates = [r for r in results[:CANDIDATES] if r.relevance >= self.threshold]
        best = max(
            candidates,
            key=lambda r: sentence_score(query, r.content) + RANK_BONUS * -results.index(r),
        )
        excerpt = best_excerpt(query, best.content, max_words=self.max_words)
        text = f"From our help article “{best.title}”:\n\n{excerpt}"
        if best.relevance < CONFIDENT:
            text += f"\n\n{MAYBE_HUMAN}"
        return text, [best], query

    async def answer(self, request: AnswerRequest) -> AsyncGenerator[AnswerEvent, None]:
        """Stream the answer to `request`: text pieces, its sources, then one `Usage`."""
        text, used, query = await self.compose(request)
        for piece in split_deltas(text):
            yield TextDelta(piece)
            await asyncio.sleep(0)  # a cancellation lands between pieces
        if used:
            yield SourcesFound(
                [
                    Source(
                        document_id=result.document_id, title=result.title, chunk_id=result.chunk_id
                    )
                    for result in used
                ]
            )
        read = "\n\n".join(result.content for result in used)
        prompt = [ChatMessage(role="user", content=query)]
        if read:
            prompt.append(ChatMessage(role="system", content=read))
        yield Usage(
            prompt_tokens=estimate_prompt_tokens(prompt),
            completion_tokens=estimate_tokens(text),
            estimated=True,
        )
