"""Query terms: stop words, stems, typo correction and the FTS query builders."""

from __future__ import annotations

from helpline.knowledge.lexicon import Vocabulary, corrected_text, coverage, expand, stem, terms
from helpline.knowledge.repository import fts5_query, tsquery

VOCABULARY = Vocabulary.build(
    [
        "Refunds for annual plans within 30 days",
        "Reset your password from the sign-in page",
        "Two-factor authentication protects your account",
        "Annual billing renews every year",
    ]
)


def test_chatter_and_stop_words_are_dropped() -> None:
    assert terms("Hi! Could you please tell me how I'd get a refund? Thanks") == ["refund"]


def test_word_forms_meet_at_one_stem() -> None:
    for group in (
        ["refund", "refunds", "refunded", "refunding"],
        ["cancel", "cancelled", "canceled", "cancelling"],
        ["invoice", "invoices"],
        ["policy", "policies"],
    ):
        assert len({stem(word) for word in group}) == 1, group


def test_misspellings_are_corrected_to_known_words() -> None:
    assert VOCABULARY.query_terms("how do i get a refnd for my anual plan") == [
        "refund",
        "annual",
        "plan",
    ]
    assert VOCABULARY.correct("pasword") == "password"
    assert VOCABULARY.correct("authentcation") == "authentication"
    assert VOCABULARY.correct("password") is None  # known: left alone
    assert VOCABULARY.correct("zzzz") is None
    assert corrected_text("reset my pasword", VOCABULARY) == "reset my password"
    assert corrected_text("Reset my password", VOCABULARY) == "Reset my password"


def test_coverage_weighs_rare_words_more() -> None:
    query = ["annual", "password"]

    on_password = coverage(query, {stem("password")}, VOCABULARY)
    nothing = coverage(query, set(), VOCABULARY)

    assert 0.5 < on_password < 1.0  # "password" is rarer than "annual"
    assert nothing == 0.0
    assert coverage(query, {stem("annual"), stem("password")}, VOCABULARY) == 1.0


def test_fts_queries_or_their_terms_and_let_no_syntax_through() -> None:
    assert fts5_query(["refund", 'a"b', "near"]) == '"refund" OR "a b" OR "near"'
    assert tsquery(["refund", "o'clock", "a&b|c", "!!"]) == "'refund' | 'oclock' | 'abc'"
    assert fts5_query([]) == ""


def test_synonyms_widen_the_query_and_count_as_matches() -> None:
    assert expand(["yearly", "refund"]) == ["yearly", "refund", "annual"]
    assert coverage(["yearly"], {stem("annual")}, VOCABULARY) == 1.0
