"""The family seam: registrations are consistent, shared modules name no family, and a family refuses what it
cannot take with an error naming the field."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from ditserve import ConfigError, Engine
from ditserve.registry import load_object, spec_for_pipeline_class, specs

PACKAGE = Path(__file__).resolve().parents[1] / "ditserve"
# What reads a family's registration instead of naming the family.
SHARED = [
    "engine",
    "server",
    "loader",
    "bench.py",
    "lora/__init__.py",
    "lora/manager.py",
    "lora/placement.py",
    "pipelines/base.py",
    "pipelines/__init__.py",
    "parallel/sequence.py",
    "parallel/sharding.py",
    "accel",
]


def test_registrations_are_consistent():
    for spec in specs():
        assert spec_for_pipeline_class(spec.pipeline_classes[0]) is spec
        for dit in spec.dits:
            assert dit.component in spec.components
            cls = load_object(dit.model)
            assert callable(cls.from_config) and callable(cls.attention_heads) and callable(load_object(dit.key_map))
            assert hasattr(cls, "sequence_sharding") and hasattr(cls, "repeated_blocks")
        assert issubclass(load_object(spec.pipeline), load_object("ditserve.pipelines.base:Pipeline"))
        for preset in spec.presets:
            assert preset.pipeline_class in spec.pipeline_classes
            required = {d.component for d in spec.dits} - set(spec.optional_components)
            assert required <= set(preset.configs)
        for name, builder in spec.code_tokenizers.items():
            assert name in spec.components and callable(load_object(builder))


def _code_words(source: str) -> list[tuple[int, str]]:
    """(line, text) of every identifier and string constant in the code, docstrings and comments left out."""
    tree = ast.parse(source)
    docstrings = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            docstrings.add(id(first.value))
    words = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.append((node.lineno, node.value))
        elif isinstance(node, ast.Name):
            words.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute):
            words.append((node.lineno, node.attr))
        elif isinstance(node, ast.alias | ast.FunctionDef | ast.ClassDef):
            words.append((node.lineno, node.name))
    return words


def test_shared_modules_name_no_family():
    names = {s.family for s in specs()} | {c for s in specs() for c in s.pipeline_classes}
    pattern = re.compile(r"(^|[^a-z])(" + "|".join(re.escape(n.lower()) for n in sorted(names)) + r")([^a-z]|$)")
    found = []
    for entry in SHARED:
        path = PACKAGE / entry
        for file in [path] if path.is_file() else sorted(path.rglob("*.py")):
            for line, word in _code_words(file.read_text()):
                if pattern.search(word.lower()):
                    found.append(f"{file.relative_to(PACKAGE)}:{line}: {word}")
    assert not found, "\n".join(found)


@pytest.fixture(scope="module")
def digits_engine():
    return Engine.from_pretrained("digits")


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_frames", 9), ("fps", 16), ("images", ["in.png"]), ("guidance_scale_2", 2.0)],
)
def test_image_family_refuses_video_and_image_inputs_and_a_second_scale(digits_engine, field, value):
    with pytest.raises(ConfigError) as info:
        digits_engine.generate("the digit 3", num_inference_steps=1, **{field: value})
    assert info.value.field == field
    assert "flux" in str(info.value)


def test_bad_frame_count_is_refused_by_name(digits_engine):
    with pytest.raises(ConfigError) as info:
        digits_engine.generate("the digit 3", num_frames=-4)
    assert info.value.field == "num_frames"
