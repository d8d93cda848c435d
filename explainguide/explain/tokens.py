"""Token ids, word <-> token spans and desired-word weights for CLIP prompts.

Everything here works on open_clip's CLIP BPE tokenizer (``SimpleTokenizer``: ``encode``, ``encoder``,
``decoder``, ``byte_decoder``, ``sot_token_id``, ``eot_token_id``). A row of token ids is laid out as
``[SOT, t_1 .. t_n, EOT, 0 ...]``; EOT has the largest id, so its position is ``argmax(ids)``.

Policies (one each):

- **Too-long prompts** are truncated to ``SOT + the first context_length - 2 content tokens + EOT``, so EOT
  is always the last kept token, and a :class:`PromptTruncatedWarning` names the prompt, its token count
  (content + SOT + EOT) and the context length. A prompt that fits exactly does not warn.
- **Empty prompts** (nothing left after the tokenizer's cleaning) raise ``ValueError``.
- **A word** is what the tokenizer treats as one: a maximal run of BPE tokens whose last token ends with
  ``</w>``. So punctuation runs ("," or "!!") are words of their own, "dog's" is "dog" + "'s", "t-shirt" is
  "t" + "-" + "shirt", and every digit is its own word. Never ``str.split()``.
- **A word's text** is decoded from its tokens through the byte decoder, so it is the tokenizer's
  normalised form: ftfy-fixed, HTML-unescaped and *lower-cased* ("Yorkshire" -> "yorkshire", "café" and
  "猫" round-trip exactly). Words the truncation cut, fully or in part, are dropped.
- **Desired words** are one representation: a :class:`WordSelection` holds one weight >= 0 per word span.
  Losses read it as token spans (:func:`token_spans`, max over each chosen word's tokens) or as a
  per-token weight vector (:func:`token_weights`, :func:`scaled_token_weights`).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

_END_OF_WORD = "</w>"
_PROMPT_PREVIEW_CHARS = 40


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than the context length and was truncated (see module docstring)."""


@dataclass(frozen=True)
class WordSpan:
    """One word of a tokenized prompt.

    word: the word decoded from its tokens (lower-cased by the tokenizer's cleaning).
    start, end: token positions ``[start, end)`` in the id row; SOT is position 0, so the first word
        starts at 1.
    """

    word: str
    start: int
    end: int

    @property
    def positions(self) -> list[int]:
        """Token positions of this word, ascending."""
        return list(range(self.start, self.end))


@dataclass(frozen=True)
class WordSelection:
    """Desired-word weights of one prompt.

    spans: every kept word of the prompt, in order (as :func:`word_spans` gives them).
    weights: one float per span; 0 means "not desired".
    mode: the selector that made it: "flags", "words", "semantic:pos" or "semantic:stopwords".
    context_length: length of the id row the spans index into.
    """

    spans: tuple[WordSpan, ...]
    weights: tuple[float, ...]
    mode: str
    context_length: int

    @property
    def chosen(self) -> tuple[WordSpan, ...]:
        """The spans with a nonzero weight, in prompt order."""
        return tuple(span for span, weight in zip(self.spans, self.weights) if weight != 0)


# ---------------------------------------------------------------------------------------------------------
# Token ids


def _preview(text: str) -> str:
    """The prompt shortened for messages."""
    if len(text) <= _PROMPT_PREVIEW_CHARS:
        return text
    return text[: _PROMPT_PREVIEW_CHARS - 3] + "..."


def _check_context_length(context_length: int) -> None:
    if context_length < 3:
        raise ValueError(
            f"context length {context_length} is too short; it must hold SOT, one token and EOT (>= 3)"
        )


def _content_ids(tokenizer: Any, text: str) -> list[int]:
    """BPE ids of ``text`` without SOT/EOT, untruncated; ValueError when there are none."""
    ids = tokenizer.encode(text)
    if not ids:
        raise ValueError(f"empty prompt {text!r}: it has no tokens after cleaning; give non-empty text")
    return ids


def tokenize(tokenizer: Any, texts: str | Sequence[str], context_length: int) -> torch.Tensor:
    """Token ids of the prompts, truncated by the module's one policy.

    texts: N prompts (a single string counts as one prompt).
    Returns LongTensor (N, context_length): ``[SOT, content, EOT, 0-padding]`` per row. A prompt with more than
    ``context_length`` tokens (content + SOT + EOT) keeps SOT, its first ``context_length - 2`` content tokens
    and EOT, and raises a :class:`PromptTruncatedWarning`. Empty prompts raise ValueError.
    """
    _check_context_length(context_length)
    texts = [texts] if isinstance(texts, str) else list(texts)
    rows = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        content = _content_ids(tokenizer, text)
        n_tokens = len(content) + 2
        if n_tokens > context_length:
            warnings.warn(
                f"prompt {_preview(text)!r} has {n_tokens} tokens (with SOT and EOT) but the context length is "
                f"{context_length}; kept SOT, the first {context_length - 2} tokens and EOT",
                PromptTruncatedWarning,
                stacklevel=2,
            )
            content = content[: context_length - 2]
        kept = [tokenizer.sot_token_id, *content, tokenizer.eot_token_id]
        rows[row, : len(kept)] = torch.tensor(kept, dtype=torch.long)
    return rows


def eot_index(ids: torch.Tensor) -> torch.Tensor:
    """Position of EOT: ids LongTensor (..., L) -> LongTensor (...). EOT has the largest id, hence argmax."""
    return ids.argmax(dim=-1)


def n_kept_tokens(ids_row: torch.Tensor) -> int:
    """Number of kept tokens (SOT + content + EOT) in one id row LongTensor (L,).

    Relevance covers exactly positions ``[0, n)``.
    """
    return int(eot_index(ids_row)) + 1


# ---------------------------------------------------------------------------------------------------------
# Word spans


def _decode_word(tokenizer: Any, ids: Sequence[int]) -> str:
    """Text of one whole word from its BPE ids, through the byte decoder (so multi-byte UTF-8 is exact)."""
    symbols = "".join(tokenizer.decoder[i] for i in ids).removesuffix(_END_OF_WORD)
    return bytes(tokenizer.byte_decoder[c] for c in symbols).decode("utf-8")


def _group_words(tokenizer: Any, content: Sequence[int], offset: int) -> list[WordSpan]:
    """Split content ids into words; a word closes at a token ending in ``</w>``. Positions start at ``offset``.

    A trailing run without ``</w>`` is a word the truncation cut, and is dropped.
    """
    spans = []
    start = 0
    for i, token_id in enumerate(content):
        if tokenizer.decoder[token_id].endswith(_END_OF_WORD):
            word = _decode_word(tokenizer, content[start : i + 1])
            spans.append(WordSpan(word, offset + start, offset + i + 1))
            start = i + 1
    return spans


def word_spans(tokenizer: Any, text: str, context_length: int) -> list[WordSpan]:
    """Words of ``text`` and their token positions in the row :func:`tokenize` makes for it.

    Returns one :class:`WordSpan` per kept word, in order; the first starts at 1 (after SOT). Words that the
    truncation cut are dropped (:func:`tokenize` is the one that warns). Empty prompts raise ValueError.
    """
    _check_context_length(context_length)
    content = _content_ids(tokenizer, text)[: context_length - 2]
    return _group_words(tokenizer, content, offset=1)


def _query_words(tokenizer: Any, query: str) -> list[str]:
    """A user's word or phrase, split and normalised exactly as prompt words are."""
    words = [span.word for span in _group_words(tokenizer, tokenizer.encode(query), offset=0)]
    if not words:
        raise ValueError(f"empty word {query!r}; give a word of the prompt")
    return words


# ---------------------------------------------------------------------------------------------------------
# Word selectors: (tokenizer, spans, value) -> (one weight per span, mode used)

Selector = Callable[[Any, tuple[WordSpan, ...], Any], tuple[tuple[float, ...], str]]


def parse_flags(value: Any) -> tuple[float, ...]:
    """Word flags "0 0 0 1 1" (whitespace or commas) or a sequence of numbers -> one finite weight >= 0 each.

    Needs no tokenizer, so callers can check flags before a model is loaded. Negative weights are rejected: the
    editing loss min-max scales the weights, which would make the most negative word the most desired one.
    """
    items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    try:
        weights = tuple(float(item) for item in items)
    except (TypeError, ValueError) as err:
        raise ValueError(f"word flags {value!r} are not all numbers; give one number per word") from err
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"word flags {value!r} must be finite numbers")
    negative = [w for w in weights if w < 0]
    if negative:
        raise ValueError(f"word flags {value!r} include negative weights {negative}; give 0 for words to leave out "
                         "and a positive weight for desired words")
    return weights


def _select_by_flags(tokenizer: Any, spans: tuple[WordSpan, ...], value: Any) -> tuple[tuple[float, ...], str]:
    """value: "0 0 0 1 1" (whitespace or commas) or a sequence of numbers (see :func:`parse_flags`), one per word
    of ``spans``."""
    weights = parse_flags(value)
    words = [span.word for span in spans]
    if len(weights) != len(words):
        raise ValueError(
            f"{len(weights)} word flags for {len(words)} words {words}; give one flag per word "
            "(words are split by the tokenizer, punctuation counts as a word)"
        )
    return weights, "flags"


def _select_by_words(tokenizer: Any, spans: tuple[WordSpan, ...], value: Any) -> tuple[tuple[float, ...], str]:
    """value: a list of words or phrases of the prompt (case-insensitive), or one string of such words.

    A string is split into words by the tokenizer and each word is looked up alone; a list entry is looked up
    as a whole (a multi-word entry must appear consecutively). Every occurrence of a match is chosen.
    """
    if isinstance(value, str):
        queries = [[word] for word in _query_words(tokenizer, value)]
    else:
        queries = [_query_words(tokenizer, str(query)) for query in value]
    if not queries:
        raise ValueError("no desired words given; give at least one word of the prompt")
    words = [span.word for span in spans]
    chosen: set[int] = set()
    for query in queries:
        hits = [i for i in range(len(words) - len(query) + 1) if words[i : i + len(query)] == query]
        if not hits:
            raise ValueError(f"word {' '.join(query)!r} is not in the prompt; its words are {words}")
        chosen.update(i + k for i in hits for k in range(len(query)))
    return tuple(1.0 if i in chosen else 0.0 for i in range(len(words))), "words"


# Words that carry no visual content of their own. Kept out of "semantic" words by the offline default.
STOP_WORDS = frozenset(
    # articles and determiners / quantifiers
    "a an the this that these those some any each every all both no another other such".split()
    # prepositions
    + "of in on at with without by for from to into onto over under above below behind near next beside "
    "besides between through across along around about against among inside outside upon within off up down "
    "out via".split()
    # pronouns and contraction pieces as the tokenizer splits them
    + "i me my mine you your yours he him his she her hers it its we us our ours they them their theirs "
    "who whom whose which what someone something there here 's 't 're 've 'm 'll 'd".split()
    # auxiliaries and modals
    + "is are was were be been being am has have had having do does did can could will would shall should "
    "may might must".split()
    # conjunctions, negation, degree adverbs
    + "and or but nor so yet as if than then while because not very too also just".split()
    # prompt-template words ("a photo of a ...")
    + "photo photograph picture pic image snapshot rendering render illustration depiction itap".split()
)


def _is_punctuation(word: str) -> bool:
    """True when the word has no letter or digit (",", "!!", "-")."""
    return not any(ch.isalnum() for ch in word)


def _content_words(words: Sequence[str]) -> list[bool]:
    """Offline default: not punctuation and not a stop/template word."""
    return [not _is_punctuation(w) and w not in STOP_WORDS for w in words]


@functools.lru_cache(maxsize=1)
def _nltk_tagger() -> Callable[[list[str]], list[str]] | None:
    """nltk's averaged perceptron tagger when nltk and its data are installed locally, else None.

    The probe only loads from disk: nltk raises LookupError for missing data and never downloads on its own.
    """
    if importlib.util.find_spec("nltk") is None:
        return None
    import nltk

    try:
        nltk.pos_tag(["probe"])
    except (LookupError, OSError, ValueError):
        return None
    return lambda words: [tag for _, tag in nltk.pos_tag(words)]


def _nouns_by_pos(words: Sequence[str]) -> list[bool]:
    """POS mode, as the authors' generation notebook: keep nouns (NN, NNS, NNP, NNPS)."""
    tagger = _nltk_tagger()
    if tagger is None:
        raise ValueError(
            "semantic mode 'pos' needs nltk with its averaged_perceptron_tagger data installed locally; "
            "use 'stopwords' or install them"
        )
    return [tag.startswith("NN") and not _is_punctuation(w) for w, tag in zip(words, tagger(list(words)))]


SEMANTIC_BACKENDS: dict[str, Callable[[Sequence[str]], list[bool]]] = {
    "pos": _nouns_by_pos,
    "stopwords": _content_words,
}


def semantic_backend() -> str:
    """The backend "semantic" uses by default: "pos" when an nltk tagger is available locally, else "stopwords"."""
    return "pos" if _nltk_tagger() is not None else "stopwords"


def _select_semantic(tokenizer: Any, spans: tuple[WordSpan, ...], value: Any) -> tuple[tuple[float, ...], str]:
    """value: None or "auto" (see :func:`semantic_backend`), or a key of SEMANTIC_BACKENDS to force one."""
    backend = semantic_backend() if value in (None, "auto") else value
    if backend not in SEMANTIC_BACKENDS:
        raise ValueError(
            f"unknown semantic backend {value!r}; choose 'auto' or one of {sorted(SEMANTIC_BACKENDS)}"
        )
    words = [span.word for span in spans]
    keep = SEMANTIC_BACKENDS[backend](words)
    if not any(keep):
        raise ValueError(
            f"no semantic words ({backend}) among the prompt's words {words}; "
            "choose them with mode 'words' or 'flags'"
        )
    return tuple(1.0 if k else 0.0 for k in keep), f"semantic:{backend}"


WORD_SELECTORS: dict[str, Selector] = {
    "flags": _select_by_flags,
    "words": _select_by_words,
    "semantic": _select_semantic,
}


def select_words(tokenizer: Any, text: str, context_length: int, mode: str, value: Any = None) -> WordSelection:
    """Desired words of ``text``: the front door to WORD_SELECTORS.

    mode "flags": value = "0 0 0 1 1" or [0, 0, 0, 1, 1], one number >= 0 per word of :func:`word_spans`.
    mode "words": value = ["purple", "hair"] (case-insensitive) or "purple hair".
    mode "semantic": value = None/"auto", "pos" or "stopwords"; the result's ``mode`` says which ran.
    """
    if mode not in WORD_SELECTORS:
        raise ValueError(f"unknown word selection mode {mode!r}; choose one of {sorted(WORD_SELECTORS)}")
    spans = tuple(word_spans(tokenizer, text, context_length))
    weights, used = WORD_SELECTORS[mode](tokenizer, spans, value)
    return WordSelection(spans, weights, used, context_length)


# ---------------------------------------------------------------------------------------------------------
# What losses read


def token_spans(selection: WordSelection) -> list[list[int]]:
    """Token positions of each chosen word, in prompt order; a word's score is the max over its positions."""
    return [span.positions for span in selection.chosen]


def token_weights(selection: WordSelection) -> torch.Tensor:
    """Word weights spread to their tokens.

    Returns FloatTensor (context_length,): each word's weight on its tokens; 0 at SOT, EOT, padding and cut words.
    """
    weights = torch.zeros(selection.context_length)
    for span, weight in zip(selection.spans, selection.weights):
        weights[span.start : span.end] = weight
    return weights


def scaled_token_weights(selection: WordSelection) -> torch.Tensor:
    """:func:`token_weights` min-max scaled over the word tokens, as the editing loss uses them.

    Returns FloatTensor (context_length,): word tokens scaled to [0, 1], all other positions 0. When all word
    weights are equal there is no range to scale by (the authors' code divides by zero): nonzero words get 1,
    zero words stay 0, so all-equal nonzero weights give all ones over the words.
    """
    weights = token_weights(selection)
    words = torch.zeros(selection.context_length, dtype=torch.bool)
    for span in selection.spans:
        words[span.start : span.end] = True
    if not words.any():  # every word was cut by truncation: nothing to scale
        return weights
    values = weights[words]
    low, high = values.min(), values.max()
    scaled = (values - low) / (high - low) if high > low else (values != 0).to(values.dtype)
    weights[words] = scaled
    return weights


def class_prompt_tokens(
    tokenizer: Any, template: str, classnames: Sequence[str], context_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (C, L) of `template` filled with each class name, and a mask (C, L) of the name's tokens.

    The CLIP tokenizer splits words before BPE, so a name's tokens appear as one run inside the prompt.
    """
    if template.count("{}") != 1:
        raise ValueError(f"template {template!r} needs exactly one {{}} where the class name goes, "
                         "e.g. 'a photo of a {}.'")
    ids = tokenize(tokenizer, [template.format(name) for name in classnames], context_length)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for row, name in enumerate(classnames):
        name_ids, prompt = tokenizer.encode(name), ids[row].tolist()
        for start in range(1, len(prompt) - len(name_ids) + 1):
            if prompt[start : start + len(name_ids)] == name_ids:
                mask[row, start : start + len(name_ids)] = True
                break
        else:
            raise ValueError(f"class name {name!r} was cut from template {template!r}; shorten the template")
    return ids, mask
