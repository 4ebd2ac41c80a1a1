"""Tokenizers built in code from a small vocabulary, for models that come without tokenizer files.

Presets (`--load-format dummy`) have configs but no files, and the tiny test folders are written from these. Each
keeps the real tokenizer's structure (special tokens, padding, end tokens, truncation, chat template) over a small
vocabulary, so every pipeline code path is the real one: CLIP's and Qwen's byte-level BPE over single bytes, T5's
unigram over single characters.
"""

from __future__ import annotations

import string


def clip_tokenizer():
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({ch + "</w>": len(alphabet) + i for i, ch in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer():
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    pieces += [("▁" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


# What Qwen3's chat template renders for system and user messages and the generation prompt (its tool-call and
# thinking-history branches are left out: pipelines send one user message). With `enable_thinking=False` it closes
# an empty thinking block, as Qwen3's does.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def qwen3_tokenizer():
    """Qwen3's tokenizer structure (Z-Image's text encoder): byte-level BPE, `<|endoftext|>` pads, `<|im_end|>`
    ends, padding on the right, the chat special tokens and Qwen3's chat template."""
    from tokenizers import AddedToken, pre_tokenizers
    from transformers import Qwen2Tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=131072,
        chat_template=QWEN3_CHAT_TEMPLATE,
    )
    tokenizer.add_tokens(
        [
            AddedToken("<|im_start|>", special=True),
            AddedToken("<think>", special=False),
            AddedToken("</think>", special=False),
        ]
    )
    return tokenizer


def clip_image_processor():
    """CLIP's image preprocessing as the published Wan2.1 I2V folders' image_processor has it (OpenAI CLIP's: the
    shorter side to 224 by bicubic resampling, a centre crop of 224, CLIP's mean and std): transformers' defaults.
    Without torchvision transformers serves it through its PIL backend."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor()


# Qwen2.5-VL's vision markers: an image in a prompt is <|vision_start|><|image_pad|><|vision_end|>, and the processor
# repeats <|image_pad|> once per merged image patch.
QWEN_VL_SPECIAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def qwen2_5_vl_tokenizer():
    """Qwen2.5-VL's tokenizer structure (Qwen-Image's text encoder): Qwen3's above plus the vision markers as
    special tokens. Qwen-Image's pipelines format their prompts themselves, so no chat template is needed."""
    from tokenizers import AddedToken

    tokenizer = qwen3_tokenizer()
    tokenizer.add_tokens([AddedToken(t, special=True) for t in QWEN_VL_SPECIAL_TOKENS])
    return tokenizer


def qwen2_5_vl_processor():
    """Qwen2.5-VL's processor (Qwen-Image-Edit's `processor`): the Qwen2-VL image processor with its defaults (the
    published folders' settings: 14-pixel patches merged 2×2, 56² to 3584² pixels, CLIP's mean and std) and the
    tokenizer above."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor

    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=qwen2_5_vl_tokenizer())
