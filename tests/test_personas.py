import json

import pytest

from persona_geometry.personas import Persona, PersonaSet, builtin_personas
from persona_geometry.prompts import render_prompts
from persona_geometry.provenance import stable_hash, stable_seed
from persona_geometry.questions import builtin_questions, load_questions, training_questions

STUDY_NAMES = [
    "helpful_assistant", "qwen_default", "software_engineer", "data_scientist", "librarian",
    "medical_doctor", "kindergarten_teacher", "police_officer", "comedian", "french_person",
    "villain", "zelthari_scholar",
]


def test_builtin_set_matches_the_reference_study():
    ps = builtin_personas()
    assert ps.names == STUDY_NAMES
    assert ps["helpful_assistant"].system_prompt == "You are a helpful assistant."
    assert ps["qwen_default"].system_prompt == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    cats = dict(zip(ps.names, ps.categories, strict=True))
    assert [n for n in STUDY_NAMES if cats[n] == "generic_helper"] == STUDY_NAMES[:2]
    assert [n for n in STUDY_NAMES if cats[n] == "occupational"] == STUDY_NAMES[2:8]
    assert [n for n in STUDY_NAMES if cats[n] == "character"] == STUDY_NAMES[8:]


def test_question_pools_are_disjoint_and_sized():
    probe, train = builtin_questions(), training_questions()
    assert len(probe) == 20 and len(set(probe)) == 20
    assert len(train) == 200 and len(set(train)) == 200
    assert not set(probe) & set(train)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_persona_set_round_trips_through_files(tmp_path, suffix):
    ps = builtin_personas()
    path = ps.save(tmp_path / f"personas{suffix}")
    assert PersonaSet.load(path) == ps
    assert PersonaSet.load(path).content_hash() == ps.content_hash()


def test_load_questions_from_text(tmp_path):
    (tmp_path / "q.txt").write_text("First?\n\nSecond?\n")
    assert load_questions(tmp_path / "q.txt") == ["First?", "Second?"]
    (tmp_path / "dup.json").write_text(json.dumps(["A?", "A?"]))
    with pytest.raises(ValueError, match="'questions' parameter of load_questions must be unique names"):
        load_questions(tmp_path / "dup.json")


def test_bad_personas_name_the_parameter():
    with pytest.raises(ValueError, match="'personas' parameter of PersonaSet must be a non-empty"):
        PersonaSet([])
    p = Persona(name="a", system_prompt="You are A.")
    with pytest.raises(ValueError, match="must be unique names. Got \"'a' twice\""):
        PersonaSet([p, p])
    with pytest.raises(ValueError, match="'name' parameter of Persona must be a non-empty string"):
        Persona(name=" ", system_prompt="x")
    with pytest.raises(ValueError, match="'name' parameter of PersonaSet.index must be one of the persona names"):
        builtin_personas()["nobody"]


def test_stable_hash_and_seed_do_not_depend_on_the_process():
    # Hand-computed once; Python's salted hash() would differ between interpreter runs.
    assert stable_hash({"b": 1, "a": [1, 2]}) == stable_hash({"a": [1, 2], "b": 1})
    assert stable_seed("villain") == int(stable_hash(["villain"], length=8), 16)
    assert stable_seed("villain") != stable_seed("comedian")


def test_prompts_use_the_chat_template_and_end_at_the_generation_header(tiny_tokenizer):
    ps = builtin_personas()[:2]
    prompts = render_prompts(tiny_tokenizer, ps, ["Why?", "How do I boil an egg?"])
    assert len(prompts) == 4
    p = prompts.at("helpful_assistant", 1)
    assert p.text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHow do I boil an egg?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert list(p.input_ids) == tiny_tokenizer(p.text, add_special_tokens=False)["input_ids"]
    assert prompts.n_tokens()[0][1] == p.n_tokens


def test_tokenizer_without_template_is_a_clear_error(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    with pytest.raises(ValueError, match="'chat_template' parameter of render_prompts"):
        render_prompts(tok, builtin_personas()[:1], ["Why?"])
    from persona_geometry.tiny import CHATML_TEMPLATE

    assert len(render_prompts(tok, builtin_personas()[:1], ["Why?"], chat_template=CHATML_TEMPLATE)) == 1


def test_tiny_model_is_deterministic(tmp_path):
    from persona_geometry.tiny import TinyModelSpec, build_tiny_model

    spec = TinyModelSpec(num_hidden_layers=1, hidden_size=64, num_attention_heads=2, num_key_value_heads=1)
    a = build_tiny_model(tmp_path / "a", spec)
    b = build_tiny_model(tmp_path / "b", spec)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    import os

    from persona_geometry._io import atomic_write_text

    mask = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "report.md", "x")
    finally:
        os.umask(mask)
    assert path.read_text() == "x" and (path.stat().st_mode & 0o777) == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
