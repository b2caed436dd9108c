"""Blocks to chunks: passages that respect headings and paragraphs, with overlap.

- A chunk never spans two sections: each heading starts a new one, and every chunk keeps its
  *heading path* (`Refunds for annual plans > The 30-day window`), which starts with the
  document's title. The path is searched and embedded with the text, since it often carries
  the words a customer uses ("refund", "annual") when the paragraph does not repeat them.
- Within a section, whole blocks (paragraphs, lists, tables) are packed up to `max_chars`; a
  block that does not fit alone is split at sentence boundaries, and only a sentence longer
  than a whole chunk is cut between words.
- When a section needs several chunks, each one after the first starts with the last
  sentences of the one before (up to `overlap_chars`), so a fact that straddles the cut is
  found whole in one of them.

The default size (about 800 characters, some 180 tokens, plus the heading path) keeps a chunk
within the 256-token window of small embedding models such as all-MiniLM-L6-v2.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from helpline.knowledge.parsing import Block, ParsedDocument

MAX_CHARS = 800
OVERLAP_CHARS = 200
PATH_SEPARATOR = " > "

_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


@dataclass(frozen=True, slots=True)
class ChunkDraft:
    position: int
    heading_path: str
    content: str

    @property
    def text_for_embedding(self) -> str:
        return embedding_text(self.heading_path, self.content)


def embedding_text(heading_path: str, content: str) -> str:
    """What is embedded for a chunk: its heading path, then its text."""
    return f"{heading_path}\n{content}" if heading_path else content


def split_sentences(text: str) -> list[str]:
    """Sentences of a paragraph (a list keeps one item per line)."""
    pieces: list[str] = []
    for line in text.split("\n"):
        line = line.strip()
        if line:
            pieces.extend(part.strip() for part in _SENTENCE_END.split(line) if part.strip())
    return pieces


def _same_title(heading: str, title: str) -> bool:
    return " ".join(heading.lower().split()) == " ".join(title.lower().split())


@dataclass
class _Section:
    path: list[str]
    blocks: list[Block]


def _sections(document: ParsedDocument, title: str) -> list[_Section]:
    sections: list[_Section] = []
    stack: list[tuple[int, str]] = []
    current = _Section(path=[title], blocks=[])
    for block in document.blocks:
        if block.kind == "heading":
            if current.blocks:
                sections.append(current)
            while stack and stack[-1][0] >= block.level:
                stack.pop()
            stack.append((block.level, block.text))
            path = [title]
            for level, text in stack:
                # The article's own H1 usually repeats the title: keep the path short.
                if level == 1 and _same_title(text, title) and len(path) == 1:
                    continue
                path.append(text)
            current = _Section(path=path, blocks=[])
        elif block.text.strip():
            current.blocks.append(block)
    if current.blocks:
        sections.append(current)
    return sections


def _units(block: Block, max_chars: int) -> list[str]:
    """A block as pieces no longer than `max_chars`: itself, its sentences, or word runs."""
    if len(block.text) <= max_chars:
        return [block.text]
    if block.kind in ("list", "table", "code"):
        lines = [line for line in block.text.split("\n") if line.strip()]
    else:
        lines = split_sentences(block.text)
    units: list[str] = []
    for line in lines:
        if len(line) <= max_chars:
            units.append(line)
            continue
        words: list[str] = []
        for word in line.split():
            # A "word" longer than a chunk (a URL, a base64 blob) is cut where it must be.
            words.extend(
                word[start : start + max_chars] for start in range(0, len(word), max_chars)
            )
        piece: list[str] = []
        size = 0
        for word in words:
            if piece and size + 1 + len(word) > max_chars:
                units.append(" ".join(piece))
                piece, size = [], 0
            piece.append(word)
            size += len(word) + (1 if size else 0)
        if piece:
            units.append(" ".join(piece))
    return units


def _overlap(previous: list[str], overlap_chars: int) -> list[str]:
    """The last sentences of the previous chunk, up to `overlap_chars`."""
    sentences: list[str] = []
    for unit in previous:
        sentences.extend(split_sentences(unit) or [unit])
    carried: list[str] = []
    size = 0
    for sentence in reversed(sentences):
        if size + len(sentence) > overlap_chars:
            break
        carried.insert(0, sentence)
        size += len(sentence) + 1
    return [" ".join(carried)] if carried else []


def chunk_document(
    document: ParsedDocument,
    *,
    title: str,
    max_chars: int = MAX_CHARS,
    overlap_chars: int = OVERLAP_CHARS,
) -> list[ChunkDraft]:
    """Cut a parsed document into chunks (see the module docstring)."""
    drafts: list[ChunkDraft] = []
    for section in _sections(document, title):
        path = PATH_SEPARATOR.join(section.path)
        blocks: list[str] = []
        for block in section.blocks:
            blocks.extend(_units(block, max_chars))
        current: list[str] = []
        size = 0
        fresh = 0  # units in `current` that are not overlap from the previous chunk
        for unit in blocks:
            if current and fresh and size + 2 + len(unit) > max_chars:
                drafts.append(ChunkDraft(len(drafts), path, "\n\n".join(current)))
                current = _overlap(current, overlap_chars)
                if current and len(current[0]) + 2 + len(unit) > max_chars:
                    current = []
                size = sum(len(part) + 2 for part in current)
                fresh = 0
            current.append(unit)
            size += len(unit) + 2
            fresh += 1
        if current and fresh:
            drafts.append(ChunkDraft(len(drafts), path, "\n\n".join(current)))
    return drafts
