"""The `fake` provider: deterministic answers steered by `[[...]]` directives in the message."""

from __future__ import annotations

import asyncio
import gc
import json
import time
import weakref

import pytest

from helpline.agents.exceptions import LLMServiceError
from helpline.agents.providers.fake import (
    CLOCK_TICK_S,
    FakeChatModel,
    parse_script,
    piece_clock,
    split_pieces,
)
from helpline.agents.schemas import ChatMessage, TextDelta, ToolCall, ToolSpec, Usage
from helpline.agents.tokens import estimate_prompt_tokens, estimate_tokens


def ask(text: str) -> list[ChatMessage]:
    return [
        ChatMessage(role="system", content="Be helpful."),
        ChatMessage(role="user", content='An earlier question [[reply="old"]]'),
        ChatMessage(role="assistant", content="old"),
        ChatMessage(role="user", content=text),
    ]


async def run(model: FakeChatModel, text: str) -> tuple[list[str], list[Usage]]:
    texts: list[str] = []
    usages: list[Usage] = []
    async for event in model.stream(ask(text)):
        if isinstance(event, TextDelta):
            texts.append(event.text)
        else:
            usages.append(event)
    return texts, usages


async def test_default_answer_quotes_the_question_one_word_per_piece() -> None:
    texts, usages = await run(FakeChatModel(), "Where is my invoice?")

    answer = "".join(texts)
    assert '"Where is my invoice?"' in answer
    assert len(texts) == len(answer.split()) > 5
    assert all(piece.startswith(" ") for piece in texts[1:])
    assert usages == [
        Usage(
            prompt_tokens=estimate_prompt_tokens(ask("Where is my invoice?")),
            completion_tokens=len(texts),
        )
    ]


async def test_reply_directive_answers_exactly_that_text() -> None:
    message = 'Hi [[reply="Line one.\nIt\'s a \\"quote\\" and a \\\\  here."]]'

    texts, _ = await run(FakeChatModel(), message)

    assert "".join(texts) == 'Line one.\nIt\'s a "quote" and a \\  here.'


async def test_directives_are_read_from_the_last_user_message_only() -> None:
    texts, _ = await run(FakeChatModel(), "What now?")

    assert "old" not in "".join(texts)
    assert '"What now?"' in "".join(texts)


async def test_tokens_directive_sets_the_number_of_pieces() -> None:
    texts, usages = await run(FakeChatModel(), "Count [[tokens=50]]")

    assert len(texts) == 50
    assert usages[0].completion_tokens == 50
    assert "[[" not in "".join(texts)


async def test_tokens_directive_repeats_the_words_of_a_reply() -> None:
    texts, _ = await run(FakeChatModel(), '[[reply="alpha beta" tokens=5]]')

    assert texts == ["alpha", " beta", " alpha", " beta", " alpha"]


async def test_delay_is_awaited_per_piece() -> None:
    started = time.monotonic()

    texts, _ = await run(FakeChatModel(), "[[tokens=6 delay_ms=30]] slow please")

    assert len(texts) == 6
    assert time.monotonic() - started >= 6 * 0.03 * 0.9


async def test_pieces_keep_their_schedule_when_the_reader_falls_behind() -> None:
    """Like a remote model: a slow reader does not slow the stream down, it catches up."""
    arrivals: list[float] = []
    started = time.monotonic()
    async for event in FakeChatModel().stream(ask("[[tokens=10 delay_ms=20]]")):
        if isinstance(event, TextDelta):
            arrivals.append(time.monotonic() - started)
            if len(arrivals) == 1:
                await asyncio.sleep(0.15)  # the reader stalls for 7.5 pieces' time

    assert len(arrivals) == 10
    # Pieces 2-8 were due during the stall and come at once after it; the stream ends on
    # time (10 x 20 ms), not 150 ms late.
    assert arrivals[7] - arrivals[1] < 0.02
    assert arrivals[-1] < 0.2 + 0.1


async def test_pieces_due_while_the_reader_was_away_come_without_yielding_to_the_loop() -> None:
    """As buffered network data: what fell due during a stall is read back to back; the
    stream yields again for the first piece not yet due, and for every piece without a delay."""
    loop_turns = 0

    def count_turns() -> None:
        nonlocal loop_turns
        loop_turns += 1
        turns.append(loop.call_soon(count_turns))

    loop = asyncio.get_running_loop()
    turns = [loop.call_soon(count_turns)]
    turns_at_piece: list[int] = []
    try:
        # The first piece at once, then one every 50 ms: a first piece that came late (a busy
        # machine) cannot take the second with it.
        script = "[[tokens=20 delay_ms=50 first_delay_ms=0]]"
        async for event in FakeChatModel().stream(ask(script)):
            if isinstance(event, TextDelta):
                turns_at_piece.append(loop_turns)
                if len(turns_at_piece) == 1:
                    # A busy loop, blocked on purpose: pieces 2-6 (50-250 ms) fall due meanwhile.
                    time.sleep(0.275)  # noqa: ASYNC251
        paced = list(turns_at_piece)
        turns_at_piece.clear()
        async for event in FakeChatModel().stream(ask("[[tokens=5]]")):
            if isinstance(event, TextDelta):
                turns_at_piece.append(loop_turns)
    finally:
        turns[-1].cancel()
    assert len(paced) == 20
    assert len(set(paced[1:6])) == 1  # pieces 2-6 without a turn of the loop between them
    assert paced[-1] > paced[5]  # the last was not due yet: the stream waited for it
    assert len(set(turns_at_piece)) == 5  # no delay: a turn before every piece


async def test_the_piece_clock_wakes_each_wait_at_its_time_never_before() -> None:
    clock = piece_clock()
    loop = asyncio.get_running_loop()
    start = loop.time()
    whens = [start + offset for offset in (0.012, 0.0051, 0.0302, 0.0053, 0.02)]
    woken: dict[float, float] = {}
    order: list[float] = []

    async def wait(when: float) -> None:
        await clock.wait_until(when)
        woken[when] = loop.time()
        order.append(when)

    await asyncio.gather(*(wait(when) for when in whens))

    for when in whens:
        assert when <= woken[when] < when + 1.0  # on a busy machine, late; never early
    # By due time; the two waits due in one tick in the order they were asked for.
    assert order == [whens[1], whens[3], whens[0], whens[4], whens[2]]


async def test_the_waits_due_in_one_tick_share_one_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    timers: list[float] = []
    call_at = loop.call_at

    def counting_call_at(when: float, *args: object, **kwargs: object) -> asyncio.TimerHandle:
        timers.append(when)
        return call_at(when, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "call_at", counting_call_at)
    clock = piece_clock()
    tick = (loop.time() + 0.02) // CLOCK_TICK_S * CLOCK_TICK_S
    waits = [clock.wait_until(tick + CLOCK_TICK_S * fraction) for fraction in (0.1, 0.5, 0.9)]
    later = clock.wait_until(tick + CLOCK_TICK_S * 3.5)

    await asyncio.gather(*waits, later)

    assert len(timers) == 2


async def test_a_cancelled_wait_leaves_the_others_of_its_tick_to_wake() -> None:
    clock = piece_clock()
    when = asyncio.get_running_loop().time() + 0.01
    cancelled = asyncio.ensure_future(clock.wait_until(when))
    others = [clock.wait_until(when), clock.wait_until(when)]
    await asyncio.sleep(0)
    cancelled.cancel()

    await asyncio.wait_for(asyncio.gather(*others), 1)

    assert cancelled.cancelled()
    assert all(other.done() and not other.cancelled() for other in others)


def test_a_closed_loop_is_not_kept_alive_by_its_clock() -> None:
    loop = asyncio.new_event_loop()
    texts, _ = loop.run_until_complete(run(FakeChatModel(), "[[tokens=3 delay_ms=2]]"))
    loop.close()
    collected = weakref.ref(loop)
    del loop
    gc.collect()

    assert len(texts) == 3
    assert collected() is None


async def test_many_paced_streams_keep_their_schedule_on_the_shared_clock() -> None:
    model = FakeChatModel()
    started = time.monotonic()
    results = await asyncio.gather(
        *(run(model, f"[[tokens=10 delay_ms={5 + index % 7}]]") for index in range(200))
    )

    assert [len(texts) for texts, _ in results] == [10] * 200
    # The slowest stream takes 10 x 11 ms; nobody waits a piece's delay more than once.
    assert 10 * 0.011 * 0.9 <= time.monotonic() - started < 10 * 0.011 + 1.0


async def test_fail_after_raises_after_that_many_pieces() -> None:
    model = FakeChatModel()
    texts: list[str] = []

    async def read() -> None:
        async for event in model.stream(ask("[[tokens=10 fail_after=3]]")):
            if isinstance(event, TextDelta):
                texts.append(event.text)

    with pytest.raises(LLMServiceError):
        await read()
    assert len(texts) == 3
    assert (model.failed_streams, model.active_streams) == (1, 0)


async def test_hang_waits_until_cancelled_and_counts_the_cancel() -> None:
    model = FakeChatModel()
    received = asyncio.Event()

    async def read() -> None:
        async for _event in model.stream(ask("[[tokens=5 hang_after=2]]")):
            received.set()

    task = asyncio.create_task(read())
    await asyncio.wait_for(received.wait(), timeout=2)
    assert model.active_streams == 1

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (model.active_streams, model.cancelled_streams, model.completed_streams) == (0, 1, 0)


async def test_a_bare_hang_flag_hangs_before_any_text() -> None:
    model = FakeChatModel()
    stream = model.stream(ask("[[hang]]"))

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(stream), timeout=0.1)
    assert model.cancelled_streams == 1


async def test_usage_off_gives_an_estimate() -> None:
    texts, usages = await run(FakeChatModel(), '[[usage=off reply="Two words"]]')

    assert usages == [
        Usage(
            prompt_tokens=estimate_prompt_tokens(ask('[[usage=off reply="Two words"]]')),
            completion_tokens=estimate_tokens("Two words"),
            estimated=True,
        )
    ]
    assert texts == ["Two", " words"]


async def test_counts_completed_streams_and_keeps_the_requests() -> None:
    model = FakeChatModel()

    await run(model, "one")
    await run(model, "two")

    assert (model.completed_streams, model.active_streams, model.cancelled_streams) == (2, 0, 0)
    assert [request[-1].content for request in model.requests] == ["one", "two"]


def test_bad_and_unknown_directives_are_ignored() -> None:
    script = parse_script("Hello [[tokens=many colour=blue delay_ms=5]] there")

    assert script.tokens is None
    assert script.delay_ms == 5
    assert script.question == "Hello there"


@pytest.mark.parametrize(
    "text", ["", "one", "  leading", "trailing  ", "a  b\n\nc\t d ", "多 言語 text"]
)
def test_pieces_rebuild_the_text_exactly(text: str) -> None:
    assert "".join(split_pieces(text)) == text


# -- tool calls ------------------------------------------------------------------------------

SEARCH = ToolSpec(
    name="search_knowledge_base",
    description="Search.",
    parameters={"type": "object", "properties": {"query": {"type": "string"}}},
)
TOOL_QUESTION = (
    'Where is my refund? [[tool=search_knowledge_base query="refund \\"annual\\" plan"]] '
    '[[tool=escalate_to_human reason="Asked twice"]] [[reply="Here it is."]]'
)


def test_tool_blocks_are_tool_calls_with_their_arguments() -> None:
    script = parse_script(TOOL_QUESTION)

    assert script.tool_calls == (
        ("search_knowledge_base", {"query": 'refund "annual" plan'}),
        ("escalate_to_human", {"reason": "Asked twice"}),
    )
    assert script.reply == "Here it is."
    assert script.question == "Where is my refund?"


async def test_offered_tools_it_calls_them_before_answering() -> None:
    model = FakeChatModel()
    messages = [ChatMessage(role="user", content=TOOL_QUESTION)]

    events = [event async for event in model.stream(messages, tools=[SEARCH])]

    calls = [
        ToolCall("call_1", "search_knowledge_base", json.dumps({"query": 'refund "annual" plan'})),
        ToolCall("call_2", "escalate_to_human", json.dumps({"reason": "Asked twice"})),
    ]
    assert events == [
        *calls,
        Usage(
            prompt_tokens=estimate_prompt_tokens(messages),
            completion_tokens=sum(estimate_tokens(c.name + c.arguments) for c in calls),
        ),
    ]
    assert model.offered_tools[-1] == ("search_knowledge_base",)
    assert model.completed_streams == 1


async def test_with_the_tool_results_in_it_answers_with_text() -> None:
    model = FakeChatModel()
    call = ToolCall("call_1", "search_knowledge_base", '{"query": "refund"}')
    messages = [
        ChatMessage(role="user", content=TOOL_QUESTION),
        ChatMessage(role="assistant", content="", tool_calls=(call,)),
        ChatMessage(role="tool", content="No passage.", tool_call_id="call_1"),
    ]

    events = [event async for event in model.stream(messages, tools=[SEARCH])]

    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Here it is."
    assert not any(isinstance(event, ToolCall) for event in events)


async def test_offered_no_tools_it_ignores_the_tool_blocks() -> None:
    texts, _ = await run(FakeChatModel(), TOOL_QUESTION)

    assert "".join(texts) == "Here it is."
