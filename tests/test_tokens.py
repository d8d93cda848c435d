"""Token ids, word spans and desired-word weights (explainguide.explain.tokens) on the CLIP BPE tokenizer."""

import warnings

import open_clip
import pytest
import torch

from explainguide.explain import tokens as tk

CONTEXT = 77
TOY_CONTEXT = 32


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-32")


def _prompt_with_tokens(tokenizer, n_tokens: int) -> str:
    """A prompt of n_tokens tokens (SOT + content + EOT) of varied one-token words, so order is checkable."""
    words = ["red", "blue", "green", "cat", "dog"]
    text = " ".join(words[i % len(words)] for i in range(n_tokens - 2))
    assert len(tokenizer.encode(text)) == n_tokens - 2
    return text


# --- tokenize: the one truncation policy ---------------------------------------------------------------------


@pytest.mark.parametrize("n_tokens", [75, 76, 77])
def test_prompts_that_fit_are_kept_whole_without_warning(tokenizer, n_tokens):
    text = _prompt_with_tokens(tokenizer, n_tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = tk.tokenize(tokenizer, [text], CONTEXT)
    assert ids.shape == (1, CONTEXT) and ids.dtype == torch.long
    row = ids[0]
    assert row[0] == tokenizer.sot_token_id
    assert tk.n_kept_tokens(row) == n_tokens
    assert row[n_tokens - 1] == tokenizer.eot_token_id
    assert row[1 : n_tokens - 1].tolist() == tokenizer.encode(text)
    assert not row[n_tokens:].any()


def test_too_long_prompt_keeps_sot_first_tokens_and_eot_and_warns(tokenizer):
    text = _prompt_with_tokens(tokenizer, 100)
    with pytest.warns(tk.PromptTruncatedWarning, match=r"has 100 tokens.*context length is 77") as record:
        row = tk.tokenize(tokenizer, [text], CONTEXT)[0]
    assert text[:20] in str(record[0].message)
    assert row[0] == tokenizer.sot_token_id
    assert row[1:76].tolist() == tokenizer.encode(text)[:75]
    assert row[76] == tokenizer.eot_token_id
    assert int(tk.eot_index(row)) == 76 and tk.n_kept_tokens(row) == CONTEXT


@pytest.mark.parametrize("text", ["", "   \n\t "])
def test_empty_prompt_is_a_clear_error(tokenizer, text):
    with pytest.raises(ValueError, match="empty prompt .*give non-empty text"):
        tk.tokenize(tokenizer, ["a cat", text], CONTEXT)


def test_toy_context_length(tokenizer):
    text = _prompt_with_tokens(tokenizer, 40)
    with pytest.warns(tk.PromptTruncatedWarning, match="context length is 32"):
        ids = tk.tokenize(tokenizer, [text, "a cat"], TOY_CONTEXT)
    assert ids.shape == (2, TOY_CONTEXT)
    assert tk.eot_index(ids).tolist() == [31, 3]
    spans = tk.word_spans(tokenizer, text, TOY_CONTEXT)
    assert len(spans) == TOY_CONTEXT - 2 and spans[-1].end == TOY_CONTEXT - 1
    selection = tk.select_words(tokenizer, text, TOY_CONTEXT, "words", ["cat"])
    assert tk.token_weights(selection).shape == (TOY_CONTEXT,)


# --- word spans ----------------------------------------------------------------------------------------------


def _assert_spans_decode(tokenizer, text, spans):
    """Each span's tokens, decoded, are the span's word, and the spans tile the content tokens in order."""
    row = tk.tokenize(tokenizer, [text], CONTEXT)[0]
    for span in spans:
        assert tokenizer.decode(row[span.start : span.end].tolist()).strip() == span.word
    assert spans[0].start == 1
    assert all(a.end == b.start for a, b in zip(spans, spans[1:]))
    assert spans[-1].end == int(tk.eot_index(row))


def test_spans_of_multi_token_words(tokenizer):
    text = "a photo of a strawberry muffin next to a Quokka astronaut from Yorkshire"
    spans = tk.word_spans(tokenizer, text, CONTEXT)
    words = [s.word for s in spans]
    assert words == "a photo of a strawberry muffin next to a quokka astronaut from yorkshire".split()
    quokka = spans[words.index("quokka")]
    assert quokka.end - quokka.start > 1  # "quokka" is several BPE tokens
    _assert_spans_decode(tokenizer, text, spans)


def test_punctuation_is_its_own_word(tokenizer):
    text = "a red circle, and a blue square!"
    spans = tk.word_spans(tokenizer, text, CONTEXT)
    assert [s.word for s in spans] == ["a", "red", "circle", ",", "and", "a", "blue", "square", "!"]
    _assert_spans_decode(tokenizer, text, spans)


def test_non_ascii_words_round_trip(tokenizer):
    text = "un café à Paris 猫"
    spans = tk.word_spans(tokenizer, text, CONTEXT)
    assert [s.word for s in spans] == ["un", "café", "à", "paris", "猫"]
    assert spans[-1].end - spans[-1].start > 1  # "猫" is three bytes, several tokens
    _assert_spans_decode(tokenizer, text, spans)


def test_words_cut_by_truncation_are_dropped(tokenizer):
    # context 5 keeps 3 content tokens: "a", "qu", "ok" -> the cut "quokka" is dropped
    spans = tk.word_spans(tokenizer, "a quokka", 5)
    assert [s.word for s in spans] == ["a"]


# --- desired words -------------------------------------------------------------------------------------------


def test_flags_select_words_and_spread_to_tokens(tokenizer):
    text = "a person with purple quokka hair"
    selection = tk.select_words(tokenizer, text, CONTEXT, "flags", "0 0 0 1 1 0")
    assert [s.word for s in selection.chosen] == ["purple", "quokka"]
    assert tk.token_spans(selection) == [[4], [5, 6, 7]]
    weights = tk.token_weights(selection)
    assert weights.shape == (CONTEXT,)
    assert weights.nonzero().flatten().tolist() == [4, 5, 6, 7]
    assert tk.select_words(tokenizer, text, CONTEXT, "flags", [0, 0, 0, 1, 1, 0]).weights == selection.weights


def test_flags_count_mismatch_lists_the_words(tokenizer):
    message = r"5 word flags for 6 words \['a', 'red', 'circle', ',', 'and', 'dog'\]"
    with pytest.raises(ValueError, match=message):
        tk.select_words(tokenizer, "a red circle, and dog", CONTEXT, "flags", "0 1 1 0 1")


def test_words_mode_is_case_insensitive(tokenizer):
    selection = tk.select_words(tokenizer, "A person with Purple hair", CONTEXT, "words", ["PURPLE", "hair"])
    assert [s.word for s in selection.chosen] == ["purple", "hair"]
    assert selection.mode == "words"
    phrase = tk.select_words(tokenizer, "a strawberry muffin and tea", CONTEXT, "words", ["strawberry muffin"])
    assert [s.word for s in phrase.chosen] == ["strawberry", "muffin"]


def test_word_not_in_prompt_names_it(tokenizer):
    with pytest.raises(ValueError, match=r"word 'green' is not in the prompt; its words are \['a', 'person'"):
        tk.select_words(tokenizer, "a person with purple hair", CONTEXT, "words", ["purple", "green"])


def test_semantic_offline_default_picks_content_words(tokenizer, monkeypatch):
    monkeypatch.setattr(tk, "_nltk_tagger", lambda: None)
    selection = tk.select_words(tokenizer, "a photo of a red circle and a blue square", CONTEXT, "semantic")
    assert [s.word for s in selection.chosen] == ["red", "circle", "blue", "square"]
    assert selection.mode == "semantic:stopwords" and tk.semantic_backend() == "stopwords"
    with pytest.raises(ValueError, match="needs nltk"):
        tk.select_words(tokenizer, "a red circle", CONTEXT, "semantic", "pos")


def test_semantic_uses_pos_nouns_when_a_tagger_is_available(tokenizer, monkeypatch):
    tags = {"red": "JJ", "blue": "JJ", "circle": "NN", "square": "NN"}
    monkeypatch.setattr(tk, "_nltk_tagger", lambda: lambda words: [tags.get(w, "DT") for w in words])
    selection = tk.select_words(tokenizer, "a red circle and a blue square", CONTEXT, "semantic")
    assert [s.word for s in selection.chosen] == ["circle", "square"]
    assert selection.mode == "semantic:pos"


def test_semantic_without_content_words_is_an_error(tokenizer, monkeypatch):
    monkeypatch.setattr(tk, "_nltk_tagger", lambda: None)
    with pytest.raises(ValueError, match="no semantic words"):
        tk.select_words(tokenizer, "a photo of it", CONTEXT, "semantic")


def test_unknown_mode_lists_the_registry(tokenizer):
    with pytest.raises(ValueError, match=r"\['flags', 'semantic', 'words'\]"):
        tk.select_words(tokenizer, "a cat", CONTEXT, "nouns", None)


# --- min-max scaled weights (editing loss) -------------------------------------------------------------------


def test_scaled_weights_min_max_over_word_tokens(tokenizer):
    selection = tk.select_words(tokenizer, "a person with purple hair", CONTEXT, "flags", "1 1 1 3 2")
    scaled = tk.scaled_token_weights(selection)
    assert scaled[1:6].tolist() == [0.0, 0.0, 0.0, 1.0, 0.5]
    assert scaled[0] == 0 and not scaled[6:].any()  # SOT, EOT and padding


@pytest.mark.parametrize("flags, expected", [("1 1 1", 1.0), ("0.3 0.3 0.3", 1.0), ("0 0 0", 0.0)])
def test_scaled_weights_all_equal_has_no_nan(tokenizer, flags, expected):
    selection = tk.select_words(tokenizer, "purple quokka hair", CONTEXT, "flags", flags)
    scaled = tk.scaled_token_weights(selection)
    assert torch.isfinite(scaled).all()
    n_words = selection.spans[-1].end
    assert scaled[1:n_words].tolist() == [expected] * (n_words - 1)
    assert not scaled[n_words:].any()


@pytest.mark.parametrize("template", ["a photo", "a {} next to a {}"])
def test_a_template_without_exactly_one_placeholder_is_refused(tokenizer, template):
    with pytest.raises(ValueError, match=r"needs exactly one \{\} where the class name goes"):
        tk.class_prompt_tokens(tokenizer, template, ["red circle"], 77)
