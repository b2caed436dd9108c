"""Chunks respect headings and paragraphs, carry their heading path and overlap when split."""

from __future__ import annotations

from helpline.knowledge.chunking import MAX_CHARS, chunk_document, split_sentences
from helpline.knowledge.parsing import parse_markdown


def test_each_section_is_a_chunk_with_its_heading_path() -> None:
    document = parse_markdown(
        "# Billing\n\nIntro.\n\n## Refunds\n\nRefund text.\n\n### Annual\n\nAnnual text.\n\n"
        "## Invoices\n\nInvoice text."
    )

    chunks = chunk_document(document, title="Billing")

    assert [(chunk.heading_path, chunk.content) for chunk in chunks] == [
        ("Billing", "Intro."),
        ("Billing > Refunds", "Refund text."),
        ("Billing > Refunds > Annual", "Annual text."),
        ("Billing > Invoices", "Invoice text."),
    ]
    assert [chunk.position for chunk in chunks] == [0, 1, 2, 3]
    assert chunks[2].text_for_embedding == "Billing > Refunds > Annual\nAnnual text."


def test_a_title_that_differs_from_the_h1_leads_the_path() -> None:
    chunks = chunk_document(parse_markdown("# Refunds\n\nText."), title="Billing help")

    assert chunks[0].heading_path == "Billing help > Refunds"


def test_long_sections_split_at_paragraphs_with_overlap() -> None:
    paragraphs = [
        f"Paragraph {index} sentence one is here. Paragraph {index} sentence two ends it."
        for index in range(30)
    ]
    document = parse_markdown("## Long\n\n" + "\n\n".join(paragraphs))

    chunks = chunk_document(document, title="Doc", max_chars=400, overlap_chars=120)

    assert len(chunks) > 3
    assert all(len(chunk.content) <= 400 for chunk in chunks)
    for previous, current in zip(chunks, chunks[1:], strict=False):
        # The next chunk starts with the last sentences of the one before.
        carried = current.content.split("\n\n")[0]
        assert split_sentences(previous.content)[-1] in carried
        assert previous.content.replace("\n\n", " ").endswith(carried)
    text = " ".join(chunk.content for chunk in chunks)
    assert all(paragraph in text for paragraph in paragraphs)


def test_a_huge_paragraph_is_split_by_sentences_then_words() -> None:
    sentence = "This sentence has exactly eight words in it. "
    giant = "x" * (MAX_CHARS * 2)
    document = parse_markdown(sentence * 60 + "\n\n" + giant)

    chunks = chunk_document(document, title="Doc")

    assert all(len(chunk.content) <= MAX_CHARS for chunk in chunks)
    assert sum(chunk.content.count("x") for chunk in chunks) >= MAX_CHARS * 2


def test_headings_without_text_make_no_chunk() -> None:
    assert chunk_document(parse_markdown("# A\n\n## B\n\n## C"), title="A") == []
