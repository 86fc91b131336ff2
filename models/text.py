"""Turning the Austen novels into passages: paragraphs → sentences → fixed groups of consecutive sentences.

A passage is ``sentences_per_passage`` consecutive sentences of one novel's body text (title lines, chapter and
volume headings dropped; ``_italic_`` markers removed). Passages never overlap. The train/test split is by
position: each novel's passages are cut into consecutive blocks, and every ``test_every``-th block is test, so a
test passage is never a near-copy of a neighbouring train passage except at the few block edges.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from models.austen import NOVELS, novel_lines

# A sentence ends at . ! or ? (plus closing quotes/brackets) followed by space and an opening quote or capital;
# common abbreviations ("Mr.", "Mrs.", …) do not end a sentence.
_ABBREVIATIONS = frozenset({"Mr", "Mrs", "Dr", "St", "Messrs", "Esq", "Col", "Capt", "Gen", "Rev", "Sir"})
_SENTENCE_END = re.compile(r"[.!?][\"'\)\]]*(?=\s+[\"'\(\[]?[A-Z])")
_LAST_WORD = re.compile(r"(\w+)\.$")
_HEADING = re.compile(r"^(chapter|volume|vol\.)\b|^by jane austen$", re.IGNORECASE)


@dataclass(frozen=True)
class Passage:
    """One passage: its text, the novel it comes from, its index within that novel, and its split."""

    text: str
    novel: str
    index: int
    split: str  # "train" or "test"


def paragraphs(lines: list[str]) -> list[str]:
    """Join runs of non-blank lines into paragraphs (single spaces), dropping headings and all-capital lines."""
    result: list[str] = []
    current: list[str] = []
    for line in [*lines, ""]:
        if line.strip():
            current.append(line.strip())
            continue
        if current:
            paragraph = " ".join(" ".join(current).replace("_", "").split())
            if paragraph and not _HEADING.match(paragraph) and any(ch.islower() for ch in paragraph):
                result.append(paragraph)
            current = []
    return result


def split_sentences(paragraph: str) -> list[str]:
    """Split a paragraph into sentences at ``[.!?]`` + closing quotes + space + capital (abbreviations kept)."""
    sentences = []
    start = 0
    for match in _SENTENCE_END.finditer(paragraph):
        word = _LAST_WORD.search(paragraph, max(0, match.start() - 10), match.start() + 1)
        if word and word.group(1) in _ABBREVIATIONS:
            continue
        sentences.append(paragraph[start : match.end()].strip())
        start = match.end()
    sentences.append(paragraph[start:].strip())
    return [sentence for sentence in sentences if sentence]


def novel_sentences(name: str) -> list[str]:
    """All sentences of a novel's body text, in order."""
    return [sentence for paragraph in paragraphs(novel_lines(name)) for sentence in split_sentences(paragraph)]


def novel_passages(
    name: str, sentences_per_passage: int = 4, block_size: int = 20, test_every: int = 5
) -> list[Passage]:
    """Non-overlapping passages of consecutive sentences; passage ``i`` is test iff ``(i // block_size) % test_every
    == test_every - 1`` (every 5th block of 20 by default: a positional 80/20 split)."""
    return list(_cached_passages(name, sentences_per_passage, block_size, test_every))


@functools.lru_cache(maxsize=32)
def _cached_passages(name: str, sentences_per_passage: int, block_size: int, test_every: int) -> tuple[Passage, ...]:
    sentences = novel_sentences(name)
    passages = []
    for index, start in enumerate(range(0, len(sentences) - sentences_per_passage + 1, sentences_per_passage)):
        text = " ".join(sentences[start : start + sentences_per_passage])
        split = "test" if (index // block_size) % test_every == test_every - 1 else "train"
        passages.append(Passage(text, name, index, split))
    return tuple(passages)


def all_passages(**options: int) -> list[Passage]:
    """Passages of all six novels in publication order (``options`` as for :func:`novel_passages`)."""
    return [passage for name in NOVELS for passage in novel_passages(name, **options)]
