"""Loading the policy model and tokenizer, and building tiny random-weight models for tests.

``load_tokenizer``/``load_policy`` accept an embedded short name (``smollm2-135m``), a local checkpoint
directory or a Hugging Face name. ``build_tiny_model`` writes a real (byte-level BPE tokenizer with a ChatML
chat template + a 2-layer Llama) checkpoint from scratch, so unit tests exercise the real loading, chat
template and generation paths without any download.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memtrain.assets import resolve

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TINY_TRAINING_TEXT = [
    "The memory agent reads a long document chunk by chunk and rewrites its memory at every step.",
    "Paris is the capital of France. Berlin is the capital of Germany. Rome is in Italy.",
    "Document 1: The Eiffel Tower was completed in 1889 and is located in Paris.",
    "Question: which entity does [MASK] stand for? Answer with \\boxed{answer}.",
    "The [TARGET] entity was mentioned in an earlier chunk of the article.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 1889 1945 2018 yes no",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?()[]{}<>/\\'\"-_=+*&^%$#@~`|",
]


def resolve_dtype(name: str, device: str) -> Any:
    """``auto`` -> bf16 on CUDA, fp32 on CPU (CPU bf16 matmuls are slow and numerically worse)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    path = resolve(name, kind="model")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ValueError(
            f"model {name!r}: its tokenizer has no chat template; memtrain renders every prompt "
            "through the chat template, so use an instruct/chat model"
        )
    return tokenizer


def load_policy(name: str, dtype: str = "auto", device: str | None = None) -> Any:
    """A causal LM ready for generation/training on ``device`` (default: CUDA if present, else CPU)."""
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    model = AutoModelForCausalLM.from_pretrained(
        resolve(name, kind="model"), dtype=resolve_dtype(dtype, device)
    )
    return model.to(device)


def build_tiny_model(
    out_dir: str | Path,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    config_from: str | None = None,
) -> Path:
    """Write a random-weight Llama + trained byte-level BPE tokenizer with a ChatML template to ``out_dir``.

    ``config_from`` takes the architecture from an existing checkpoint's config (e.g. SmolLM2's, for a
    full-size random model on a GPU) and the tokenizer from that checkpoint too.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        LlamaConfig,
        PreTrainedTokenizerFast,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if config_from is not None:
        src = resolve(config_from, kind="model")
        config = AutoConfig.from_pretrained(src)
        tokenizer = AutoTokenizer.from_pretrained(src)
    else:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        bpe = Tokenizer(models.BPE(unk_token=None))
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        bpe.train_from_iterator(_TINY_TRAINING_TEXT * 4, trainer=trainer)
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=bpe,
            bos_token="<|im_start|>",
            eos_token="<|im_end|>",
            pad_token="<|im_end|>",
            unk_token="<|endoftext|>",
        )
        tokenizer.chat_template = CHATML_TEMPLATE
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=8192,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
