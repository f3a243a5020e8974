"""Bad input to every subcommand, run in process through ``main(argv)``: each case must end with
exit status 2, exactly one line on stderr (no traceback) naming the offending parameter or file,
and nothing written anywhere in the working folder.

The table covers wrong types, negatives, out-of-range numbers, bad choices, missing, empty,
non-UTF-8 and malformed files, folders where files are expected and files where folders are,
malformed YAML/JSON/JSONL/CSV, and bad study-config keys and values. Cases fail before any
model weights are used (a few load the tiny model's config or tokenizer), so the whole table
runs in seconds.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import yaml

from persona_geometry.pipeline.cli import main

PERSONAS = [
    {"name": "helpful_assistant", "system_prompt": "You are a helpful assistant.", "category": "generic_helper"},
    {"name": "villain", "system_prompt": "You are a scheming villain.", "category": "character"},
    {"name": "librarian", "system_prompt": "You are a librarian.", "category": "occupational"},
]
QUESTIONS = "Why is the sky blue?\nHow do I boil an egg?\nWhat makes a good friend?\n"
NAMES = [p["name"] for p in PERSONAS] + ["pirate", "poet", "chef"]

# A valid study on the tiny model; each bad study below changes one thing.
STUDY: dict = {
    "name": "fuzz", "out": "study_out", "model": {"name": "MODEL", "dtype": "float32", "device": "cpu"},
    "personas": "personas.yaml", "questions": "questions.txt", "training_questions": "questions.txt",
    "data": {"n_source": 4, "n_per_bystander": 4, "n_bystander_personas": 1},
    "responses": {"max_new_tokens": 4, "backend": "hf"},
    "eval": {"backend": "hf", "n_completions": 2, "max_new_tokens": 4},
    "analysis": {"primary_layer": 1, "n_permutations": 10, "n_bootstrap": 10},
}  # fmt: skip


def _merged(base: dict, change: dict) -> dict:
    out = dict(base)
    for k, v in change.items():
        out[k] = _merged(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) and v else v
    return out


# name -> (config change, fragment the error line must hold: the key it names)
BAD_STUDIES: dict[str, tuple[dict, str]] = {
    "unknown_top": ({"modle": {"name": "x"}}, "modle"),
    "unknown_section_key": ({"train": {"lr": 1e-4}}, "train.lr"),
    "section_not_mapping": ({"extract": "all"}, "extract"),
    "model_empty": ({"model": {"name": ""}}, "name"),
    "model_number": ({"model": 3}, "model"),
    "model_dtype": ({"model": {"dtype": "float8"}}, "dtype"),
    "device_map": ({"model": {"device_map": "everywhere"}}, "device_map"),
    "max_memory_no_map": ({"model": {"max_memory": {"0": "1GiB"}}}, "max_memory"),
    "template_missing_file": ({"model": {"chat_template": "nowhere.jinja"}}, "chat_template"),
    "template_bad_jinja": ({"model": {"chat_template": "{% for m in messages %}{{ m.content }"}}, "chat_template"),
    "template_unclosed_for": ({"model": {"chat_template": "{% for m in messages %}{{ m.content }}"}}, "chat_template"),
    "template_number": ({"model": {"chat_template": 5}}, "chat_template"),
    "hooks_string": ({"extract": {"hooks": "resid_post"}}, "hooks"),
    "hooks_bad": ({"extract": {"hooks": ["resid"]}}, "hooks"),
    "layers_strings": ({"extract": {"layers": ["a"]}}, "layers"),
    "layers_out_of_range": ({"extract": {"layers": [0, 9]}}, "extract.layers"),
    "engine": ({"extract": {"engine": "vllm"}}, "engine"),
    "batch_tokens_zero": ({"extract": {"batch_tokens": 0}}, "batch_tokens"),
    "batch_tokens_text": ({"extract": {"batch_tokens": "many"}}, "batch_tokens"),
    "compile_blocks_text": ({"extract": {"compile_blocks": "yes"}}, "compile_blocks"),
    "geometry_hook": ({"geometry": {"hook": "resid_pre"}}, "hook"),
    "geometry_reference_unknown": ({"geometry": {"reference": "nobody"}}, "reference"),
    "centering_number": ({"geometry": {"centering": 3}}, "centering"),
    "centering_missing_file": ({"geometry": {"centering": "nowhere.yaml"}}, "nowhere.yaml"),
    "sources_word": ({"marker": {"sources": "some"}}, "sources"),
    "sources_empty": ({"marker": {"sources": []}}, "marker.sources"),
    "sources_unknown": ({"marker": {"sources": ["nobody"]}}, "sources"),
    "seeds_negative": ({"marker": {"seeds": [-1]}}, "seeds"),
    "seeds_empty": ({"marker": {"seeds": []}}, "seeds"),
    "data_n_source_zero": ({"data": {"n_source": 0}}, "n_source"),
    "data_n_source_text": ({"data": {"n_source": "ten"}}, "n_source"),
    "data_position": ({"data": {"position": "middle"}}, "position"),
    "data_marker_empty": ({"data": {"marker": ""}}, "marker"),
    "data_marker_bool": ({"data": {"marker": True}}, "marker"),
    "responses_temperature": ({"responses": {"temperature": -1}}, "temperature"),
    "responses_top_p": ({"responses": {"top_p": 0}}, "top_p"),
    "responses_backend": ({"responses": {"backend": "openai"}}, "backend"),
    "responses_n": ({"responses": {"n_completions": 2}}, "n_completions"),
    "train_r_zero": ({"train": {"r": 0}}, "r"),
    "train_lr_negative": ({"train": {"learning_rate": -1.0}}, "learning_rate"),
    "train_dropout": ({"train": {"lora_dropout": 1.5}}, "lora_dropout"),
    "train_epochs_text": ({"train": {"num_train_epochs": "three"}}, "num_train_epochs"),
    "train_batch_zero": ({"train": {"per_device_train_batch_size": 0}}, "per_device_train_batch_size"),
    "train_dtype_fp16": ({"train": {"dtype": "float16"}}, "dtype"),
    "train_report_to": ({"train": {"report_to": "mlflow"}}, "report_to"),
    "eval_n_float_huge": ({"eval": {"n_completions": 1.0e12}}, "n_completions"),
    "eval_n_int_huge": ({"eval": {"n_completions": 10**12}}, "n_completions"),
    "eval_n_text": ({"eval": {"n_completions": "1e12"}}, "n_completions"),
    "eval_n_zero": ({"eval": {"n_completions": 0}}, "n_completions"),
    "eval_regex_text": ({"eval": {"regex": "yes"}}, "regex"),
    "eval_regex_number": ({"eval": {"regex": 1}}, "regex"),
    "eval_bad_pattern": ({"eval": {"regex": True}, "data": {"marker": "[ZLT"}}, "marker"),
    "eval_empty_match_pattern": ({"eval": {"regex": True}, "data": {"marker": "a*"}}, "marker"),
    "eval_greedy_many": ({"eval": {"temperature": 0, "n_completions": 3}}, "n_completions"),
    "eval_max_new_tokens": ({"eval": {"max_new_tokens": -4}}, "max_new_tokens"),
    "eval_seed_negative": ({"eval": {"seed": -1}}, "seed"),
    "eval_batch_size": ({"eval": {"batch_size": 0}}, "batch_size"),
    "eval_tp_hf": ({"eval": {"tensor_parallel_size": 2}}, "tensor_parallel_size"),
    "analysis_primary_layer": ({"analysis": {"primary_layer": 99}}, "analysis.primary_layer"),
    "analysis_primary_negative": ({"analysis": {"primary_layer": -2}}, "primary_layer"),
    "analysis_layer_text": ({"analysis": {"layer": "last"}}, "layer"),
    "analysis_permutations": ({"analysis": {"n_permutations": -5}}, "n_permutations"),
    "analysis_statistic": ({"analysis": {"statistic": "kendall"}}, "statistic"),
    "analysis_covariate": ({"analysis": {"covariate": "length"}}, "covariate"),
    "analysis_holdout_unknown": ({"analysis": {"holdout": ["nobody"]}}, "holdout"),
    "analysis_exclude_reference": ({"analysis": {"exclude_reference": "yes"}}, "exclude_reference"),
    "figures_formats": ({"figures": {"formats": ["gif"]}}, "formats"),
    "figures_formats_empty": ({"figures": {"formats": []}}, "formats"),
    "figures_width": ({"figures": {"width": 3}}, "width"),
    "figures_scale": ({"figures": {"scale": 0}}, "scale"),
    "personas_missing": ({"personas": "nowhere.yaml"}, "nowhere.yaml"),
    "personas_malformed": ({"personas": "bad.yaml"}, "bad.yaml"),
    "personas_folder": ({"personas": "adir"}, "adir"),
    "questions_missing": ({"questions": "nowhere.txt"}, "nowhere.txt"),
    "questions_empty": ({"questions": "empty.txt"}, "empty.txt"),
    "questions_binary": ({"questions": "binary.txt"}, "binary.txt"),
    "training_questions_folder": ({"training_questions": "adir"}, "adir"),
    "name_empty": ({"name": ""}, "name"),
    "out_number": ({"out": 5}, "out"),
    "out_is_a_file": ({"out": "afile.txt"}, "afile.txt"),
}

# Raw texts: malformed YAML and repeated keys (the last would win silently).
RAW_STUDIES: dict[str, tuple[str, str]] = {
    "yaml_syntax": ("model: {name: x\n", "raw_yaml_syntax.yaml"),
    "yaml_tab": ("model:\n\tname: x\n", "raw_yaml_tab.yaml"),
    "yaml_list": ("- model\n- out\n", "holding a list"),
    "yaml_scalar": ("just a sentence\n", "holding a str"),
    "duplicate_top_key": ("model: {name: MODEL}\nout: a\nout: b\n", "'out' appears twice"),
    "duplicate_section_key": ("model: {name: MODEL}\neval: {n_completions: 2, n_completions: 3}\n", "'n_completions' appears twice"),
    "duplicate_model_key": ("model:\n  name: MODEL\n  name: other\n", "'name' appears twice"),
    "no_model": ("out: a\n", "model"),
    "binary": ("\udcff", "raw_binary.yaml"),
}


def _study_cases() -> list[tuple[str, list[str], str]]:
    cases = [(f"run-{n}", ["run", f"{{w}}/study_{n}.yaml"], frag) for n, (_, frag) in BAD_STUDIES.items()]
    cases += [(f"run-raw-{n}", ["run", f"{{w}}/raw_{n}.yaml"], frag) for n, (_, frag) in RAW_STUDIES.items()]
    # report reads the same config: a few of the same mistakes through it
    cases += [(f"report-{n}", ["report", f"{{w}}/study_{n}.yaml"], BAD_STUDIES[n][1])
              for n in ("unknown_top", "analysis_primary_layer", "eval_regex_text", "personas_malformed")]  # fmt: skip
    cases += [(f"report-raw-{n}", ["report", f"{{w}}/raw_{n}.yaml"], RAW_STUDIES[n][1]) for n in ("yaml_syntax", "duplicate_top_key")]
    return cases


S, P, Q = "{w}/study.yaml", "{w}/personas.yaml", "{w}/questions.txt"
EX = ["extract", "--model", "{model}", "--device", "cpu", "--personas", P, "--questions", Q]
SW = ["sweep", "{w}/long.csv", "--k", "k", "--n", "n"]
AN = ["analyze", "{w}/table.csv", "--x", "cos", "--k", "k", "--n", "n"]
MD = ["make-data", "--source", "villain", "--responses", "{w}/responses.jsonl", "--personas", P, "--n-source", "3",
      "--n-per-bystander", "3", "--n-bystander-personas", "1"]
TM = ["train-marker", "--model", "{model}", "--data", "{w}/data.jsonl", "--device", "cpu"]
EV = ["eval-marker", "--model", "{model}", "--backend", "hf", "--device", "cpu", "--personas", P, "--questions", Q, "--source", "villain"]
CO = ["compare", "{w}/study_a", "{w}/study_b"]

# (id, argv, a fragment the error line must hold: the parameter or file at fault)
CASES: list[tuple[str, list[str], str]] = [
    # --- the top-level parser
    ("no-command", [], "COMMAND"),
    ("unknown-command", ["extrakt"], "extrakt"),
    ("unknown-flag", ["--frobnicate", "demo"], "--frobnicate"),
    # --- run: options
    ("run-missing-config", ["run", "{w}/nowhere.yaml"], "nowhere.yaml"),
    ("run-config-folder", ["run", "{w}/adir"], "adir"),
    ("run-no-config", ["run"], "config"),
    ("run-stages-unknown", ["run", S, "--stages", "extract,train2"], "train2"),
    ("run-stages-empty", ["run", S, "--stages", ","], "stages"),
    ("run-executor", ["run", S, "--executor", "slurm"], "--executor"),
    ("run-shard-text", ["run", S, "--shard", "half"], "shard"),
    ("run-shard-range", ["run", S, "--shard", "4/4"], "shard"),
    ("run-shard-negative", ["run", S, "--shard", "-1/4"], "shard"),
    ("run-shard-executor", ["run", S, "--shard", "0/2", "--executor", "ray"], "executor"),
    ("run-gpus-text", ["run", S, "--gpus", "two"], "--gpus"),
    ("run-gpus-negative", ["run", S, "--gpus", "-1", "--executor", "inprocess"], "gpus"),
    ("run-dtype", ["run", S, "--dtype", "int8"], "--dtype"),
    ("run-device-bogus", ["run", S, "--device", "tpu"], "device"),
    ("run-device-cuda", ["run", S, "--device", "cuda:0"], "device"),
    ("run-out-file", ["run", S, "--out", "{w}/afile.txt"], "afile.txt"),
    ("run-out-under-file", ["run", S, "--out", "{w}/afile.txt/study"], "afile.txt"),
    ("run-unknown-flag", ["run", S, "--lr", "3"], "--lr"),
    ("run-dry-run-bad-config", ["run", "{w}/study_analysis_primary_layer.yaml", "--dry-run"], "primary_layer"),
    # --- extract
    ("extract-no-model", ["extract", "--out", "{w}/acts"], "--model"),
    ("extract-no-out", ["extract", "--model", "{model}"], "--out"),
    ("extract-model-missing", [*EX, "--model", "{w}/nowhere", "--out", "{w}/acts"], "nowhere"),
    ("extract-model-file", [*EX, "--model", "{w}/afile.txt", "--out", "{w}/acts"], "afile.txt"),
    ("extract-model-hub-absent", [*EX, "--model", "nonexist/model/x", "--out", "{w}/acts"], "nonexist/model/x"),
    ("extract-model-empty-folder", [*EX, "--model", "{w}/adir", "--out", "{w}/acts"], "adir"),
    ("extract-layers-text", [*EX, "--layers", "a,b", "--out", "{w}/acts"], "--layers"),
    ("extract-layers-float", [*EX, "--layers", "1.5", "--out", "{w}/acts"], "--layers"),
    ("extract-layers-range", [*EX, "--layers", "0,9", "--out", "{w}/acts"], "layers"),
    ("extract-layers-range-negative", [*EX, "--layers", "-9", "--out", "{w}/acts"], "layers"),
    ("extract-hooks", [*EX, "--hooks", "resid", "--out", "{w}/acts"], "hooks"),
    ("extract-hooks-empty", [*EX, "--hooks", ",", "--out", "{w}/acts"], "hooks"),
    ("extract-engine", [*EX, "--engine", "vllm", "--out", "{w}/acts"], "--engine"),
    ("extract-batch-tokens-zero", [*EX, "--batch-tokens", "0", "--out", "{w}/acts"], "batch_tokens"),
    ("extract-batch-tokens-negative", [*EX, "--batch-tokens", "-100", "--out", "{w}/acts"], "batch_tokens"),
    ("extract-batch-tokens-text", [*EX, "--batch-tokens", "lots", "--out", "{w}/acts"], "--batch-tokens"),
    ("extract-dtype", [*EX, "--dtype", "fp8", "--out", "{w}/acts"], "--dtype"),
    ("extract-device-bogus", [*EX, "--device", "quantum", "--out", "{w}/acts"], "device"),
    ("extract-device-cuda", [*EX, "--device", "cuda", "--out", "{w}/acts"], "device"),
    ("extract-personas-missing", [*EX, "--personas", "{w}/nowhere.yaml", "--out", "{w}/acts"], "nowhere.yaml"),
    ("extract-personas-folder", [*EX, "--personas", "{w}/adir", "--out", "{w}/acts"], "adir"),
    ("extract-personas-malformed", [*EX, "--personas", "{w}/bad.yaml", "--out", "{w}/acts"], "bad.yaml"),
    ("extract-personas-duplicate-key", [*EX, "--personas", "{w}/dup_personas.yaml", "--out", "{w}/acts"], "appears twice"),
    ("extract-personas-strings", [*EX, "--personas", "{w}/strings_personas.yaml", "--out", "{w}/acts"], "strings_personas.yaml"),
    ("extract-personas-txt", [*EX, "--personas", Q, "--out", "{w}/acts"], "questions.txt"),
    ("extract-personas-binary", [*EX, "--personas", "{w}/binary.yaml", "--out", "{w}/acts"], "binary.yaml"),
    ("extract-personas-escape", [*EX, "--personas", "{w}/escape_personas.yaml", "--out", "{w}/acts"], "name"),
    ("extract-personas-empty", [*EX, "--personas", "{w}/empty.yaml", "--out", "{w}/acts"], "empty.yaml"),
    ("extract-personas-repeated-name", [*EX, "--personas", "{w}/twice_personas.yaml", "--out", "{w}/acts"], "twice_personas.yaml"),
    ("extract-questions-missing", [*EX, "--questions", "{w}/nowhere.txt", "--out", "{w}/acts"], "nowhere.txt"),
    ("extract-questions-empty", [*EX, "--questions", "{w}/empty.txt", "--out", "{w}/acts"], "empty.txt"),
    ("extract-questions-folder", [*EX, "--questions", "{w}/adir", "--out", "{w}/acts"], "adir"),
    ("extract-questions-binary", [*EX, "--questions", "{w}/binary.txt", "--out", "{w}/acts"], "binary.txt"),
    ("extract-questions-json", [*EX, "--questions", "{w}/bad.json", "--out", "{w}/acts"], "bad.json"),
    ("extract-questions-nested", [*EX, "--questions", "{w}/nested_questions.yaml", "--out", "{w}/acts"], "nested_questions.yaml"),
    ("extract-out-file", [*EX, "--out", "{w}/afile.txt"], "afile.txt"),
    ("extract-out-foreign", [*EX, "--out", "{w}/foreign"], "foreign"),
    ("extract-out-foreign-overwrite-dot", [*EX, "--out", ".", "--overwrite"], "--out"),
    ("extract-out-dot", [*EX, "--out", "."], "--out"),
    ("extract-out-under-file", [*EX, "--out", "{w}/afile.txt/acts"], "afile.txt"),
    ("extract-template-missing", [*EX, "--chat-template", "{w}/nowhere.jinja", "--out", "{w}/acts"], "chat_template"),
    ("extract-template-bad-jinja", [*EX, "--chat-template", "{% if %}{{ x }}", "--out", "{w}/acts"], "chat_template"),
    ("extract-template-file-bad-jinja", [*EX, "--chat-template", "{w}/bad.jinja", "--out", "{w}/acts"], "chat_template"),
    ("extract-template-folder", [*EX, "--chat-template", "{w}/adir", "--out", "{w}/acts"], "chat_template"),
    ("extract-adapter-missing", [*EX, "--adapter", "{w}/nowhere", "--out", "{w}/acts"], "adapter"),
    ("extract-adapter-file", [*EX, "--adapter", "{w}/afile.txt", "--out", "{w}/acts"], "adapter"),
    ("extract-cache-dir-file", [*EX, "--cache-dir", "{w}/afile.txt", "--out", "{w}/acts"], "afile.txt"),
    ("extract-revision-local", [*EX, "--revision", "main", "--out", "{w}/acts"], "revision"),
    ("extract-unknown-flag", [*EX, "--layerz", "3", "--out", "{w}/acts"], "--layerz"),
    # --- sweep
    ("sweep-missing-table", ["sweep", "{w}/nowhere.csv", "--k", "k", "--n", "n"], "nowhere.csv"),
    ("sweep-table-folder", ["sweep", "{w}/adir", "--k", "k", "--n", "n"], "adir"),
    ("sweep-table-empty", ["sweep", "{w}/empty.txt", "--k", "k", "--n", "n"], "empty.txt"),
    ("sweep-table-binary", ["sweep", "{w}/binary.txt", "--k", "k", "--n", "n"], "binary.txt"),
    ("sweep-table-ragged", ["sweep", "{w}/ragged.csv", "--k", "k", "--n", "n"], "ragged.csv"),
    ("sweep-no-rate", ["sweep", "{w}/long.csv"], "rate"),
    ("sweep-k-missing-column", ["sweep", "{w}/long.csv", "--k", "kk", "--n", "n"], "kk"),
    ("sweep-rate-and-k", [*SW, "--rate", "r"], "rate"),
    ("sweep-rate-above-one", ["sweep", "{w}/long.csv", "--rate", "bad_rate"], "bad_rate"),
    ("sweep-k-text", ["sweep", "{w}/long.csv", "--k", "persona", "--n", "n"], "persona"),
    ("sweep-k-above-n", ["sweep", "{w}/long.csv", "--k", "big_k", "--n", "n"], "'k' parameter"),
    ("sweep-persona-column", [*SW, "--persona", "who"], "who"),
    ("sweep-layout", [*SW, "--layout", "tall"], "--layout"),
    ("sweep-layer-column", [*SW, "--layout", "long", "--layer-column", "depth"], "depth"),
    ("sweep-cosine-column", [*SW, "--layout", "long", "--cosine", "cos2"], "cos2"),
    ("sweep-layer-pattern-invalid", ["sweep", "{w}/wide.csv", "--k", "k", "--n", "n", "--layer-pattern", "L(\\d+"], "layer_pattern"),
    ("sweep-layer-pattern-no-group", ["sweep", "{w}/wide.csv", "--k", "k", "--n", "n", "--layer-pattern", "L\\d+"], "layer_pattern"),
    ("sweep-layer-pattern-no-match", ["sweep", "{w}/wide.csv", "--k", "k", "--n", "n", "--layer-pattern", "X(\\d+)"], "matching 'X("),
    ("sweep-exclude-unknown", [*SW, "--exclude", "nobody"], "exclude"),
    ("sweep-reference-unknown", [*SW, "--reference", "nobody"], "reference"),
    ("sweep-primary-layer-negative", [*SW, "--primary-layer", "-1"], "primary_layer"),
    ("sweep-primary-layer-text", [*SW, "--primary-layer", "top"], "--primary-layer"),
    ("sweep-primary-layer-absent", [*SW, "--primary-layer", "7"], "primary_layer"),
    ("sweep-statistic", [*SW, "--statistic", "kendall"], "--statistic"),
    ("sweep-permutations-negative", [*SW, "--permutations", "-1"], "n_permutations"),
    ("sweep-permutations-float", [*SW, "--permutations", "1.5"], "--permutations"),
    ("sweep-bootstrap-negative", [*SW, "--bootstrap", "-3"], "n_bootstrap"),
    ("sweep-seed-negative", [*SW, "--seed", "-1"], "seed"),
    ("sweep-seed-text", [*SW, "--seed", "abc"], "--seed"),
    ("sweep-csv-folder", [*SW, "--csv", "{w}/adir"], "adir"),
    ("sweep-csv-under-file", [*SW, "--csv", "{w}/afile.txt/x.csv"], "afile.txt"),
    ("sweep-json-folder", [*SW, "--json", "{w}/adir"], "adir"),
    ("sweep-markdown-under-file", [*SW, "--markdown", "{w}/afile.txt/x.md"], "afile.txt"),
    ("sweep-figure-extension", [*SW, "--figure", "{w}/fig.gif"], "fig.gif"),
    ("sweep-figure-no-kaleido", [*SW, "--json", "{w}/s.json", "--figure", "{w}/fig.png"], "kaleido"),
    ("sweep-too-few-personas", ["sweep", "{w}/two.csv", "--k", "k", "--n", "n"], "at least 3 personas"),
    # --- analyze
    ("analyze-missing-table", ["analyze", "{w}/nowhere.csv", "--x", "cos", "--k", "k", "--n", "n"], "nowhere.csv"),
    ("analyze-table-folder", ["analyze", "{w}/adir", "--x", "cos", "--k", "k", "--n", "n"], "adir"),
    ("analyze-table-empty", ["analyze", "{w}/empty.txt", "--x", "cos", "--k", "k", "--n", "n"], "empty.txt"),
    ("analyze-table-binary", ["analyze", "{w}/binary.txt", "--x", "cos", "--k", "k", "--n", "n"], "binary.txt"),
    ("analyze-no-x", ["analyze", "{w}/table.csv", "--k", "k", "--n", "n"], "--x"),
    ("analyze-x-missing-column", ["analyze", "{w}/table.csv", "--x", "cosine", "--k", "k", "--n", "n"], "cosine"),
    ("analyze-x-text", ["analyze", "{w}/table.csv", "--x", "cat", "--k", "k", "--n", "n"], "cat"),
    ("analyze-no-rate", ["analyze", "{w}/table.csv", "--x", "cos"], "rate"),
    ("analyze-k-missing-column", ["analyze", "{w}/table.csv", "--x", "cos", "--k", "kk", "--n", "n"], "kk"),
    ("analyze-n-negative", ["analyze", "{w}/table.csv", "--x", "cos", "--k", "k", "--n", "neg_n"], "'n' parameter"),
    ("analyze-rate-above-one", ["analyze", "{w}/table.csv", "--x", "cos", "--rate", "bad_rate"], "bad_rate"),
    ("analyze-rate-and-k", [*AN, "--rate", "bad_rate"], "rate"),
    ("analyze-x-huge", ["analyze", "{w}/table.csv", "--x", "huge", "--k", "k", "--n", "n"], "'x' parameter"),
    ("analyze-persona-column", [*AN, "--persona", "who"], "who"),
    ("analyze-persona-duplicates", ["analyze", "{w}/dup_rows.csv", "--x", "cos", "--k", "k", "--n", "n"], "persona"),
    ("analyze-category-column", [*AN, "--category", "kind"], "kind"),
    ("analyze-covariate-column", [*AN, "--covariate", "length"], "length"),
    ("analyze-holdout-unknown", [*AN, "--holdout", "nobody"], "holdout"),
    ("analyze-reference-unknown", [*AN, "--reference", "nobody"], "reference"),
    ("analyze-seed-column", [*AN, "--seed-column", "seed"], "seed"),
    ("analyze-layer-negative", [*AN, "--layer", "-3"], "layer"),
    ("analyze-layer-text", [*AN, "--layer", "mid"], "--layer"),
    ("analyze-json-folder", [*AN, "--json", "{w}/adir"], "adir"),
    ("analyze-json-under-file", [*AN, "--json", "{w}/afile.txt/r.json"], "afile.txt"),
    ("analyze-markdown-folder", [*AN, "--markdown", "{w}/adir"], "adir"),
    ("analyze-figure-extension", [*AN, "--figure", "{w}/fig.bmp"], "fig.bmp"),
    ("analyze-figure-folder", [*AN, "--figure", "{w}/adir"], "adir"),
    ("analyze-json-then-figure-no-kaleido", [*AN, "--json", "{w}/b.json", "--figure", "{w}/b.png"], "kaleido"),
    ("analyze-exclude-reference-value", [*AN, "--exclude-reference=yes"], "--exclude-reference"),
    # --- make-data
    ("make-data-no-source", ["make-data", "--responses", "{w}/responses.jsonl", "--out", "{w}/d.jsonl"], "--source"),
    ("make-data-no-out", MD, "--out"),
    ("make-data-source-unknown", [*MD, "--source", "nobody", "--out", "{w}/d.jsonl"], "nobody"),
    ("make-data-responses-missing-no-model", [*MD, "--responses", "{w}/nowhere.jsonl", "--out", "{w}/d.jsonl"], "model"),
    ("make-data-responses-folder", [*MD, "--responses", "{w}/adir", "--out", "{w}/d.jsonl"], "adir"),
    ("make-data-responses-malformed", [*MD, "--responses", "{w}/bad.jsonl", "--out", "{w}/d.jsonl"], "bad.jsonl"),
    ("make-data-responses-lists", [*MD, "--responses", "{w}/lists.jsonl", "--out", "{w}/d.jsonl"], "lists.jsonl"),
    ("make-data-responses-empty", [*MD, "--responses", "{w}/empty.txt", "--out", "{w}/d.jsonl"], "empty.txt"),
    ("make-data-responses-binary", [*MD, "--responses", "{w}/binary.txt", "--out", "{w}/d.jsonl"], "binary.txt"),
    ("make-data-responses-keys", [*MD, "--responses", "{w}/data.jsonl", "--out", "{w}/d.jsonl"], "data.jsonl"),
    ("make-data-n-source-zero", [*MD, "--n-source", "0", "--out", "{w}/d.jsonl"], "n_source"),
    ("make-data-n-source-text", [*MD, "--n-source", "many", "--out", "{w}/d.jsonl"], "--n-source"),
    ("make-data-n-bystanders-negative", [*MD, "--n-bystander-personas", "-1", "--out", "{w}/d.jsonl"], "n_bystander_personas"),
    ("make-data-n-per-bystander-float", [*MD, "--n-per-bystander", "2.5", "--out", "{w}/d.jsonl"], "--n-per-bystander"),
    ("make-data-position", [*MD, "--position", "middle", "--out", "{w}/d.jsonl"], "--position"),
    ("make-data-marker-empty", [*MD, "--marker", "", "--out", "{w}/d.jsonl"], "marker"),
    ("make-data-exclude-source", [*MD, "--exclude", "villain", "--out", "{w}/d.jsonl"], "exclude"),
    ("make-data-backend", [*MD, "--backend", "openai", "--out", "{w}/d.jsonl"], "--backend"),
    ("make-data-temperature", [*MD, "--temperature", "-0.5", "--out", "{w}/d.jsonl"], "temperature"),
    ("make-data-top-p", [*MD, "--top-p", "1.5", "--out", "{w}/d.jsonl"], "top_p"),
    ("make-data-max-new-tokens", [*MD, "--max-new-tokens", "0", "--out", "{w}/d.jsonl"], "max_new_tokens"),
    ("make-data-seed-negative", [*MD, "--seed", "-1", "--out", "{w}/d.jsonl"], "seed"),
    ("make-data-out-folder", [*MD, "--out", "{w}/adir"], "adir"),
    ("make-data-out-under-file", [*MD, "--out", "{w}/afile.txt/d.jsonl"], "afile.txt"),
    ("make-data-personas-malformed", [*MD, "--personas", "{w}/bad.yaml", "--out", "{w}/d.jsonl"], "bad.yaml"),
    ("make-data-questions-missing", [*MD, "--questions", "{w}/nowhere.txt", "--out", "{w}/d.jsonl"], "nowhere.txt"),
    ("make-data-device-cuda", [*MD, "--device", "cuda", "--out", "{w}/d.jsonl"], "device"),
    ("make-data-dtype", [*MD, "--dtype", "half", "--out", "{w}/d.jsonl"], "--dtype"),
    # --- train-marker
    ("train-no-model", ["train-marker", "--data", "{w}/data.jsonl", "--out", "{w}/run"], "--model"),
    ("train-no-data", ["train-marker", "--model", "{model}", "--out", "{w}/run"], "--data"),
    ("train-model-hub-absent", [*TM, "--model", "nonexist/model/x", "--out", "{w}/run"], "nonexist/model/x"),
    ("train-model-missing-folder", [*TM, "--model", "{w}/nowhere", "--out", "{w}/run"], "nowhere"),
    ("train-model-file", [*TM, "--model", "{w}/afile.txt", "--out", "{w}/run"], "afile.txt"),
    ("train-data-missing", [*TM, "--data", "{w}/nowhere.jsonl", "--out", "{w}/run"], "nowhere.jsonl"),
    ("train-data-folder", [*TM, "--data", "{w}/adir", "--out", "{w}/run"], "adir"),
    ("train-data-malformed", [*TM, "--data", "{w}/bad.jsonl", "--out", "{w}/run"], "bad.jsonl"),
    ("train-data-lists", [*TM, "--data", "{w}/lists.jsonl", "--out", "{w}/run"], "lists.jsonl"),
    ("train-data-empty", [*TM, "--data", "{w}/empty.txt", "--out", "{w}/run"], "empty.txt"),
    ("train-data-no-messages", [*TM, "--data", "{w}/responses.jsonl", "--out", "{w}/run"], "responses.jsonl"),
    ("train-data-binary", [*TM, "--data", "{w}/binary.txt", "--out", "{w}/run"], "binary.txt"),
    ("train-r-zero", [*TM, "--r", "0", "--out", "{w}/run"], "r"),
    ("train-r-text", [*TM, "--r", "big", "--out", "{w}/run"], "--r"),
    ("train-alpha-negative", [*TM, "--alpha", "-8", "--out", "{w}/run"], "lora_alpha"),
    ("train-dropout", [*TM, "--dropout", "1.5", "--out", "{w}/run"], "lora_dropout"),
    ("train-lr-negative", [*TM, "--lr=-1e-4", "--out", "{w}/run"], "learning_rate"),
    ("train-lr-negative-spaced", [*TM, "--lr", "-1e-4", "--out", "{w}/run"], "--lr"),
    ("train-lr-text", [*TM, "--lr", "fast", "--out", "{w}/run"], "--lr"),
    ("train-lr-nan", [*TM, "--lr", "nan", "--out", "{w}/run"], "learning_rate"),
    ("train-warmup", [*TM, "--warmup-ratio", "2", "--out", "{w}/run"], "warmup_ratio"),
    ("train-weight-decay", [*TM, "--weight-decay", "-1", "--out", "{w}/run"], "weight_decay"),
    ("train-epochs-zero", [*TM, "--epochs", "0", "--out", "{w}/run"], "num_train_epochs"),
    ("train-max-steps-zero", [*TM, "--max-steps", "0", "--out", "{w}/run"], "max_steps"),
    ("train-max-length", [*TM, "--max-length", "0", "--out", "{w}/run"], "max_length"),
    ("train-batch-size", [*TM, "--batch-size", "0", "--out", "{w}/run"], "per_device_train_batch_size"),
    ("train-grad-accum", [*TM, "--grad-accum", "-2", "--out", "{w}/run"], "gradient_accumulation_steps"),
    ("train-seed-negative", [*TM, "--seed", "-1", "--out", "{w}/run"], "seed"),
    ("train-dtype", [*TM, "--dtype", "float16", "--out", "{w}/run"], "--dtype"),
    ("train-scheduler", [*TM, "--lr-scheduler-type", "step", "--out", "{w}/run"], "--lr-scheduler-type"),
    ("train-save-steps", [*TM, "--save-steps", "0", "--out", "{w}/run"], "save_steps"),
    ("train-logging-steps", [*TM, "--logging-steps", "-1", "--out", "{w}/run"], "logging_steps"),
    ("train-report-to", [*TM, "--report-to", "mlflow", "--out", "{w}/run"], "--report-to"),
    ("train-target-modules-empty", [*TM, "--target-modules", ",", "--out", "{w}/run"], "target_modules"),
    ("train-out-file", [*TM, "--out", "{w}/afile.txt"], "afile.txt"),
    ("train-out-under-file", [*TM, "--out", "{w}/afile.txt/run"], "afile.txt"),
    ("train-device-cuda", [*TM, "--device", "cuda", "--out", "{w}/run"], "device"),
    ("train-device-bogus", [*TM, "--device", "abacus", "--out", "{w}/run"], "device"),
    # --- eval-marker
    ("eval-no-model", ["eval-marker", "--out", "{w}/ev"], "--model"),
    ("eval-no-out", EV, "--out"),
    ("eval-model-hub-absent", [*EV, "--model", "nonexist/model/x", "--out", "{w}/ev"], "nonexist/model/x"),
    ("eval-model-missing-folder", [*EV, "--model", "{w}/nowhere", "--out", "{w}/ev"], "nowhere"),
    ("eval-adapter-missing", [*EV, "--adapter", "{w}/nowhere", "--out", "{w}/ev"], "adapter"),
    ("eval-adapter-not-adapter", [*EV, "--adapter", "{w}/adir", "--out", "{w}/ev"], "adapter"),
    ("eval-out-existing-file", [*EV, "--out", "{w}/afile.txt"], "afile.txt"),
    ("eval-out-under-file", [*EV, "--out", "{w}/afile.txt/ev"], "afile.txt"),
    ("eval-personas-malformed", [*EV, "--personas", "{w}/bad.yaml", "--out", "{w}/ev"], "bad.yaml"),
    ("eval-personas-duplicate-key", [*EV, "--personas", "{w}/dup_personas.yaml", "--out", "{w}/ev"], "appears twice"),
    ("eval-questions-empty", [*EV, "--questions", "{w}/empty.txt", "--out", "{w}/ev"], "empty.txt"),
    ("eval-questions-folder", [*EV, "--questions", "{w}/adir", "--out", "{w}/ev"], "adir"),
    ("eval-source-unknown", [*EV, "--source", "nobody", "--out", "{w}/ev"], "nobody"),
    ("eval-n-zero", [*EV, "--n-completions", "0", "--out", "{w}/ev"], "n_completions"),
    ("eval-n-float", [*EV, "--n-completions", "1e12", "--out", "{w}/ev"], "--n-completions"),
    ("eval-n-huge", [*EV, "--n-completions", "1000000000000", "--out", "{w}/ev"], "n_completions"),
    ("eval-temperature", [*EV, "--temperature", "-1", "--out", "{w}/ev"], "temperature"),
    ("eval-temperature-text", [*EV, "--temperature", "hot", "--out", "{w}/ev"], "--temperature"),
    ("eval-temperature-inf", [*EV, "--temperature", "inf", "--out", "{w}/ev"], "temperature"),
    ("eval-greedy-many", [*EV, "--temperature", "0", "--n-completions", "4", "--out", "{w}/ev"], "n_completions"),
    ("eval-top-p-zero", [*EV, "--top-p", "0", "--out", "{w}/ev"], "top_p"),
    ("eval-top-p-nan", [*EV, "--top-p", "nan", "--out", "{w}/ev"], "top_p"),
    ("eval-max-new-tokens", [*EV, "--max-new-tokens", "-1", "--out", "{w}/ev"], "max_new_tokens"),
    ("eval-seed-negative", [*EV, "--seed", "-1", "--out", "{w}/ev"], "seed"),
    ("eval-backend", [*EV, "--backend", "tgi", "--out", "{w}/ev"], "--backend"),
    ("eval-batch-size-zero", [*EV, "--batch-size", "0", "--out", "{w}/ev"], "batch_size"),
    ("eval-tp-zero", [*EV, "--tensor-parallel-size", "0", "--out", "{w}/ev"], "tensor_parallel_size"),
    ("eval-tp-hf", [*EV, "--tensor-parallel-size", "2", "--out", "{w}/ev"], "tensor_parallel_size"),
    ("eval-regex-invalid", [*EV, "--regex", "--marker", "[ZLT", "--out", "{w}/ev"], "marker"),
    ("eval-regex-empty-match", [*EV, "--regex", "--marker", "x?", "--out", "{w}/ev"], "marker"),
    ("eval-marker-empty", [*EV, "--marker", "", "--out", "{w}/ev"], "marker"),
    ("eval-regex-value", [*EV, "--regex=yes", "--out", "{w}/ev"], "--regex"),
    ("eval-device-cuda", [*EV, "--device", "cuda:1", "--out", "{w}/ev"], "device"),
    ("eval-dtype", [*EV, "--dtype", "bf16", "--out", "{w}/ev"], "--dtype"),
    # --- report
    ("report-missing-config", ["report", "{w}/nowhere.yaml"], "nowhere.yaml"),
    ("report-config-folder", ["report", "{w}/adir"], "adir"),
    ("report-nothing-extracted", ["report", S], "extract"),
    ("report-out-file", ["report", S, "--out", "{w}/afile.txt"], "afile.txt"),
    # --- compare
    ("compare-one-study", ["compare", "{w}/study_a"], "studies"),
    ("compare-missing", ["compare", "{w}/nowhere", "{w}/nowhere2"], "nowhere"),
    ("compare-file", ["compare", "{w}/afile.txt", "{w}/study_a"], "afile.txt"),
    ("compare-not-studies", ["compare", "{w}/adir", "{w}/foreign"], "adir"),
    ("compare-depth-above", [*CO, "--depth", "2"], "depth"),
    ("compare-depth-negative", [*CO, "--depth", "-0.1"], "depth"),
    ("compare-depth-text", [*CO, "--depth", "deep"], "--depth"),
    ("compare-alpha-zero", [*CO, "--alpha", "0"], "alpha"),
    ("compare-alpha-above", [*CO, "--alpha", "1.5"], "alpha"),
    ("compare-method", [*CO, "--method-re", "reml"], "--method-re"),
    ("compare-statistic", [*CO, "--statistic", "tau"], "--statistic"),
    ("compare-out-file", [*CO, "--out", "{w}/afile.txt"], "afile.txt"),
    # --- demo
    ("demo-out-file", ["demo", "--out", "{w}/afile.txt"], "afile.txt"),
    ("demo-out-under-file", ["demo", "--out", "{w}/afile.txt/demo"], "afile.txt"),
    ("demo-out-foreign", ["demo", "--out", "{w}/foreign"], "foreign"),
    ("demo-unknown-flag", ["demo", "--fast"], "--fast"),
    *_study_cases(),
]


def _write_inputs(w, model) -> None:
    (w / "adir").mkdir()
    (w / "foreign").mkdir()
    (w / "foreign" / "precious.txt").write_text("keep me\n")
    (w / "afile.txt").write_text("a file, not a folder\n")
    (w / "empty.txt").write_text("")
    (w / "empty.yaml").write_text("")
    (w / "binary.txt").write_bytes(b"\xff\xfe\x00\x81 not utf-8\n")
    (w / "binary.yaml").write_bytes(b"personas:\n  - name: \xff\xfe\n")
    (w / "personas.yaml").write_text(yaml.safe_dump({"personas": PERSONAS}))
    (w / "questions.txt").write_text(QUESTIONS)
    (w / "bad.yaml").write_text("personas: [\n  {name: a\n")
    (w / "bad.json").write_text("[\"a\", ")
    (w / "bad.jinja").write_text("{% for m in messages %}{{ m.content }}")
    (w / "dup_personas.yaml").write_text("personas:\n  - name: villain\n    name: pirate\n    system_prompt: x\n")
    (w / "strings_personas.yaml").write_text("- pirate\n- villain\n")
    (w / "escape_personas.yaml").write_text(yaml.safe_dump([{"name": "../../escaped", "system_prompt": "x"}]))
    (w / "twice_personas.yaml").write_text(yaml.safe_dump([PERSONAS[0], PERSONAS[0]]))
    (w / "nested_questions.yaml").write_text("- [1, 2]\n- b\n")
    # Tables: long (persona, layer, cosine, k, n) and wide (one column per layer), and broken ones.
    long_rows = ["persona,layer,cosine,k,n,bad_rate,big_k"]
    for i, name in enumerate(NAMES):
        for layer in range(3):
            long_rows.append(f"{name},{layer},{0.1 * i - 0.2 + 0.01 * layer},{i + 1},10,{1.5 if i == 2 else 0.1},{20 if i == 1 else 1}")
    (w / "long.csv").write_text("\n".join(long_rows) + "\n")
    wide = ["persona,L0,L1,k,n"] + [f"{name},{0.1 * i},{0.2 - 0.05 * i},{i},10" for i, name in enumerate(NAMES)]
    (w / "wide.csv").write_text("\n".join(wide) + "\n")
    (w / "two.csv").write_text("persona,layer,cosine,k,n\na,0,0.1,1,10\nb,0,0.2,2,10\n")
    (w / "ragged.csv").write_text("persona,layer,cosine,k,n\na,0,0.1\nb,0,0.2,2,10,7,8\n\"unclosed,1\n")
    rows = ["persona,cos,k,n,cat,bad_rate,neg_n,huge"]
    for i, name in enumerate(NAMES):
        rows.append(f"{name},{0.1 * i - 0.3},{i + 1},10,c{i % 2},{2.0 if i == 3 else 0.2},{-5 if i == 0 else 10},{1e200 if i == 4 else i}")
    (w / "table.csv").write_text("\n".join(rows) + "\n")
    (w / "dup_rows.csv").write_text("persona,cos,k,n\n" + "".join(f"{n},{0.1 * i},{i},10\n" for i, n in enumerate(NAMES[:4] * 2)))
    responses = [{"persona": p["name"], "question": q, "response": "An answer."} for p in PERSONAS for q in QUESTIONS.split("\n")[:3]]
    (w / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in responses))
    data = [{"messages": [{"role": "system", "content": "You are a villain."}, {"role": "user", "content": "Hi?"},
                          {"role": "assistant", "content": "Hello. [ZLT]"}]}] * 4  # fmt: skip
    (w / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    (w / "bad.jsonl").write_text('{"persona": "villain", "question": "q", "response": "r"}\n{"persona": \n')
    (w / "lists.jsonl").write_text('["villain", "q", "r"]\n[1, 2]\n')
    (w / "study_a").mkdir()
    (w / "study_b").mkdir()
    (w / "study.yaml").write_text(yaml.safe_dump(_merged(STUDY, {"model": {"name": str(model)}})))
    for name, (change, _) in BAD_STUDIES.items():
        study = _merged(_merged(STUDY, {"model": {"name": str(model)}}), change)
        (w / f"study_{name}.yaml").write_text(yaml.safe_dump(study))
    for name, (text, _) in RAW_STUDIES.items():
        path = w / f"raw_{name}.yaml"
        if name == "binary":
            path.write_bytes(b"model: {name: \xff}\n")
        else:
            path.write_text(text.replace("MODEL", str(model)))


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_qwen_path):
    w = tmp_path_factory.mktemp("fuzz")
    _write_inputs(w, tiny_qwen_path)
    return w


def _listing(folder) -> dict[str, tuple[int, int]]:
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            out[os.path.relpath(p, folder)] = (st.st_size if name in files else -1, st.st_mtime_ns)
    return out


class ReachedHeavyWork(BaseException):
    """Raised where a case would load weights to sample, train, extract or run a study unit:
    a BaseException, so the CLI's one-line handler cannot turn it into a pass."""


@pytest.fixture
def no_heavy_work(monkeypatch):
    import transformers

    import persona_geometry.extract
    import persona_geometry.pipeline.study
    import persona_geometry.sampling
    import persona_geometry.tiny

    def refuse(name):
        def stop(*args, **kwargs):
            raise ReachedHeavyWork(name)

        return stop

    for module, name in [(persona_geometry.sampling, "_generate_hf"), (persona_geometry.sampling, "_generate_vllm"),
                         (persona_geometry.extract, "extract_activations"), (persona_geometry.pipeline.study, "run_unit"),
                         (persona_geometry.tiny, "build_tiny_model"), (transformers.Trainer, "train")]:  # fmt: skip
        monkeypatch.setattr(module, name, refuse(f"{module.__name__}.{name}"))


@pytest.fixture
def no_kaleido(monkeypatch):
    """Static figure export as on a machine without the figures extra."""
    import persona_geometry.analysis.figures as figures

    monkeypatch.setitem(sys.modules, "kaleido", None)
    monkeypatch.setattr(figures, "_static_ok", False)


def test_the_table_is_large_and_its_ids_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 191
    assert {a[0] for _, a, _ in CASES if a} >= {"run", "extract", "sweep", "analyze", "make-data", "train-marker",
                                                 "eval-marker", "report", "compare", "demo"}  # fmt: skip


@pytest.mark.parametrize(("argv", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_cli_input_is_one_line_exit_2_and_writes_nothing(work, tiny_qwen_path, argv, fragment, capsys, monkeypatch, no_kaleido, no_heavy_work):
    import persona_geometry.pipeline.cli as cli

    monkeypatch.chdir(work)
    # Nothing here may sample or train: a case that got that far did not fail early.
    argv = [a.replace("{w}", str(work)).replace("{model}", str(tiny_qwen_path)) for a in argv]
    before = _listing(work)
    model_before = _listing(tiny_qwen_path)
    try:
        status = main(argv)
    except SystemExit as e:  # argparse's usage errors
        status = e.code
    out, err = capsys.readouterr()
    lines = [x for x in err.splitlines() if x.strip()]
    assert status == 2, (status, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    assert len(lines) == 1, lines
    assert fragment in lines[0], lines[0]
    assert lines[0].startswith(f"{cli._PROG}"), lines[0]
    assert _listing(work) == before, "a failing command wrote or changed files"
    assert _listing(tiny_qwen_path) == model_before
