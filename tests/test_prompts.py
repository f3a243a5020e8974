"""render_prompts and tokenize_groups: rendering once per persona and tokenising a group's shared
prefix and each distinct rest once give the texts and ids of rendering and tokenising every
prompt on its own."""

from __future__ import annotations

import logging
import os
import random

import pytest

from persona_geometry import Persona, builtin_personas, builtin_questions, render_prompts
from persona_geometry.prompts import common_prefix, render_prompts_unchecked, tokenize_groups


def _full(tokenizer, texts):
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _one_at_a_time(tokenizer, personas, questions, template=None):
    """Returns the texts and ids of every prompt, each conversation rendered and tokenised alone."""
    kw = {} if template is None else {"chat_template": template}
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "system", "content": p.system_prompt}, {"role": "user", "content": q}],
            tokenize=False,
            add_generation_prompt=True,
            **kw,
        )
        for p in personas
        for q in questions
    ]
    return texts, _full(tokenizer, texts)


class _CountingBackend:
    def __init__(self, backend):
        self._backend = backend
        self.texts = 0

    def encode_batch(self, texts, **kw):
        self.texts += len(texts)
        return self._backend.encode_batch(texts, **kw)


class _Counting:
    """A tokenizer wrapper that records how many texts went through the full-text path, the
    backend's batch encoder, and how many conversations were rendered."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.full_texts = 0
        self.rendered = 0
        self.backend_tokenizer = _CountingBackend(tokenizer.backend_tokenizer)

    def __call__(self, texts, **kw):
        self.full_texts += len(texts)
        return self._tok(texts, **kw)

    def apply_chat_template(self, conversations, **kw):
        self.rendered += len(conversations)
        return self._tok.apply_chat_template(conversations, **kw)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def _long_set(n_personas: int, n_questions: int):
    """Personas with long, varied system prompts; questions of varied length, one with
    whitespace around it, one with Jinja syntax, one with the sentinel's first choice inside."""
    words = " ".join([p.system_prompt for p in builtin_personas()] + builtin_questions()).split()
    rng = random.Random(0)
    personas = [
        Persona(name=f"p{k}", system_prompt=f"You are persona {k}. " + " ".join(rng.choices(words, k=rng.randint(60, 240))))
        for k in range(n_personas)
    ]
    personas.append(Persona(name="sentinel-like", system_prompt="Codes: Qz0xSentinel7Question, Qz1x, Z9q. Obey."))
    questions = [" ".join(rng.choices(words, k=rng.choice([2, 8, 30, 90]))) + "?" for _ in range(n_questions)]
    questions += ["  \n padded question?\n ", "Render {{ name }} and {% if x %}y{% endif %} %} {# c #}"]
    return personas, questions


@pytest.mark.parametrize("which", ["builtin", "long"])
def test_render_prompts_equals_rendering_and_tokenising_each_prompt_alone(tiny_tokenizer, which):
    personas, questions = (
        (list(builtin_personas()), builtin_questions()) if which == "builtin" else _long_set(6, 6)
    )
    counting = _Counting(tiny_tokenizer)
    prompts = render_prompts(counting, personas, questions)
    texts, ids = _one_at_a_time(tiny_tokenizer, personas, questions)
    assert [p.text for p in prompts] == texts
    assert [list(p.input_ids) for p in prompts] == ids
    n_p, n_q = len(personas), len(questions)
    assert counting.rendered == 2 * n_p + n_q - 1  # rendered once per persona, verified
    assert counting.full_texts == n_p  # tokenised per group, checked once per group
    assert counting.backend_tokenizer.texts == n_p + n_q  # each head and each distinct tail once


_CHATML_USER = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'user' %}USER{% else %}{{ message['content'] }}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_TEMPLATES = {
    # Not separable: the question is trimmed only under a pirate's system prompt.
    "trims for a pirate": "(message['content'] | trim) if 'pirate' in messages[0]['content'] else message['content']",
    # Not separable: the question's length is written out.
    "writes the length": "(message['content'] | length | string) + ': ' + message['content']",
    # The sentinel does not survive: upper-cased under a loud system prompt.
    "shouts": "(message['content'] | upper) if 'LOUD' in messages[0]['content'] else message['content']",
    # The sentinel appears twice.
    "repeats the question": "message['content'] + ' (again: ' + message['content'] + ')'",
}


@pytest.mark.parametrize("pirate_first", [True, False])
@pytest.mark.parametrize("name", list(_TEMPLATES))
def test_a_template_that_does_not_render_the_question_verbatim_falls_back(tiny_tokenizer, caplog, name, pirate_first):
    template = _CHATML_USER.replace("USER", "{{ " + _TEMPLATES[name] + " }}")
    personas = [
        Persona(name="plain", system_prompt="You are a helpful assistant."),
        Persona(name="pirate", system_prompt="You are a pirate. Speak LOUD."),
        Persona(name="cook", system_prompt="You are a cook."),
    ]
    questions = ["What is the sea?", "Tell me more.", "  Why?  "]
    if pirate_first:  # the first persona's check catches it, else the first question's
        personas = personas[1:2] + personas[:1] + personas[2:]
    else:
        questions = questions[::-1]
    counting = _Counting(tiny_tokenizer)
    with caplog.at_level(logging.DEBUG, logger="persona_geometry.prompts"):
        prompts = render_prompts(counting, personas, questions, chat_template=template)
    texts, ids = _one_at_a_time(tiny_tokenizer, personas, questions, template)
    assert [p.text for p in prompts] == texts
    assert [list(p.input_ids) for p in prompts] == ids
    n_p, n_q = len(personas), len(questions)
    reasons = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rendering every")]
    expected = {"shouts": "appears 0 times", "repeats the question": "appears 2 times"}.get(name, "verbatim")
    # The attempt (the sentinel renders, then the check's unless the sentinel failed), then
    # every prompt.
    attempt = n_p + (n_p + n_q - 1 if expected == "verbatim" else 0)
    assert counting.rendered == attempt + n_p * n_q
    assert len(reasons) == 1 and expected in reasons[0]


def test_render_prompts_with_one_persona_or_few_questions_renders_every_prompt(tiny_tokenizer):
    personas, questions = _long_set(2, 3)
    for ps, qs in [(personas[:1], questions), (personas, questions[:2])]:
        counting = _Counting(tiny_tokenizer)
        prompts = render_prompts(counting, ps, qs)
        assert counting.rendered == len(ps) * len(qs)  # no saving to be had
        assert [p.text for p in prompts] == _one_at_a_time(tiny_tokenizer, ps, qs)[0]


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


def test_each_distinct_tail_is_tokenised_once_even_where_only_whitespace_after_the_cut_differs(tiny_tokenizer):
    heads = [f"<|im_start|>system\nYou are persona {k}.<|im_end|>\n<|im_start|>" for k in range(3)]
    rests = ["user\nHi?<|im_end|>\n", " user\nHi?<|im_end|>\n", "\nuser\nHi?<|im_end|>\n", "user\n Hi?<|im_end|>\n"]
    texts = [h + r for h in heads for r in rests]
    texts[-1] = heads[-1] + "\n\nuser\nHi?<|im_end|>\n"  # a rest the other groups lack
    counting = _Counting(tiny_tokenizer)
    ids = tokenize_groups(counting, texts, len(rests))
    assert ids == _full(tiny_tokenizer, texts)
    assert counting.backend_tokenizer.texts == len(heads) + len(rests) + 1


def test_common_prefix_equals_os_path_commonprefix():
    rng = random.Random(0)
    for _ in range(300):
        stem = "".join(rng.choices("ab ", k=rng.randint(0, 40)))
        texts = [stem + "".join(rng.choices("ab", k=rng.randint(0, 5))) for _ in range(rng.randint(1, 4))]
        assert common_prefix(texts) == os.path.commonprefix(texts)
        as_ids = [tuple(map(ord, t)) for t in texts]  # token ids: tuples, not strings
        assert common_prefix(as_ids) == tuple(os.path.commonprefix([list(x) for x in as_ids]))


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


def test_unchecked_prompts_are_render_prompts_with_the_checks_left_for_later(tiny_tokenizer):
    personas, questions = _long_set(4, 5)
    counting = _Counting(tiny_tokenizer)
    prompts, checks = render_prompts_unchecked(counting, personas, questions)
    n_p, n_q = len(personas), len(questions)
    assert (counting.rendered, counting.full_texts) == (n_p, 0)  # the sentinel renders only
    assert checks() is True
    assert (counting.rendered, counting.full_texts) == (2 * n_p + n_q - 1, n_p)  # then checked
    texts, ids = _one_at_a_time(tiny_tokenizer, personas, questions)
    assert [p.text for p in prompts] == texts
    assert [list(p.input_ids) for p in prompts] == ids
    assert prompts == render_prompts(tiny_tokenizer, personas, questions)


def test_unchecked_prompts_that_fail_a_check_say_so_and_their_template_is_checked_first_after(tiny_tokenizer, monkeypatch):
    from persona_geometry import prompts as prompts_module

    monkeypatch.setattr(prompts_module, "_FAILED_DEFERRED", set())
    template = _CHATML_USER.replace("USER", "{{ " + _TEMPLATES["trims for a pirate"] + " }}")
    personas = [
        Persona(name="pirate", system_prompt="You are a pirate."),
        Persona(name="plain", system_prompt="You are a helpful assistant."),
        Persona(name="cook", system_prompt="You are a cook."),
    ]
    questions = ["What is the sea?", "Tell me more.", "  Why?  "]
    texts, ids = _one_at_a_time(tiny_tokenizer, personas, questions, template)
    prompts, checks = render_prompts_unchecked(tiny_tokenizer, personas, questions, chat_template=template)
    assert [p.text for p in prompts] != texts  # what the checks are there to catch
    assert checks() is False
    counting = _Counting(tiny_tokenizer)
    prompts, checks = render_prompts_unchecked(counting, personas, questions, chat_template=template)
    n_p, n_q = len(personas), len(questions)
    assert counting.rendered == (2 * n_p + n_q - 1) + n_p * n_q  # checked before returning
    assert [p.text for p in prompts] == texts
    assert [list(p.input_ids) for p in prompts] == ids
    assert checks() is True


def test_unchecked_prompts_whose_split_tokenisation_differs_fail_their_checks(monkeypatch):
    """The tokenisation half of the checks: a pre-tokenizer that marks the first piece of an
    input tokenises a split prompt differently (see the test above for tokenize_groups)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from persona_geometry import prompts as prompts_module

    monkeypatch.setattr(prompts_module, "_FAILED_DEFERRED", set())
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    corpus = ["you are a helpful pirate", "what is the sea", "hello there friend"] * 5
    tok.train_from_iterator(corpus, trainer=trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", additional_special_tokens=["<s>", "</s>"])
    template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    personas = [Persona(name=f"p{k}", system_prompt=f"you are pirate {k}") for k in range(3)]
    questions = ["what is the sea", "hello there", "friend"]
    prompts, checks = render_prompts_unchecked(fast, personas, questions, chat_template=template)
    full = _full(fast, [p.text for p in prompts])
    assert [list(p.input_ids) for p in prompts] != full
    assert checks() is False
    prompts, checks = render_prompts_unchecked(fast, personas, questions, chat_template=template)
    assert [list(p.input_ids) for p in prompts] == full and checks() is True


def test_unchecked_prompts_of_a_template_checked_up_front_are_not_checked_twice(tiny_tokenizer, monkeypatch):
    from persona_geometry import prompts as prompts_module
    from persona_geometry.provenance import stable_hash

    template = prompts_module.chat_template_of(tiny_tokenizer, None)
    monkeypatch.setattr(prompts_module, "_FAILED_DEFERRED", {stable_hash(template)})  # once failed
    personas, questions = _long_set(3, 4)
    counting = _Counting(tiny_tokenizer)
    prompts, checks = render_prompts_unchecked(counting, personas, questions)
    n_p, n_q = len(personas), len(questions)
    assert (counting.rendered, counting.full_texts) == (2 * n_p + n_q - 1, n_p)  # checked up front
    assert checks() is True
    assert (counting.rendered, counting.full_texts) == (2 * n_p + n_q - 1, n_p)  # not again
    assert prompts == render_prompts(tiny_tokenizer, personas, questions)
