"""A tiny chat model built offline and deterministically, for tests, the demo and examples.

It has random weights, so its geometry and rates show the mechanics of the pipeline, not a
finding. It is a real Hugging Face checkpoint on disk (config, safetensors, tokenizer with a
chat template), so every code path that loads a model by path (HF, TransformerLens, vLLM,
peft) runs on it unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from persona_geometry._validation import check_one_of

__all__ = ["TinyModelSpec", "build_tiny_model", "CHATML_TEMPLATE"]

# Qwen2.5's ChatML layout: a system turn, the user turn, then the assistant header.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@dataclass(frozen=True, kw_only=True)
class TinyModelSpec:
    """The shape of a tiny model (vLLM needs head_dim = hidden_size / num_attention_heads ≥ 32)."""

    family: str = "qwen2"
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 256
    vocab_size: int = 1024
    max_position_embeddings: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        check_one_of(self.family, "family", "TinyModelSpec", ("qwen2", "llama"))


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from persona_geometry.personas import builtin_personas
    from persona_geometry.questions import builtin_questions, training_questions

    corpus = (
        [p.system_prompt for p in builtin_personas()] + builtin_questions() + training_questions()
    )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model(
    path: str | os.PathLike[str], spec: TinyModelSpec | None = None, *, overwrite: bool = False
) -> Path:
    """Returns the folder of a tiny chat model, building it there if it is not already built.

    The weights come from ``spec.seed``; norm weights and biases are moved away from 1 and 0 so
    that a bug that skips or doubles a norm changes the numbers.

    Args:
        path: Folder to write the checkpoint to (config.json, model.safetensors, tokenizer).
        spec: The model's shape and seed; defaults to a 4-layer Qwen2 with hidden size 128.
        overwrite: Rebuild even if ``path`` already holds a checkpoint.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from persona_geometry._io import atomic_dir

    spec = spec or TinyModelSpec()
    path = Path(path)
    if (
        (path / "config.json").is_file()
        and (path / "model.safetensors").is_file()
        and not overwrite
    ):
        return path
    tokenizer = _train_tokenizer(spec.vocab_size)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.05,
        dtype="float32",
    )
    config = Qwen2Config(**common) if spec.family == "qwen2" else LlamaConfig(**common)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.copy_(1.0 + 0.3 * torch.randn_like(param))
                elif name.endswith(".bias"):
                    param.copy_(0.1 * torch.randn_like(param))
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    # Written into a temporary sibling, then renamed: a crash never leaves a half-built model.
    with atomic_dir(path) as tmp_dir:
        model.save_pretrained(tmp_dir, safe_serialization=True)
        tokenizer.save_pretrained(tmp_dir)
    return path
