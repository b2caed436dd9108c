"""Uploads to text: types, encodings, Markdown, HTML, plain text and PDF structure."""

from __future__ import annotations

import codecs

import pytest

from helpline.knowledge import parsing
from helpline.knowledge.exceptions import DocumentUnreadable, InvalidDocument, UnsupportedFileType
from helpline.knowledge.models import DocumentKind
from helpline.knowledge.parsing import Block
from tests.knowledge.helpers import make_pdf


@pytest.mark.parametrize(
    ("filename", "media_type", "kind"),
    [
        ("a.md", None, DocumentKind.MARKDOWN),
        ("A.MARKDOWN", None, DocumentKind.MARKDOWN),
        ("notes.txt", "application/octet-stream", DocumentKind.TEXT),
        ("page.htm", None, DocumentKind.HTML),
        ("manual.pdf", None, DocumentKind.PDF),
        (None, "text/html; charset=utf-8", DocumentKind.HTML),
        ("noext", "application/pdf", DocumentKind.PDF),
    ],
)
def test_kind_comes_from_the_extension_then_the_media_type(
    filename: str | None, media_type: str | None, kind: DocumentKind
) -> None:
    assert parsing.detect_kind(filename, media_type) == kind


def test_unsupported_types_are_refused() -> None:
    with pytest.raises(UnsupportedFileType, match=r"\.docx"):
        parsing.detect_kind("letter.docx", "text/plain")
    with pytest.raises(UnsupportedFileType):
        parsing.detect_kind(None, "image/png")


def test_markdown_front_matter_markup_and_structure() -> None:
    text = """---
title: 'Sharing: links & folders'
id: sharing
---

Intro with **bold**, _emphasis_, `code`, [a link](https://x.example) and ![logo](l.png).

Setext heading
--------------

- first item
- second item
  continued here

| Plan | Limit |
|------|-------|
| Free | 5 GB |

```
pip install northwind
```

<!-- hidden -->
> A quoted tip.
"""

    parsed = parsing.parse_markdown(text)

    assert parsed.title == "Sharing: links & folders"
    assert parsed.blocks == [
        Block("paragraph", "Intro with bold, emphasis, code, a link and logo."),
        Block("heading", "Setext heading", level=2),
        Block("list", "- first item\n- second item continued here"),
        Block("table", "Plan | Limit\nFree | 5 GB"),
        Block("code", "pip install northwind"),
        Block("paragraph", "A quoted tip."),
    ]


def test_markdown_without_front_matter_takes_its_first_h1_as_title() -> None:
    parsed = parsing.parse_markdown("Preamble.\n\n# The title #\n\n## Part\n\nText.")

    assert parsed.title == "The title"
    assert [block.kind for block in parsed.blocks] == [
        "paragraph",
        "heading",
        "heading",
        "paragraph",
    ]


def test_html_keeps_headings_lists_and_tables_and_drops_the_chrome() -> None:
    html = """<!doctype html><html><head><title>Plans</title><style>.x{}</style></head>
    <body><nav><a href="/">Home</a></nav><header><h1>Plans &amp; prices</h1></header>
    <p>Pick a plan.<br>Change it any time.</p>
    <ol><li>Free</li><li>Plus <b>and</b> more</li></ol>
    <table><tr><th>Plan</th><th>Price</th></tr><tr><td>Plus</td><td>$9.99</td></tr></table>
    <pre>code  stays</pre><script>alert("x")</script><footer>© Northwind</footer></body></html>"""

    parsed = parsing.parse_html(html)

    assert parsed.title == "Plans"
    assert parsed.blocks == [
        Block("heading", "Plans & prices", level=1),
        Block("paragraph", "Pick a plan. Change it any time."),
        Block("list", "1. Free\n2. Plus and more"),
        Block("table", "Plan | Price\nPlus | $9.99"),
        Block("code", "code  stays"),
    ]


def test_plain_text_paragraphs_are_rejoined() -> None:
    parsed = parsing.parse_text("First line\nof a paragraph.\n\n\n- a\n- b\n")

    assert parsed.blocks == [
        Block("paragraph", "First line of a paragraph."),
        Block("list", "- a\n- b"),
    ]


def test_pdf_text_is_extracted_page_by_page() -> None:
    data = make_pdf([["Exports", "are ready in 48 hours."], ["Second page."]], title="Export")

    parsed = parsing.parse_pdf(data)

    assert parsed.title == "Export"
    joined = " ".join(block.text for block in parsed.blocks)
    assert "48 hours" in joined
    assert "Second page." in joined


def test_a_pdf_without_text_is_unreadable() -> None:
    with pytest.raises(DocumentUnreadable, match="no extractable text"):
        parsing.parse_pdf(make_pdf([[]]))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not a pdf", "not a PDF"),
        (b"%PDF-1.7\n%%EOF", "malformed"),
        (make_pdf([["x"]])[:60], "malformed"),
    ],
)
def test_broken_pdfs_are_refused_at_upload(data: bytes, message: str) -> None:
    with pytest.raises(InvalidDocument, match=message):
        parsing.inspect_upload(data, kind=DocumentKind.PDF)


def test_encodings() -> None:
    utf8 = "Grüße".encode()
    assert parsing.decode_text(utf8, kind=DocumentKind.TEXT) == "Grüße"
    assert parsing.decode_text(codecs.BOM_UTF8 + utf8, kind=DocumentKind.TEXT) == "Grüße"
    utf16 = codecs.BOM_UTF16_BE + "Grüße".encode("utf-16-be")
    assert parsing.decode_text(utf16, kind=DocumentKind.TEXT) == "Grüße"
    latin = "Grüße".encode("latin-1")
    assert parsing.decode_text(latin, kind=DocumentKind.TEXT, declared_charset="latin-1") == "Grüße"
    meta = b'<meta charset="iso-8859-1"><p>' + latin + b"</p>"
    assert "Grüße" in parsing.decode_text(meta, kind=DocumentKind.HTML)
    with pytest.raises(InvalidDocument, match="not valid UTF-8"):
        parsing.decode_text(latin, kind=DocumentKind.TEXT)
    with pytest.raises(InvalidDocument, match="Unknown character encoding"):
        parsing.decode_text(latin, kind=DocumentKind.TEXT, declared_charset="klingon-8")
    with pytest.raises(InvalidDocument, match="binary"):
        parsing.decode_text(b"abc\x00def", kind=DocumentKind.TEXT)
    with pytest.raises(InvalidDocument, match="binary"):
        parsing.decode_text(b"\x01\x02\x03\x04 text" * 3, kind=DocumentKind.TEXT)
