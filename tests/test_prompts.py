"""tokenize_groups: a group's shared prefix tokenised once gives the ids of tokenising in full."""

from __future__ import annotations

import pytest

from persona_geometry import Persona, builtin_personas, builtin_questions, render_prompts
from persona_geometry.prompts import tokenize_groups


def _full(tokenizer, texts):
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


class _Counting:
    """A tokenizer wrapper that records how many texts went through the full-text path."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.full_texts = 0

    def __call__(self, texts, **kw):
        self.full_texts += len(texts)
        return self._tok(texts, **kw)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_chatml_prompts_split_after_the_user_header_and_equal_full_tokenisation(tiny_tokenizer):
    personas = list(builtin_personas())[:4] + [
        Persona(name="long", system_prompt="You are a ship's cook. " * 40),
        Persona(name="odd", system_prompt="  spaces\n\nand <|im_end tags| that are not tokens"),
    ]
    questions = list(builtin_questions())[:5] + [" leading space", "<|im_start|>inner", "x"]
    prompts = render_prompts(tiny_tokenizer, personas, questions)
    texts = [p.text for p in prompts]
    counting = _Counting(tiny_tokenizer)
    ids = tokenize_groups(counting, texts, len(questions))
    assert ids == _full(tiny_tokenizer, texts)
    assert counting.full_texts == len(personas)  # only each group's check went through in full
    assert [list(p.input_ids) for p in prompts] == ids  # render_prompts uses it


def test_a_pre_tokenizer_that_marks_the_first_piece_falls_back_to_full_tokenisation():
    """Metaspace(prepend_scheme="first") puts '▁' before the first piece of an input only: a
    prefix tokenised apart would give the rest a second '▁'. The check catches it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    corpus = ["you are a helpful pirate", "what is the sea", "hello there friend"] * 5
    tok.train_from_iterator(corpus, trainer=trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", additional_special_tokens=["<s>", "</s>"])
    texts = [f"<s>you are a pirate</s><s>{q}</s>" for q in ("what is the sea", "hello there", "friend")]
    counting = _Counting(fast)
    ids = tokenize_groups(counting, texts, 3)
    assert ids == _full(fast, texts)
    assert counting.full_texts == 1 + 3  # the check, then every text in full


@pytest.mark.parametrize("group_size", [1, 4])
def test_groups_without_an_added_token_in_common_are_tokenised_in_full(tiny_tokenizer, group_size):
    texts = ["alpha beta", "alpha gamma", "delta", "delta epsilon"]
    assert tokenize_groups(tiny_tokenizer, texts, group_size) == _full(tiny_tokenizer, texts)


def test_content_hash_sees_every_id_and_where_each_prompt_ends(tiny_tokenizer):
    import dataclasses

    prompts = render_prompts(tiny_tokenizer, list(builtin_personas())[:2], list(builtin_questions())[:2])

    def with_ids(*ids):
        ps = [dataclasses.replace(p, input_ids=tuple(i)) for p, i in zip(prompts.prompts, ids, strict=True)]
        return dataclasses.replace(prompts, prompts=tuple(ps)).content_hash()

    base = with_ids([1, 2], [3], [4, 5], [6])
    assert base == with_ids([1, 2], [3], [4, 5], [6])
    assert base != with_ids([1], [2, 3], [4, 5], [6])  # same ids, another cut
    assert base != with_ids([1, 2], [3], [4, 5], [7])
    assert prompts.content_hash() != base
