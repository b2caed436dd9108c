"""Uploads to text: file types, encodings, and the structure of Markdown, HTML, text and PDF.

Every format becomes the same thing, a `ParsedDocument`: an optional title and a list of
`Block`s (headings with their level, paragraphs, list items, table rows, code), with the markup
stripped and the structure kept, which is what the chunker needs.

Two stages, because bad input must be refused at upload when that can be known then:

- `inspect_upload()` runs in the request (in a thread): file type, size, binary content,
  encoding, a PDF that does not open, a document with no text at all → `InvalidDocument` /
  `UnsupportedFileType` (4xx);
- `parse_document()` runs in the ingestion job: the full parse. A PDF whose pages hold no
  text (a scan) is only found out here, and fails the document with its error.
"""

from __future__ import annotations

import codecs
import html
import io
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import PurePath
from typing import Literal

from helpline.knowledge.exceptions import DocumentUnreadable, InvalidDocument, UnsupportedFileType
from helpline.knowledge.models import DocumentKind

BlockKind = Literal["heading", "paragraph", "list", "table", "code"]

EXTENSIONS: dict[str, DocumentKind] = {
    ".md": DocumentKind.MARKDOWN,
    ".markdown": DocumentKind.MARKDOWN,
    ".txt": DocumentKind.TEXT,
    ".text": DocumentKind.TEXT,
    ".html": DocumentKind.HTML,
    ".htm": DocumentKind.HTML,
    ".pdf": DocumentKind.PDF,
}
MEDIA_TYPES: dict[str, DocumentKind] = {
    "text/markdown": DocumentKind.MARKDOWN,
    "text/x-markdown": DocumentKind.MARKDOWN,
    "text/plain": DocumentKind.TEXT,
    "text/html": DocumentKind.HTML,
    "application/xhtml+xml": DocumentKind.HTML,
    "application/pdf": DocumentKind.PDF,
}
SUPPORTED = ".md, .txt, .html or .pdf"
# Share of control characters above which decoded "text" is really binary data.
MAX_CONTROL_SHARE = 0.01


@dataclass(frozen=True, slots=True)
class Block:
    kind: BlockKind
    text: str
    level: int = 0  # headings: 1–6


@dataclass
class ParsedDocument:
    title: str | None
    blocks: list[Block] = field(default_factory=list)

    @property
    def has_body(self) -> bool:
        """Whether any text other than headings is left."""
        return any(block.text.strip() for block in self.blocks if block.kind != "heading")


@dataclass(frozen=True, slots=True)
class InspectedUpload:
    """An upload that passed the checks: its kind, its text (not for PDF) and a title hint."""

    kind: DocumentKind
    text: str | None
    data: bytes | None
    title: str | None


# --- file type and encoding ---------------------------------------------------------------------


def detect_kind(filename: str | None, media_type: str | None) -> DocumentKind:
    """The document kind from the file name's extension, else its media type."""
    if filename:
        suffix = PurePath(filename).suffix.lower()
        if suffix in EXTENSIONS:
            return EXTENSIONS[suffix]
        if suffix:
            raise UnsupportedFileType(
                f"Files of type {suffix!r} are not supported; upload a {SUPPORTED} file"
            )
    essence = (media_type or "").split(";", 1)[0].strip().lower()
    if essence in MEDIA_TYPES:
        return MEDIA_TYPES[essence]
    raise UnsupportedFileType(
        f"Cannot tell the type of {filename or 'the file'!r}; upload a {SUPPORTED} file"
    )


def charset_of(media_type: str | None) -> str | None:
    """The `charset` parameter of a media type, if any."""
    match = re.search(r"charset\s*=\s*\"?([\w.:-]+)", media_type or "", re.IGNORECASE)
    return match.group(1) if match else None


_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_HTML_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([\w.:-]+)""", re.IGNORECASE)


def decode_text(data: bytes, *, kind: DocumentKind, declared_charset: str | None = None) -> str:
    """Decode an upload: a byte-order mark, else UTF-8, else the charset the upload declares.

    Guessing a legacy encoding would silently garble text (and accept binary files), so text
    that is neither UTF-8 nor declared is refused with a message that says how to fix it.
    """
    encoding: str | None = None
    for bom, name in _BOMS:
        if data.startswith(bom):
            encoding = name
            break
    if encoding is None and b"\x00" in data[:8192]:
        raise InvalidDocument("The file looks binary (it contains NUL bytes), not text")
    candidates = [encoding] if encoding else ["utf-8"]
    if encoding is None:
        if declared_charset:
            candidates.append(declared_charset)
        if kind == DocumentKind.HTML:
            match = _HTML_CHARSET.search(data[:4096])
            if match:
                candidates.append(match.group(1).decode("ascii", "replace"))
    text: str | None = None
    first_error: UnicodeDecodeError | None = None
    for candidate in candidates:
        try:
            text = data.decode(candidate)
            break
        except LookupError as exc:
            raise InvalidDocument(f"Unknown character encoding {candidate!r}") from exc
        except UnicodeDecodeError as exc:
            first_error = first_error or exc
    if text is None:
        assert first_error is not None
        raise InvalidDocument(
            f"The file is not valid UTF-8 (byte 0x{data[first_error.start]:02x} at offset "
            f"{first_error.start}); save it as UTF-8, or declare its encoding (a charset "
            "parameter on the file's Content-Type, or <meta charset> in HTML)"
        )
    text = text.lstrip("\ufeff")
    controls = sum(1 for char in text if ord(char) < 32 and char not in "\t\n\r\f")
    if text and controls / len(text) > MAX_CONTROL_SHARE:
        raise InvalidDocument("The file looks binary (control characters), not text")
    return text


# --- Markdown -----------------------------------------------------------------------------------

_FRONT_MATTER = re.compile(
    r"\A(?:---|\+\+\+)[ \t]*\r?\n(.*?)\r?\n(?:---|\+\+\+|\.\.\.)[ \t]*(?:\r?\n|\Z)", re.DOTALL
)
_FRONT_TITLE = re.compile(r"""^title\s*[:=]\s*(?P<value>.+?)\s*$""", re.MULTILINE | re.IGNORECASE)
_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_LIST_ITEM = re.compile(r"^(\s*)([-*+]|\d{1,9}[.)])[ \t]+(.*)$")
_RULE = re.compile(r"^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$")
_TABLE_SEPARATOR = re.compile(r"^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$")
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)

_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
_REF_LINK = re.compile(r"\[([^\]]+)\]\[[^\]]*\]")
_LINK_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s+\S+.*$")
_AUTOLINK = re.compile(r"<((?:https?|mailto):[^>\s]+)>")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_STRONG = re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1")
_EMPHASIS = re.compile(r"(?<![\w*])([*_])(?=\S)(.+?)(?<=\S)\1(?![\w*])")
_STRIKE = re.compile(r"~~(.+?)~~")
_TAG = re.compile(r"</?[A-Za-z][^>]*>")


def strip_front_matter(text: str) -> tuple[str, str | None]:
    """Remove YAML (`---`) or TOML (`+++`) front matter; returns (body, its title if any)."""
    match = _FRONT_MATTER.match(text)
    if not match:
        return text, None
    title_match = _FRONT_TITLE.search(match.group(1))
    title = _unquote(title_match.group("value")) if title_match else None
    return text[match.end() :], title or None


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
        if value and '"' in value:
            value = value.replace('\\"', '"')
    return value.strip()


def strip_inline_markdown(text: str) -> str:
    """Inline Markdown to plain text: links keep their text, emphasis and code marks go."""
    text = _IMAGE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _REF_LINK.sub(r"\1", text)
    text = _AUTOLINK.sub(r"\1", text)
    text = _CODE_SPAN.sub(lambda match: match.group(2).strip(), text)
    text = _STRONG.sub(r"\2", text)
    text = _EMPHASIS.sub(r"\2", text)
    text = _STRIKE.sub(r"\1", text)
    text = _TAG.sub("", text)
    text = re.sub(r"\\([\\`*_{}\[\]()#+\-.!|>~])", r"\1", text)
    return html.unescape(text)


def parse_markdown(text: str) -> ParsedDocument:
    """Markdown (CommonMark's block structure, GitHub tables) to blocks."""
    body, title = strip_front_matter(text)
    body = _HTML_COMMENT.sub("", body)
    lines = body.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    blocks: list[Block] = []
    paragraph: list[str] = []
    items: list[str] = []
    table: list[str] = []

    def flush() -> None:
        if paragraph:
            joined = " ".join(line.strip() for line in paragraph)
            text_ = _collapse(strip_inline_markdown(joined))
            if text_:
                blocks.append(Block("paragraph", text_))
            paragraph.clear()
        if items:
            blocks.append(Block("list", "\n".join(items)))
            items.clear()
        if table:
            blocks.append(Block("table", "\n".join(table)))
            table.clear()

    index = 0
    while index < len(lines):
        line = lines[index]
        fence = _FENCE.match(line)
        if fence:
            flush()
            marker = fence.group(1)
            code: list[str] = []
            index += 1
            while index < len(lines) and not lines[index].strip().startswith(marker):
                code.append(lines[index])
                index += 1
            index += 1
            if any(part.strip() for part in code):
                blocks.append(Block("code", "\n".join(code).strip("\n")))
            continue
        stripped = line.strip()
        if not stripped:
            flush()
            index += 1
            continue
        atx = _ATX.match(line)
        if atx:
            flush()
            heading = _collapse(strip_inline_markdown(atx.group(2) or ""))
            if heading:
                blocks.append(Block("heading", heading, level=len(atx.group(1))))
            index += 1
            continue
        if paragraph and not items and not table and _SETEXT.match(line):
            heading = _collapse(strip_inline_markdown(" ".join(p.strip() for p in paragraph)))
            paragraph.clear()
            if heading:
                blocks.append(Block("heading", heading, level=1 if "=" in line else 2))
            index += 1
            continue
        if _RULE.match(line) or _LINK_DEFINITION.match(line):
            flush()
            index += 1
            continue
        if stripped.startswith("|") or (table and "|" in stripped):
            if paragraph or items:
                flush()
            if not _TABLE_SEPARATOR.match(stripped):
                cells = [
                    strip_inline_markdown(cell).strip() for cell in stripped.strip("|").split("|")
                ]
                row = " | ".join(cell for cell in cells if cell)
                if row:
                    table.append(row)
            index += 1
            continue
        item = _LIST_ITEM.match(line)
        if item:
            if paragraph or table:
                flush()
            marker = item.group(2)
            bullet = marker if marker[0].isdigit() else "-"
            indent = "  " * (len(item.group(1).expandtabs(4)) // 2)
            items.append(f"{indent}{bullet} {_collapse(strip_inline_markdown(item.group(3)))}")
            index += 1
            continue
        if items and line[:1] in (" ", "\t"):
            items[-1] += " " + _collapse(strip_inline_markdown(stripped))  # a wrapped item
            index += 1
            continue
        if stripped.startswith(">"):
            stripped = stripped.lstrip("> ").strip()
            if not stripped:
                index += 1
                continue
        if items or table:
            flush()
        paragraph.append(stripped)
        index += 1
    flush()
    if title is None:
        title = next((b.text for b in blocks if b.kind == "heading" and b.level == 1), None)
    return ParsedDocument(title=title, blocks=blocks)


def _collapse(text: str) -> str:
    return " ".join(text.split())


# --- plain text ---------------------------------------------------------------------------------


def parse_text(text: str) -> ParsedDocument:
    """Plain text: paragraphs are separated by blank lines; lines within one are joined."""
    blocks: list[Block] = []
    for part in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n").replace("\r", "\n")):
        lines = [line.strip() for line in part.split("\n") if line.strip()]
        if not lines:
            continue
        if all(_LIST_ITEM.match(line) for line in lines):
            blocks.append(Block("list", "\n".join(lines)))
        else:
            blocks.append(Block("paragraph", _collapse(" ".join(lines))))
    return ParsedDocument(title=None, blocks=blocks)


# --- HTML ---------------------------------------------------------------------------------------

_SKIPPED_TAGS = frozenset(
    {"script", "style", "noscript", "template", "svg", "nav", "footer", "iframe", "button", "form"}
)
_BLOCK_TAGS = frozenset(
    {
        "p", "div", "section", "article", "main", "header", "aside", "blockquote", "br", "hr",
        "ul", "ol", "dl", "dt", "dd", "figure", "figcaption", "details", "summary", "address",
    }
)  # fmt: skip
_VOID_TAGS = frozenset({"br", "hr", "img", "meta", "link", "input", "wbr", "source", "area"})


class _HTMLToBlocks(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[Block] = []
        self.title: str | None = None
        self._text: list[str] = []
        self._skip_depth = 0
        self._in_title = False
        self._title_parts: list[str] = []
        self._heading: int | None = None
        self._pre = 0
        self._list_stack: list[list[int]] = []  # per open list: [next number] (0 = bullets)
        self._item: list[str] | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._rows: list[str] = []
        self._items: list[str] = []  # items of the open (outermost) list

    # Current text target: a table cell, a list item, or the running paragraph.
    def _sink(self) -> list[str]:
        if self._cell is not None:
            return self._cell
        if self._item is not None:
            return self._item
        return self._text

    def _flush_paragraph(self) -> None:
        raw = "".join(self._text)
        self._text.clear()
        if self._pre:
            return
        text = _collapse(raw)
        if text:
            self.blocks.append(Block("paragraph", text))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        del attrs
        if tag in _SKIPPED_TAGS:
            if tag not in _VOID_TAGS:
                self._skip_depth += 1
            return
        if self._skip_depth:
            return
        if tag == "title":
            self._in_title = True
        elif tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
            self._flush_paragraph()
            self._heading = int(tag[1])
        elif tag == "pre":
            self._flush_paragraph()
            self._pre += 1
        elif tag in ("ul", "ol"):
            self._flush_paragraph()
            self._list_stack.append([1 if tag == "ol" else 0])
        elif tag == "li":
            self._close_item()
            self._flush_paragraph()
            self._item = []
        elif tag == "tr":
            self._flush_paragraph()
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "br":
            self._sink().append("\n" if self._pre else " ")
        elif tag in _BLOCK_TAGS and self._item is None and self._cell is None:
            self._flush_paragraph()

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIPPED_TAGS:
            if tag not in _VOID_TAGS:
                self._skip_depth = max(0, self._skip_depth - 1)
            return
        if self._skip_depth:
            return
        if tag == "title":
            self._in_title = False
            self.title = _collapse("".join(self._title_parts)) or None
        elif tag in ("h1", "h2", "h3", "h4", "h5", "h6") and self._heading is not None:
            text = _collapse("".join(self._text))
            self._text.clear()
            if text:
                self.blocks.append(Block("heading", text, level=self._heading))
            self._heading = None
        elif tag == "pre" and self._pre:
            self._pre -= 1
            code = "".join(self._text).strip("\n")
            self._text.clear()
            if code.strip():
                self.blocks.append(Block("code", code))
        elif tag == "li":
            self._close_item()
        elif tag in ("ul", "ol"):
            self._close_item()
            if self._list_stack:
                self._list_stack.pop()
            if not self._list_stack:
                self._flush_items()
        elif tag in ("td", "th") and self._cell is not None:
            if self._row is not None:
                self._row.append(_collapse("".join(self._cell)))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            row = " | ".join(cell for cell in self._row if cell)
            if row:
                self._rows.append(row)
            self._row = None
        elif tag == "table":
            if self._rows:
                self.blocks.append(Block("table", "\n".join(self._rows)))
            self._rows = []
        elif tag in _BLOCK_TAGS and self._item is None and self._cell is None:
            self._flush_paragraph()

    def _close_item(self) -> None:
        if self._item is None:
            return
        text = _collapse("".join(self._item))
        self._item = None
        if not text:
            return
        depth = max(0, len(self._list_stack) - 1)
        bullet = "-"
        if self._list_stack and self._list_stack[-1][0]:
            bullet = f"{self._list_stack[-1][0]}."
            self._list_stack[-1][0] += 1
        self._items.append(f"{'  ' * depth}{bullet} {text}")

    def _flush_items(self) -> None:
        if self._items:
            self.blocks.append(Block("list", "\n".join(self._items)))
        self._items = []

    def handle_data(self, data: str) -> None:
        if self._skip_depth:
            return
        if self._in_title:
            self._title_parts.append(data)
            return
        self._sink().append(data)

    def finish(self) -> ParsedDocument:
        self.close()
        self._close_item()
        self._flush_items()
        self._flush_paragraph()
        title = self.title or next(
            (b.text for b in self.blocks if b.kind == "heading" and b.level == 1), None
        )
        return ParsedDocument(title=title, blocks=self.blocks)


def parse_html(text: str) -> ParsedDocument:
    """HTML to blocks with the standard library's parser; scripts, styles, navigation skipped."""
    parser = _HTMLToBlocks()
    parser.feed(text)
    return parser.finish()


# --- PDF ----------------------------------------------------------------------------------------


def _open_pdf(data: bytes) -> object:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    if not data.lstrip()[:5].startswith(b"%PDF-"):
        raise InvalidDocument("The file is not a PDF (it does not start with %PDF-)")
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted and not reader.decrypt(""):
            raise InvalidDocument("The PDF is password-protected; upload an unprotected copy")
        if len(reader.pages) == 0:
            raise InvalidDocument("The PDF has no pages")
    except InvalidDocument:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
        raise InvalidDocument(f"The PDF is malformed and cannot be read ({exc})") from exc
    except Exception as exc:  # pypdf raises many types on damaged files
        raise InvalidDocument(
            f"The PDF is malformed and cannot be read ({type(exc).__name__})"
        ) from exc
    return reader


def _pdf_title(reader: object) -> str | None:
    try:
        metadata = getattr(reader, "metadata", None)
        if metadata is not None and metadata.title:
            return str(metadata.title).strip() or None
    except Exception:  # damaged metadata must not fail an otherwise readable file
        return None
    return None


def parse_pdf(data: bytes) -> ParsedDocument:
    """The text of every page; paragraphs from blank lines, lines re-joined, hyphens mended."""
    from pypdf import PdfReader

    try:
        reader = _open_pdf(data)
    except InvalidDocument as exc:
        raise DocumentUnreadable(exc.message) from exc
    assert isinstance(reader, PdfReader)
    title = _pdf_title(reader)
    blocks: list[Block] = []
    for number, page in enumerate(reader.pages, start=1):
        try:
            page_text = page.extract_text() or ""
        except Exception as exc:
            raise DocumentUnreadable(
                f"Page {number} of the PDF cannot be read ({type(exc).__name__})"
            ) from exc
        page_text = re.sub(r"(\w)-\n(\w)", r"\1\2", page_text)
        blocks.extend(parse_text(page_text).blocks)
    if not blocks:
        raise DocumentUnreadable(
            "The PDF contains no extractable text (is it a scan? run it through OCR first)"
        )
    return ParsedDocument(title=title, blocks=blocks)


# --- entry points -------------------------------------------------------------------------------


def parse_text_document(kind: DocumentKind, text: str) -> ParsedDocument:
    if kind == DocumentKind.MARKDOWN:
        return parse_markdown(text)
    if kind == DocumentKind.HTML:
        return parse_html(text)
    return parse_text(text)


def parse_document(kind: DocumentKind, *, text: str | None, data: bytes | None) -> ParsedDocument:
    """Parse a stored upload (blocking: call it in a thread)."""
    if kind == DocumentKind.PDF:
        if data is None:
            raise DocumentUnreadable("The PDF's content is missing")
        return parse_pdf(data)
    if text is None:
        raise DocumentUnreadable("The document's text is missing")
    return parse_text_document(kind, text)


def inspect_upload(
    data: bytes, *, kind: DocumentKind, declared_charset: str | None = None
) -> InspectedUpload:
    """Check an upload before accepting it (blocking: call it in a thread)."""
    if not data.strip():
        raise InvalidDocument("The file is empty")
    if kind == DocumentKind.PDF:
        return InspectedUpload(kind=kind, text=None, data=data, title=_pdf_title(_open_pdf(data)))
    text = decode_text(data, kind=kind, declared_charset=declared_charset)
    parsed = parse_text_document(kind, text)
    if not parsed.has_body:
        raise InvalidDocument("The document has no text once its markup is removed")
    return InspectedUpload(kind=kind, text=text, data=None, title=parsed.title)


def inspect_text(text: str, *, kind: DocumentKind = DocumentKind.MARKDOWN) -> InspectedUpload:
    """Check a document sent as JSON text (blocking for very large texts)."""
    if "\x00" in text:
        raise InvalidDocument("The content contains NUL characters")
    parsed = parse_text_document(kind, text)
    if not parsed.has_body:
        raise InvalidDocument("The document has no text once its markup is removed")
    return InspectedUpload(kind=kind, text=text, data=None, title=parsed.title)
