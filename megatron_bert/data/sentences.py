"""Dependency-free sentence splitter (a few regex rules; no NLTK/punkt model).

Good enough for building BERT sentence pairs: a wrong split only moves a segment boundary. Rules:
- blank lines always end a sentence (paragraphs);
- otherwise a sentence ends at `.`, `!`, `?` or `…` (plus closing quotes/brackets) followed by
  whitespace and a char that can start a sentence (not a lower-case letter);
- a period does not end a sentence after a known abbreviation (Mr., e.g., etc., Fig., ...) or a
  single-letter initial ("J. Smith"), or inside a number/dotted name (no whitespace follows).
"""
from __future__ import annotations

import regex

_PARAGRAPH = regex.compile(r"\n[ \t\r\f\v]*\n\s*")
_BOUNDARY = regex.compile(r"[.!?\u2026]+[\"'\u201d\u2019\u00bb)\]]*\s+(?=(\S))")
_LAST_WORD = regex.compile(r"(\S+)$")

ABBREVIATIONS = frozenset("""
mr mrs ms dr prof sr jr st mt vs etc e.g i.e cf al fig figs eq eqs no nos vol vols pp p ch sec
inc ltd co corp dept univ approx est jan feb mar apr jun jul aug sep sept oct nov dec
u.s u.k u.n a.m p.m ph.d b.a m.a gen col lt sgt capt rev hon gov ave blvd rd op ed eds resp viz
""".split())


def _is_abbreviation(before):
    m = _LAST_WORD.search(before)
    if not m:
        return False
    word = m.group(1).lstrip("(\"'[\u201c\u2018").rstrip(".").lower()
    if word in ABBREVIATIONS:
        return True
    # Single letter initials ("J. R. Smith") and dotted acronyms ("U.S.A.").
    return (len(word) == 1 and word.isalpha()) or (
        "." in word and all(len(p) == 1 and p.isalpha() for p in word.split(".")))


def split_sentences(text):
    """Split `text` into a list of non-empty, stripped sentence strings."""
    out = []
    for para in _PARAGRAPH.split(text):
        start = 0
        for m in _BOUNDARY.finditer(para):
            nxt = m.group(1)
            if nxt.islower():
                continue
            punct = para[m.start()]
            # Only the last word matters; a bounded look-back keeps long paragraphs linear.
            if punct == "." and _is_abbreviation(para[max(start, m.start() - 64):m.start()]):
                continue
            sent = para[start:m.end()].strip()
            if sent:
                out.append(sent)
            start = m.end()
        tail = para[start:].strip()
        if tail:
            out.append(tail)
    return out
