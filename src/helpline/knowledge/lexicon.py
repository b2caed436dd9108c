"""Words of queries and passages: tokens, stop words, a light stemmer and typo correction.

Customers write long, chatty, misspelt messages ("Hi, I was charged twice last month and I'd
like my money back please"); the full-text engines need the few terms that matter. This module
turns text into those terms, the same way for the query and for the passages it is compared
with in Python (lexical relevance, sentence picking), and corrects a misspelt word to the
nearest word the knowledge base actually contains.

The stemmer only folds the endings that matter for matching (plurals, -ing, -ed, -ly, ...); it
is not Porter's, and needs not be: the databases stem with their own, and this one is only ever
compared with itself.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence, Set
from dataclasses import dataclass, field

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*", re.UNICODE)

# English function words plus the chatter of support messages; none of them tells one
# article from another.
STOP_WORDS = frozenset(
    """
    a about above after again against all am an and any are aren't as at be because been before
    being below between both but by can can't cannot could couldn't did didn't do does doesn't
    doing don't down during each few for from further had hadn't has hasn't have haven't having he
    he'd he'll he's her here here's hers herself him himself his how how's i i'd i'll i'm i've if
    in into is isn't it it's its itself let's me more most mustn't my myself no nor not of off on
    once only or other ought our ours ourselves out over own same shan't she she'd she'll she's
    should shouldn't so some such than that that's the their theirs them themselves then there
    there's these they they'd they'll they're they've this those through to too under until up
    very was wasn't we we'd we'll we're we've were weren't what what's when when's where where's
    which while who who's whom why why's with won't would wouldn't you you'd you'll you're you've
    your yours yourself yourselves
    hi hello hey dear thanks thank thx please pls plz regards cheers ok okay yes yeah
    just also still really actually anyway maybe even already yet since though although
    want wanted wants need needs needed like would could get got getting make made
    know tell help question questions wondering wonder possible able way
    im ive id dont cant wont didnt doesnt isnt wasnt
    s t
    """.split()
)

MIN_CORRECTABLE_LENGTH = 4
# From this many passages on, words found in most of them are left out of full-text queries:
# they barely change the ranking but make the engine score most of the index.
COMMON_WORDS_FROM = 2000

# Everyday words for what help centres name otherwise. Added to full-text queries (never
# replacing the customer's own word) and counted as a match for it in the lexical coverage.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "yearly": ("annual",),
    "annually": ("annual",),
    "year": ("annual",),
    "reimburse": ("refund",),
    "reimbursement": ("refund",),
    "moneyback": ("refund",),
    "login": ("sign",),
    "logon": ("sign",),
    "log": ("sign",),
    "signin": ("sign",),
    "receipt": ("invoice",),
    "bill": ("invoice", "billing"),
    "cost": ("price",),
    "costs": ("price",),
    "unsubscribe": ("cancel",),
    "erase": ("delete",),
    "remove": ("delete",),
    "bin": ("trash",),
    "space": ("storage",),
    "quota": ("storage",),
    "employee": ("member",),
    "colleague": ("member",),
    "coworker": ("member",),
    "staff": ("member",),
    "company": ("team",),
    "organization": ("team",),
    "organisation": ("team",),
    "laptop": ("computer", "desktop"),
    "pc": ("computer", "desktop"),
    "cellphone": ("phone", "mobile"),
    "smartphone": ("phone", "mobile"),
    "down": ("outage",),
    "broken": ("error",),
    "human": ("person", "agent"),
}


def normalize(text: str) -> str:
    """Lower case, accents folded (so "café" matches "cafe"), curly apostrophes straightened."""
    folded = unicodedata.normalize("NFKD", text)
    folded = "".join(char for char in folded if not unicodedata.combining(char))
    return folded.replace("’", "'").lower()


def words(text: str) -> list[str]:
    """Every word of `text`, normalised, in order (stop words included)."""
    return _WORD.findall(normalize(text))


def stem(word: str) -> str:
    """Fold common English endings: `refunds`/`refunded`/`refunding` → `refund`."""
    if word.endswith("'s"):
        word = word[:-2]
    word = word.replace("'", "")
    if len(word) <= 3 or not word.isalpha():
        return word
    for suffix, replacement in _SUFFIXES:
        if word.endswith(suffix):
            if suffix == "s" and word.endswith(("ss", "us", "is")):
                break
            base = word[: -len(suffix)] + replacement
            if suffix == "es" and not word.endswith(("ches", "shes", "xes", "zes")):
                base = word[:-1]  # "invoices" → "invoice", "changes" → "change"
            if len(base) >= 3:
                word = base
            break
    # Symmetric clean-ups, so that every form meets at one stem: "cancelled"/"cancel",
    # "billing"/"bill", "changing"/"change".
    if len(word) > 3 and word[-1] == word[-2] and word[-1] not in "aeiou":
        word = word[:-1]
    if len(word) > 4 and word.endswith("e"):
        word = word[:-1]
    return word


_SUFFIXES = (
    ("ational", "ate"),
    ("ization", "ize"),
    ("isation", "ize"),
    ("fulness", "ful"),
    ("iveness", "ive"),
    ("ousness", "ous"),
    ("ingly", ""),
    ("edly", ""),
    ("sses", "ss"),
    ("ies", "y"),
    ("ing", ""),
    ("ied", "y"),
    ("ed", ""),
    ("ly", ""),
    ("es", ""),
    ("s", ""),
)


def terms(text: str) -> list[str]:
    """The meaningful words of `text` (stop words and one-letter words dropped), in order."""
    return [word for word in words(text) if len(word) > 1 and word not in STOP_WORDS]


def stems(text: str) -> set[str]:
    """The set of stemmed meaningful words of `text`."""
    return {stem(word) for word in terms(text)}


def _deletions(word: str) -> set[str]:
    return {word[:index] + word[index + 1 :] for index in range(len(word))}


@dataclass
class Vocabulary:
    """The words of the knowledge base: document frequencies, IDF and typo correction.

    Typo correction uses symmetric deletion (as SymSpell does): two words are one edit apart
    when they share a one-letter deletion, which covers a wrong, missing, extra or swapped
    letter. Among the candidates the most common word wins.
    """

    document_count: int = 0
    stem_frequency: Counter[str] = field(default_factory=Counter)
    word_frequency: Counter[str] = field(default_factory=Counter)
    _by_deletion: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def build(cls, passages: Iterable[str]) -> Vocabulary:
        vocabulary = cls()
        for passage in passages:
            vocabulary.document_count += 1
            passage_words = set(terms(passage))
            vocabulary.word_frequency.update(passage_words)
            vocabulary.stem_frequency.update({stem(word) for word in passage_words})
        # Stems are candidates too: "refnd" is one edit from "refund", the stem of "refunds".
        for word in set(vocabulary.word_frequency) | set(vocabulary.stem_frequency):
            if len(word) >= MIN_CORRECTABLE_LENGTH - 1 and word.isalpha():
                for variant in _deletions(word) | {word}:
                    vocabulary._by_deletion.setdefault(variant, []).append(word)
        return vocabulary

    def idf(self, stemmed: str) -> float:
        """Inverse document frequency; a word the knowledge base lacks gets the highest."""
        frequency = self.stem_frequency.get(stemmed, 0)
        return math.log(1 + (self.document_count + 1) / (frequency + 0.5))

    def knows(self, word: str) -> bool:
        return word in self.word_frequency or stem(word) in self.stem_frequency

    def correct(self, word: str) -> str | None:
        """The known word one edit away from `word` (the most frequent), or None."""
        if len(word) < MIN_CORRECTABLE_LENGTH or not word.isalpha() or self.knows(word):
            return None
        candidates: set[str] = set()
        for variant in _deletions(word) | {word}:
            candidates.update(self._by_deletion.get(variant, ()))
        candidates.discard(word)
        if not candidates:
            return None
        return max(
            candidates,
            key=lambda known: (
                max(self.word_frequency.get(known, 0), self.stem_frequency.get(known, 0)),
                known in self.word_frequency,
                known,
            ),
        )

    def informative(
        self, candidates: Sequence[str], *, limit: int, max_share: float = 0.25
    ) -> list[str]:
        """In a large base, the `limit` rarest of `candidates`, without the words found in more
        than `max_share` of the passages (unless no other word is left); else all of them."""
        if self.document_count < COMMON_WORDS_FROM:
            return list(candidates)
        ceiling = max_share * self.document_count
        rare = [word for word in candidates if self.stem_frequency.get(stem(word), 0) <= ceiling]
        chosen = rare or list(candidates)
        ranked = sorted(chosen, key=lambda word: self.stem_frequency.get(stem(word), 0))
        kept = set(ranked[:limit])
        return [word for word in chosen if word in kept]

    def query_terms(self, text: str, *, limit: int = 32) -> list[str]:
        """The words to search for: meaningful, deduplicated, misspellings corrected.

        A misspelt word is replaced by its correction; a word the knowledge base does not
        contain and cannot correct is kept (it still lowers the lexical relevance).
        """
        chosen: list[str] = []
        seen: set[str] = set()
        for word in terms(text):
            corrected = self.correct(word) or word
            key = stem(corrected)
            if key in seen:
                continue
            seen.add(key)
            chosen.append(corrected)
            if len(chosen) >= limit:
                break
        return chosen


def corrected_text(text: str, vocabulary: Vocabulary) -> str:
    """`text` with its misspelt words corrected (for embedding the query); unchanged if none."""
    found = words(text)
    fixed = [vocabulary.correct(word) if word not in STOP_WORDS else None for word in found]
    if not any(fixed):
        return text
    return " ".join(fix or word for word, fix in zip(found, fixed, strict=True))


def expand(query_terms: Sequence[str]) -> list[str]:
    """`query_terms` followed by their synonyms (for the full-text query)."""
    expanded = list(query_terms)
    for term in query_terms:
        for synonym in SYNONYMS.get(term, ()):
            if synonym not in expanded:
                expanded.append(synonym)
    return expanded


def _stem_group(term: str) -> set[str]:
    """A query word's stem with those of its synonyms (any of them counts as a match)."""
    return {stem(term), *(stem(synonym) for synonym in SYNONYMS.get(term, ()))}


def coverage(query_terms: Sequence[str], passage_stems: Set[str], vocabulary: Vocabulary) -> float:
    """The IDF-weighted share of the query's words found in a passage, in [0, 1].

    A word counts as found when it, or one of its synonyms, is in the passage.
    """
    weights = [vocabulary.idf(stem(term)) for term in query_terms]
    total = sum(weights)
    if total <= 0:
        return 0.0
    found = sum(
        weight
        for term, weight in zip(query_terms, weights, strict=True)
        if _stem_group(term) & passage_stems
    )
    return found / total
