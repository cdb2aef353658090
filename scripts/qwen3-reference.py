#!/usr/bin/env python3
"""Reference fixtures for FLUX.2 klein's text encoder (Qwen3), checked by tests/qwen3.rs.

Builds, with seeded random weights and no downloads:
- a tiny Qwen3 (transformers' Qwen3ForCausalLM, tied embeddings as in Qwen3-4B) saved as the
  klein repo's `text_encoder/` folder (config.json + model.safetensors);
- a tiny byte-level BPE tokenizer trained here with the `tokenizers` package, laid out as Qwen's
  (NFC, Qwen2's split regex, byte-level, the <|endoftext|>/<|im_start|>/<|im_end|> specials and
  the <think>/</think> added tokens), saved as the repo's `tokenizer/` folder (tokenizer.json +
  tokenizer_config.json with a chat template);
then builds diffusers' Flux2KleinPipeline from these (no transformer or autoencoder: prompt
encoding needs neither) and calls its `encode_prompt` on a few prompts, with the pipeline's
defaults (max_sequence_length 512, text_encoder_out_layers (9, 18, 27)).

The chat template is the part of Qwen3's template a single user message goes through (system
and user turns, the generation prompt, and the empty think block when enable_thinking is false),
written here; the real repo's template renders a single user message the same way.

Writes tests/fixtures/klein-text/: text_encoder/, tokenizer/, prompts.json (each prompt, the
text the template made of it, its token ids and attention mask), and reference.safetensors
(`embeds.<i>`: encode_prompt's (1, 512, 3 x hidden) output for the prompts marked `embeds`;
`final.0`: the last hidden state, after the final norm, for prompt 0).

Run: OMP_NUM_THREADS=1 /work/pyref/bin/python scripts/qwen3-reference.py
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "klein-text")

SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

CORPUS = [
    "A photograph of a red fox sitting in fresh snow, golden hour light, 35mm film.",
    "An oil painting of a lighthouse on a cliff; waves crash below, stormy sky!",
    "Close-up portrait of an old fisherman with a grey beard, dramatic lighting.",
    "A bowl of ramen with 2 eggs, 3 slices of pork and green onions (studio photo).",
    "Watercolour map of a fantasy kingdom: rivers, forests, mountains & castles.",
    "The café on the corner serves crème brûlée and naïve coffee at 7:30 a.m.",
    "日本語の猫が窓辺で眠っている。東京の夜景、ネオンの光。",
    "Ein Hund läuft über die Wiese — schön, oder? Größe: 42 cm.",
    "Emoji test 🐱🦊🌙 and symbols © ® ™ € £ ¥ § ¶ • … ‘quotes’ “double”",
    "Numbers 0123456789, 3.14159, 1,000,000 and 50% off; x=y+z*2/4-1.",
    "He said: \"it's fine, I'll do it, we've done it, they're here, you'd know\".",
    "tabs\tand\nnew lines\r\nand   multiple   spaces   here.",
]

PROMPTS = [
    ("A photograph of a red fox sitting in fresh snow, golden hour light.", True),
    ("Ünïcödé: 日本語の猫 🐱 — café au lait; 3.14159 & 42%! It's 7:30pm, isn't it?", False),
    ("tricky <|im_end|> tokens <think> and </think>\n\tnew  lines", False),
    ("", False),
    (
        "a very long prompt about an enormous city at night with towers and bridges, "
        * 12,
        True,
    ),
    ("Watercolour map of a fantasy kingdom: rivers, forests & castles (1024 px)", True),
    # Tokenizer only: case-folded contractions, CRLF and space runs, decomposed accents (NFC),
    # full-width digits, right-to-left scripts, a lone special token.
    ("IT'S THE DOG'S BONE, WE'LL SEE; don't", False),
    ("  leading and trailing  \r\n\r\n  spaces\t\t", False),
    ("Cafe\u0301 vs Café, n\u0303 vs ñ, Å vs A\u030a", False),
    ("１２３ full-width, ٣٤٥ Arabic digits, Ⅻ numeral, ½ fraction", False),
    ("שלום עולם and مرحبا بالعالم, Ελληνικά, Русский текст", False),
    ("<|endoftext|>", False),
]


def build_tokenizer():
    tok = Tokenizer(models.BPE(dropout=None, unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    from tokenizers import AddedToken

    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]]
    )
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ["<think>", "</think>"]])
    return tok


def main():
    torch.manual_seed(20260128)
    tok_dir = os.path.join(OUT, "tokenizer")
    te_dir = os.path.join(OUT, "text_encoder")
    os.makedirs(tok_dir, exist_ok=True)
    os.makedirs(te_dir, exist_ok=True)

    raw = build_tokenizer()
    raw.save(os.path.join(tok_dir, "tokenizer.json"))
    added = {}
    for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]:
        added[str(raw.token_to_id(t))] = {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t.startswith("<|"),
        }
    tok_cfg = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    with open(os.path.join(tok_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f, indent=2, ensure_ascii=False)

    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    vocab = raw.get_vocab_size(with_added_tokens=True)
    config = Qwen3Config(
        vocab_size=512,
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=28,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        hidden_act="silu",
        attention_bias=False,
        pad_token_id=raw.token_to_id("<|endoftext|>"),
        eos_token_id=raw.token_to_id("<|im_end|>"),
        bos_token_id=None,
        torch_dtype="float32",
    )
    assert vocab <= config.vocab_size, vocab
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                # RMSNorm weights away from 1 so that a missing one shows.
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    model.save_pretrained(te_dir, safe_serialization=True)
    for extra in ["generation_config.json"]:
        path = os.path.join(te_dir, extra)
        if os.path.exists(path):
            os.remove(path)

    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    text_encoder = Qwen3ForCausalLM.from_pretrained(te_dir, torch_dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=None,
    )

    records = []
    tensors = {}
    for i, (prompt, keep) in enumerate(PROMPTS):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=False,
        )
        enc = tokenizer(text, padding="max_length", truncation=True, max_length=512)
        with torch.no_grad():
            embeds, text_ids = pipe.encode_prompt(prompt=prompt, device=torch.device("cpu"))
        assert embeds.shape == (1, 512, 3 * config.hidden_size), embeds.shape
        records.append(
            {
                "prompt": prompt,
                "text": text,
                "ids": enc["input_ids"],
                "mask": enc["attention_mask"],
                "embeds": keep,
            }
        )
        if keep:
            tensors[f"embeds.{i}"] = embeds[0].contiguous().float()
        if i == 0:
            with torch.no_grad():
                out = text_encoder(
                    input_ids=torch.tensor([enc["input_ids"]]),
                    attention_mask=torch.tensor([enc["attention_mask"]]),
                    output_hidden_states=True,
                    use_cache=False,
                )
            tensors["final.0"] = out.hidden_states[-1][0].contiguous().float()
            tensors["layer1.0"] = out.hidden_states[1][0].contiguous().float()
        print(f"prompt {i}: {sum(enc['attention_mask'])} tokens", file=sys.stderr)

    with open(os.path.join(OUT, "prompts.json"), "w") as f:
        json.dump(
            {"max_sequence_length": 512, "layers": [9, 18, 27], "prompts": records},
            f,
            ensure_ascii=False,
        )
    save_file(tensors, os.path.join(OUT, "reference.safetensors"))


if __name__ == "__main__":
    main()
