"""Prompts: every persona paired with every question, rendered with the model's chat template."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from persona_geometry._validation import check_unique_names, invalid
from persona_geometry.personas import Persona, PersonaSet
from persona_geometry.provenance import stable_hash

__all__ = [
    "Prompt",
    "PromptSet",
    "chat_messages",
    "chat_template_of",
    "common_prefix",
    "left_pad",
    "render_prompts",
    "render_prompts_unchecked",
    "tokenize_groups",
]

log = logging.getLogger(__name__)
_S = TypeVar("_S", str, tuple[int, ...])


@dataclass(frozen=True, kw_only=True)
class Prompt:
    """One rendered prompt: the persona's system turn, one user question, the generation header."""

    persona: str
    question_index: int
    text: str
    input_ids: tuple[int, ...] = field(repr=False)

    @property
    def n_tokens(self) -> int:
        """The prompt's length in tokens."""
        return len(self.input_ids)


@dataclass(frozen=True, kw_only=True)
class PromptSet:
    """All ``persona × question`` prompts, persona-major: prompt ``(p, q)`` sits at ``p * Q +
    q``."""

    personas: PersonaSet
    questions: tuple[str, ...]
    prompts: tuple[Prompt, ...] = field(repr=False)
    chat_template_hash: str

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> Prompt:
        return self.prompts[index]

    def at(self, persona: str, question_index: int) -> Prompt:
        """Returns the prompt of ``persona`` on question ``question_index``."""
        return self.prompts[self.personas.index(persona) * len(self.questions) + question_index]

    def n_tokens(self) -> list[list[int]]:
        """Returns the token counts as a ``[persona][question]`` nested list."""
        q = len(self.questions)
        return [
            [p.n_tokens for p in self.prompts[i * q : (i + 1) * q]]
            for i in range(len(self.personas))
        ]

    def content_hash(self) -> str:
        """Returns a stable hash of every prompt's token ids (what the model actually sees).

        The ids are hashed as little-endian 64-bit integers, each prompt's length first: the
        same digest on every machine, 3× faster than hashing them as JSON (60 ms for 617k
        tokens), which an extraction pays before its first forward.
        """
        import array
        import hashlib
        import sys

        lengths = array.array("q", (len(p.input_ids) for p in self.prompts))
        ids = array.array("q", itertools.chain.from_iterable(p.input_ids for p in self.prompts))
        if sys.byteorder == "big":
            lengths.byteswap()
            ids.byteswap()
        digest = hashlib.sha256(lengths.tobytes())
        digest.update(ids.tobytes())
        return digest.hexdigest()[:16]


def chat_messages(persona: Persona, question: str) -> list[dict[str, str]]:
    """Returns the chat messages for a persona asked one question: system turn, user turn."""
    return [
        {"role": "system", "content": persona.system_prompt},
        {"role": "user", "content": question},
    ]


def chat_template_of(
    tokenizer: Any, chat_template: str | None = None, *, func: str = "render_prompts"
) -> str:
    """Returns the chat template to render with: the one passed, else the tokenizer's own.

    Raises:
        ValueError: If neither is available.
    """
    template = (
        chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    )
    if isinstance(template, dict):  # Some tokenizers keep several named templates.
        template = template.get("default")
    if not template:
        invalid(
            "chat_template",
            func,
            "a Jinja chat template string when the tokenizer has none (pass chat_template=...)",
            chat_template,
        )
    return template


def render_prompts(
    tokenizer: Any,
    personas: PersonaSet | Sequence[Persona],
    questions: Sequence[str],
    *,
    chat_template: str | None = None,
) -> PromptSet:
    """Returns every ``persona × question`` prompt rendered with the chat template, and tokenised.

    Each prompt is the system message, the user message and the generation prompt
    (``add_generation_prompt=True``), so its last token is the one right before the model
    would start its answer. Token ids come from tokenising the rendered text without adding
    special tokens again (the template already holds any BOS), exactly as
    ``apply_chat_template(tokenize=True)`` does.

    The template renders once per persona, not once per prompt: each persona's conversation is
    rendered with a sentinel question, the text is cut at the sentinel, and every question goes
    in between. That assumes the template writes the question verbatim, the same way whatever
    the persona. It is tested, against real renders, on every question with the first persona
    and on every persona with the first question; where the sentinel does not appear exactly
    once or any of those texts differs, every prompt is rendered for real. The texts are those
    of rendering each conversation on its own either way.

    Args:
        tokenizer: A Hugging Face tokenizer.
        personas: The personas, in order.
        questions: The user questions, in order.
        chat_template: A Jinja template to use instead of the tokenizer's own.

    Raises:
        ValueError: If there are no personas or questions, names or questions repeat, or no chat
            template is available.
    """
    return _render(tokenizer, personas, questions, chat_template, defer_checks=False)[0]


def render_prompts_unchecked(
    tokenizer: Any,
    personas: PersonaSet | Sequence[Persona],
    questions: Sequence[str],
    *,
    chat_template: str | None = None,
) -> tuple[PromptSet, Callable[[], bool]]:
    """Returns ``render_prompts``' prompts before its checks, and a function that runs them.

    The checks (real renders of ``P + Q - 1`` prompts, each group's first text tokenised in
    full) are most of ``render_prompts``' time; a caller with other work to start (a GPU
    forward) runs them meanwhile. Where the function returns True, the prompts are those of
    ``render_prompts``; where it returns False, they may differ and must not be used: call
    ``render_prompts``, which then renders every prompt. A template that once failed its checks
    is checked before anything is returned from then on (the function then returns True).
    """
    return _render(tokenizer, personas, questions, chat_template, defer_checks=True)


# Templates whose prompts failed a deferred check: rendered checked first from then on, so no
# caller starts work on prompts that are thrown away more than once per template.
_FAILED_DEFERRED: set[str] = set()


def _render(
    tokenizer: Any,
    personas: PersonaSet | Sequence[Persona],
    questions: Sequence[str],
    chat_template: str | None,
    *,
    defer_checks: bool,
) -> tuple[PromptSet, Callable[[], bool]]:
    personas = personas if isinstance(personas, PersonaSet) else PersonaSet(personas)
    questions = tuple(check_unique_names(list(questions), "questions", "render_prompts"))
    template = chat_template_of(tokenizer, chat_template)
    template_hash = stable_hash(template)
    defer_checks = defer_checks and template_hash not in _FAILED_DEFERRED

    def render(conversations: list[list[dict[str, str]]]) -> list[str]:
        # One batched call: the template renders in one loop.
        return list(
            tokenizer.apply_chat_template(
                conversations, chat_template=template, tokenize=False, add_generation_prompt=True
            )
        )

    def render_every_prompt() -> list[str]:
        return render([chat_messages(p, question) for p in personas for question in questions])

    q = len(questions)
    once = _render_once_per_persona(render, personas, questions)
    texts, texts_ok = once if once is not None else (render_every_prompt(), _passed)
    if not defer_checks:  # checked now, and not again by the function returned
        texts = texts if texts_ok() else render_every_prompt()
        texts_ok = _passed
    all_ids, ids_ok = _tokenize_groups(tokenizer, texts, q)
    if not defer_checks:
        all_ids = all_ids if ids_ok() else _tokenize_all(tokenizer, texts)
        ids_ok = _passed
    names = [p.name for p in personas]
    prompts = [
        Prompt(persona=names[i // q], question_index=i % q, text=text, input_ids=tuple(ids))
        for i, (text, ids) in enumerate(zip(texts, all_ids, strict=True))
    ]
    prompt_set = PromptSet(
        personas=personas,
        questions=questions,
        prompts=tuple(prompts),
        chat_template_hash=template_hash,
    )

    def checks() -> bool:
        ok = texts_ok() and ids_ok()
        if not ok:
            _FAILED_DEFERRED.add(template_hash)
        return ok

    return prompt_set, checks


def _passed() -> bool:
    return True


def _render_once_per_persona(
    render: Callable[[list[list[dict[str, str]]]], list[str]],
    personas: PersonaSet,
    questions: tuple[str, ...],
) -> tuple[list[str], Callable[[], bool]] | None:
    """Returns the persona-major prompt texts, each persona's conversation rendered once around
    a sentinel question, and a check against real renders; None where the sentinel does not
    appear exactly once in every render.

    ``P`` renders, and ``P + Q - 1`` more in the check, instead of ``P × Q``: 169 instead of
    1,500 on ``benchmarks/extract_gpu.py``'s long prompts. Where that is no saving (one
    persona or at most two questions), returns None at once.
    """
    n_p, n_q = len(personas), len(questions)
    if n_p * n_q <= 2 * n_p + n_q - 1:
        return None
    # Mixed-case letters and digits: no template escapes them, and one that changes the
    # question's case or content loses the sentinel rather than misplace it.
    sentinel = next(
        s
        for s in (f"Qz{k}xSentinel7Question" for k in itertools.count())
        if not any(s in p.system_prompt for p in personas)
    )
    cuts = []
    for persona, text in zip(
        personas, render([chat_messages(p, sentinel) for p in personas]), strict=True
    ):
        if text.count(sentinel) != 1:
            log.debug(
                "rendering every prompt: the sentinel question appears %d times in persona "
                "%r's render",
                text.count(sentinel),
                persona.name,
            )
            return None
        cuts.append(text.split(sentinel))
    texts = [head + question + tail for head, tail in cuts for question in questions]

    def check() -> bool:
        """Whether every question with the first persona and every persona with the first
        question render as the texts have them."""
        first = personas[0]
        real = render(
            [chat_messages(first, question) for question in questions]
            + [chat_messages(p, questions[0]) for p in personas[1:]]
        )
        checked = list(range(n_q)) + [p * n_q for p in range(1, n_p)]
        for i, text in zip(checked, real, strict=True):
            if texts[i] != text:
                log.debug(
                    "rendering every prompt: the template does not render question %d of "
                    "persona %r verbatim between the same head and tail",
                    i % n_q,
                    personas[i // n_q].name,
                )
                return False
        return True

    return texts, check


def tokenize_groups(tokenizer: Any, texts: Sequence[str], group_size: int) -> list[list[int]]:
    """Returns the token ids of ``texts`` (no special tokens added), equal to tokenising each in
    full; runs of ``group_size`` texts that share a long prefix (one persona's prompts)
    tokenise that prefix once, and each distinct rest once.

    A fast tokenizer splits its input at added tokens (``<|im_end|>``, ``<|im_start|>``, …)
    before anything else, and tokenises the pieces between them independently. So where a
    group's common text prefix ends just after an added token that neither strips the
    whitespace after it nor is normalised, the ids are those of the prefix followed by those
    of the rest, and the prefix (a persona's system prompt) is tokenised once instead of once
    per question: 5× fewer tokens on ``benchmarks/extract_gpu.py``'s long prompts. The rests
    (a question and the end of the template) repeat across groups; each distinct one is
    tokenised once (the same string gives the same ids). The first text of every group is also
    tokenised in full and compared; on any difference (a pre-tokenizer that treats the first
    piece of an input specially, say) every text is tokenised in full.
    """
    ids, check = _tokenize_groups(tokenizer, texts, group_size)
    return [list(x) for x in ids] if check() else _tokenize_all(tokenizer, texts)


def _tokenize_all(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def _tokenize_groups(
    tokenizer: Any, texts: Sequence[str], group_size: int
) -> tuple[Sequence[Sequence[int]], Callable[[], bool]]:
    """``tokenize_groups`` before its check: the ids (tuples where the groups split, made in one
    copy: 1,500 long prompts hold 600k ids), and a function that compares each group's first
    text with its full tokenisation (``log``s and returns False on a difference)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    boundaries = [
        t.content
        for t in added.values()
        if t.content and not getattr(t, "rstrip", False) and not getattr(t, "normalized", False)
    ]
    if backend is None or not boundaries or group_size < 2 or len(texts) % group_size:
        return _tokenize_all(tokenizer, texts), _passed
    groups = [texts[i : i + group_size] for i in range(0, len(texts), group_size)]
    cuts = []
    for group in groups:
        common = common_prefix(group)
        cuts.append(max((common.rfind(b) + len(b) for b in boundaries if b in common), default=0))
    if not any(cuts):
        return _tokenize_all(tokenizer, texts), _passed

    heads = [g[0][:cut] for g, cut in zip(groups, cuts, strict=True)]
    tails = [t[cut:] for g, cut in zip(groups, cuts, strict=True) for t in g]
    # Each distinct piece once, in one call (without the character offsets, where the backend
    # can leave them out: the ids are the same).
    unique = list(dict.fromkeys(heads + tails))
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    encoded = dict(
        zip(unique, (tuple(e.ids) for e in encode(unique, add_special_tokens=False)), strict=True)
    )
    ids = [encoded[heads[k // group_size]] + encoded[tails[k]] for k in range(len(texts))]

    def check() -> bool:
        firsts = [ids[i] for i in range(0, len(texts), group_size)]
        if [tuple(x) for x in _tokenize_all(tokenizer, [g[0] for g in groups])] != firsts:
            log.debug("tokenising every prompt in full: the shared prefix does not split cleanly")
            return False
        return True

    return ids, check


def common_prefix(seqs: Sequence[_S]) -> _S:
    """Returns the longest common prefix of ``seqs`` (strings, or tuples of token ids), by
    bisection on slices (in C, unlike ``os.path.commonprefix``'s loop over elements)."""
    first, last = min(seqs), max(seqs)  # Every sequence's prefix lies between these two.
    low, high = 0, min(len(first), len(last))
    while low < high:
        mid = (low + high + 1) // 2
        if first[:mid] == last[:mid]:
            low = mid
        else:
            high = mid - 1
    return first[:low]


def left_pad(
    seqs: Sequence[Sequence[int]], pad_id: int, width: int | None = None
) -> tuple[Any, Any]:
    """Returns ``(input_ids, attention_mask)`` of the token-id lists, left-padded to ``width``.

    Left padding puts every prompt's last token in the last column, right where generation (or
    the last-token capture) happens. ``width`` defaults to the longest sequence; an empty
    sequence becomes a row of padding.
    """
    import torch

    width = max(len(s) for s in seqs) if width is None else width
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if len(seq):
            ids[row, width - len(seq) :] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids, mask
