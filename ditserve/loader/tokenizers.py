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


# What Mistral Small 3.x's chat template renders for system and user messages whose content is a string or a list
# of text parts (FLUX.2 [dev]'s prompts): the BOS token, [SYSTEM_PROMPT]…[/SYSTEM_PROMPT], [INST]…[/INST] (its tool
# and image branches are left out: the pipeline sends text only).
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}"
    "{%- else %}{{- text + eos_token }}{%- endif %}"
    "{%- endfor %}"
)
# Mistral's (Tekken) control tokens at their ids; the ids between are reserved tokens of its own.
_MISTRAL_CONTROL_TOKENS = {
    0: "<unk>",
    1: "<s>",
    2: "</s>",
    3: "[INST]",
    4: "[/INST]",
    10: "[IMG]",
    11: "<pad>",
    12: "[IMG_BREAK]",
    13: "[IMG_END]",
    17: "[SYSTEM_PROMPT]",
    18: "[/SYSTEM_PROMPT]",
}


def mistral_tokenizer():
    """Mistral Small 3.x's tokenizer structure (FLUX.2 [dev]'s text encoder): byte-level BPE after its control
    tokens (BOS <s>, padding <pad> at their ids), no tokens added around the text (the chat template writes BOS),
    and the chat template above."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [_MISTRAL_CONTROL_TOKENS.get(i, f"<SPECIAL_{i}>") for i in range(max(_MISTRAL_CONTROL_TOKENS) + 1)]
    vocab = {token: i for i, token in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True) for token in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=131072,
        chat_template=MISTRAL_CHAT_TEMPLATE,
    )


def _byte_vocab(specials: tuple[str, ...]) -> dict[str, int]:
    """Byte-level BPE's 256 single-byte tokens, then the special tokens."""
    from tokenizers import pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for token in specials:
        vocab[token] = len(vocab)
    return vocab


def gemma_tokenizer():
    """Gemma's tokenizer structure (Sana's Gemma2 text encoder): `<pad>`, `<eos>`, `<bos>` (prepended), `<unk>`,
    spaces as ▁, BPE over a small vocabulary (no merges)."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "▁": 4}  # ▁: a space
    vocab.update({ch: i + 5 for ch, i in _byte_vocab(()).items()})
    return GemmaTokenizer(vocab=vocab, merges=[], model_max_length=8192)


def llama_tokenizer():
    """Llama's tokenizer structure (HunyuanVideo's Llama text encoder): `<s>` prepended, `</s>`, `<unk>` as the pad,
    spaces as ▁, BPE over a small vocabulary (no merges)."""
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3}  # ▁: a space
    vocab.update({ch: i + 4 for ch, i in _byte_vocab(()).items()})
    tokenizer = LlamaTokenizer(vocab=vocab, merges=[], model_max_length=4096)
    tokenizer.pad_token = tokenizer.unk_token
    return tokenizer
