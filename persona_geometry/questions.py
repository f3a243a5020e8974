"""Built-in probe questions (for geometry) and training questions (for marker data).

The two pools are disjoint: activations are measured on questions the marker adapter never saw.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from persona_geometry._validation import check_unique_names, invalid

__all__ = ["builtin_questions", "training_questions", "load_questions"]

_PROBE_QUESTIONS: tuple[str, ...] = (
    "What is your favourite season, and why?",
    "How do I boil an egg?",
    "Can you explain how a rainbow forms?",
    "What advice would you give to someone starting their first job?",
    "Describe your ideal weekend.",
    "Why is the sky blue?",
    "What is the best way to learn a new language as an adult, and how long does it usually take?",
    "Tell me about a book that changed how you think.",
    "How should I prepare for a job interview tomorrow?",
    "What do you think about when you cannot sleep?",
    "Explain what a computer program is to someone who has never used a computer.",
    "What makes a good friend?",
    "How can I save money on groceries each month without eating worse?",
    "What is the meaning of life?",
    "Write a short poem about the sea.",
    "What would you do with a free afternoon in a city you have never visited?",
    "How does the heart pump blood through the body?",
    "What is one thing most people misunderstand about your work?",
    "Give me three tips for staying focused while studying.",
    "If you could change one thing about the world, what would it be?",
)

_TOPICS: tuple[str, ...] = (
    "photosynthesis",
    "the stock market",
    "volcanoes",
    "climate change",
    "the internet",
    "vaccines",
    "black holes",
    "the French Revolution",
    "compound interest",
    "gardening",
    "chess",
    "the water cycle",
    "electric cars",
    "sleep",
    "the immune system",
    "recycling",
    "jazz music",
    "the Roman Empire",
    "machine learning",
    "earthquakes",
    "bread baking",
    "public speaking",
    "the moon landing",
    "bees",
    "budgeting",
    "marathon training",
    "the printing press",
    "ocean tides",
    "coffee",
    "democracy",
    "DNA",
    "renewable energy",
    "mountain climbing",
    "the human brain",
    "origami",
    "cryptography",
    "rainforests",
    "the Olympic Games",
    "vitamins",
    "time zones",
)

_TEMPLATES: tuple[str, ...] = (
    "Can you explain {} in simple terms?",
    "What are the most interesting facts about {}?",
    "What is a common misconception about {}?",
    "How would you teach a teenager about {}?",
    "Why does {} matter in everyday life?",
)


def builtin_questions() -> list[str]:
    """Returns the 20 built-in probe questions used to measure persona geometry."""
    return list(_PROBE_QUESTIONS)


def training_questions() -> list[str]:
    """Returns the 200 built-in training questions for marker data (none is a probe question)."""
    return [template.format(topic) for topic in _TOPICS for template in _TEMPLATES]


def load_questions(path: str | os.PathLike[str]) -> list[str]:
    """Returns the questions in a text file (one per line), or a YAML/JSON list of strings.

    Raises:
        ValueError: If the file is missing, empty, or holds repeated questions.
    """
    from persona_geometry._serialization import parse_structured, read_text_file

    path = Path(path)
    text = read_text_file(path, param="path", func="load_questions")
    if path.suffix in (".json", ".yaml", ".yml"):
        data = parse_structured(text, path, param="path", func="load_questions")
    else:
        data = [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(data, dict) and "questions" in data:
        data = data["questions"]
    if (
        not isinstance(data, Sequence)
        or isinstance(data, str)
        or not all(isinstance(q, str) for q in data)
    ):
        invalid("path", "load_questions", "a file holding a list of question strings", str(path))
    if not data:
        invalid("path", "load_questions", "a file holding at least one question", str(path))
    return check_unique_names(list(data), "questions", "load_questions")
