"""Loading the policy model and tokenizer, and building tiny random-weight models for tests.

``load_tokenizer``/``load_policy`` accept an embedded short name (``smollm2-135m``), a local checkpoint
directory or a Hugging Face name. ``build_tiny_model`` writes a real (byte-level BPE tokenizer with a ChatML
chat template + a 2-layer Llama) checkpoint from scratch, so unit tests exercise the real loading, chat
template and generation paths without any download.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from memtrain.assets import ASSETS, AssetError, resolve
from memtrain.errors import UserError

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


class ModelLoadError(UserError):
    """A model or tokenizer that cannot be loaded: one line naming the path/name and what was expected."""


_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{exc.__class__.__name__}: {text.splitlines()[0][:300] if text else ''}"


def _local_source(name: str, what: str) -> str:
    """Resolve ``name``; for a local directory check it holds a ``what`` ("model" or "tokenizer") before
    transformers sees it (its errors for an empty dir are long tracebacks)."""
    try:
        path = resolve(name, kind="model")
    except AssetError as exc:  # a missing path or a bad embedded asset: one line (OS errors stay OS errors)
        raise ModelLoadError(str(exc)) from exc
    if not os.path.exists(path):
        return path  # a hub name (resolve refuses path-like names that do not exist)
    d = Path(path)
    if not d.is_dir():
        raise ModelLoadError(f"model path {path}: is a file; expected a checkpoint directory (config.json + "
                             "weights + tokenizer files, as save_pretrained writes)")
    if what == "model":
        if not (d / "config.json").is_file() and not (d / "adapter_config.json").is_file():
            raise ModelLoadError(f"model path {path}: no config.json; expected a Hugging Face checkpoint "
                                 "directory (as save_pretrained writes)")
        if (d / "sharded").is_dir():  # memtrain.rl.checkpoint.SHARDED_DIR
            raise ModelLoadError(f"model path {path}: a sharded training checkpoint (FSDP2); `memtrain "
                                 f"export {path} --out DIR` makes a Hugging Face model of it, then pass DIR")
        if not any((d / w).is_file() for w in _WEIGHTS):
            raise ModelLoadError(f"model path {path}: no weights; expected one of {', '.join(_WEIGHTS)}")
    elif not any((d / t).is_file() for t in _TOKENIZER_FILES):
        raise ModelLoadError(f"model path {path}: no tokenizer files; expected one of "
                             f"{', '.join(_TOKENIZER_FILES)}")
    return path


def _load_failed(name: str, path: str, what: str, exc: BaseException) -> ModelLoadError:
    """One line for a from_pretrained failure: a damaged local checkpoint, or a hub name not cached."""
    if os.path.exists(path):
        hint = (f"; run `memtrain assets fetch {name} --force` to fetch it again" if name in ASSETS
                else "; the files may be damaged or half-copied")
        return ModelLoadError(f"model path {path}: cannot load the {what} ({_first_line(exc)}){hint}")
    offline = os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0")
    return ModelLoadError(
        f"model {name!r}: not a local directory, and the Hugging Face hub could not provide its {what}"
        f"{' (HF_HUB_OFFLINE is set)' if offline else ''} ({_first_line(exc)}); expected an embedded name "
        f"({', '.join(n for n, a in ASSETS.items() if a.kind == 'model')}), a checkpoint directory, or a "
        "hub name that is cached or reachable"
    )


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    path = _local_source(name, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # OSError (hub/offline), ValueError/JSON errors (damaged files), ...
        raise _load_failed(name, path, "tokenizer", exc) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise UserError(
            f"model {name!r}: its tokenizer has no chat template; memtrain renders every prompt "
            "through the chat template, so use an instruct/chat model"
        )
    return tokenizer


_POSITION_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def config_context_length(config: Any) -> int | None:
    """Positions a model config was trained for, or ``None`` when it names none."""
    for attr in _POSITION_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def engine_context_length(engine: Any) -> int | None:
    """Positions an in-process engine can generate in: its own ``context_length`` (vLLM's max_model_len)
    or its model's (``HFEngine.model``); ``None`` for a server engine, whose server enforces its own limit."""
    own = getattr(engine, "context_length", None)
    if isinstance(own, int) and not isinstance(own, bool):
        return own
    return config_context_length(getattr(getattr(engine, "model", None), "config", None))


class UnknownContextError(UserError):
    """Neither the model's config nor its tokenizer tells its context length."""


def model_context_length(model_name: str, tokenizer: Any) -> int:
    """Positions the model was trained for (``max_position_embeddings``), else the tokenizer's limit.

    A path that does not exist is an AssetError, not an unknown context: callers that go on without a
    context catch :class:`UnknownContextError` only.
    """
    from transformers import AutoConfig

    from memtrain.log import logger

    path = resolve(model_name, kind="model")
    try:
        found = config_context_length(AutoConfig.from_pretrained(path))
        if found is not None:
            return found
    except (OSError, ValueError) as exc:
        logger.debug("no model config for %s (%s)", model_name, exc)
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10**7:
        return limit
    raise UnknownContextError(f"cannot tell the context length of {model_name!r}; pass --max-context TOKENS")


def load_policy(name: str, dtype: str = "auto", device: str | None = None,
                inference_compute_dtype: str | None = None) -> Any:
    """A causal LM ready for generation/training on ``device`` (default: CUDA if present, else CPU).

    ``inference_compute_dtype`` (``model.compute_dtype``, for evaluation and ``memtrain answer``): with
    ``dtype="auto"`` the weights are loaded directly in the compute dtype it resolves to (bf16 where the
    device runs it fast): nothing trains, so no float32 master copy is needed; float32 weights asked for
    explicitly compute under autocast to it (:mod:`memtrain.precision`).
    """
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    path = _local_source(name, "model")
    compute = None
    if inference_compute_dtype is not None:
        from memtrain.precision import resolve_compute_dtype

        compute = resolve_compute_dtype(inference_compute_dtype, device)
    weights = compute if dtype == "auto" and compute is not None else resolve_dtype(dtype, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=weights)
    except Exception as exc:  # OSError (hub/offline), SafetensorError (damaged weights), ...
        raise _load_failed(name, path, "model", exc) from exc
    if compute is not None and weights != compute:
        from memtrain.precision import set_compute_dtype

        set_compute_dtype(model, compute)
    return _aligned(model.to(device))


_ALIGN = 64  # bytes: what torch's CPU allocator gives every new tensor


def _aligned(model: Any) -> Any:
    """``model`` with each CPU weight at a ``_ALIGN``-byte address, as a trained or copied model has them.

    Safetensors weights loaded on CPU point into the file's memory map at arbitrary offsets, and some CPU
    kernels round differently on unaligned data (measured: a KV-cache forward of a loaded model differed
    from that of its deep copy by 5e-7), so without this a resumed run or a reloaded reference would not
    reproduce the numbers of the process that never reloaded. Tied weights stay tied (one Parameter)."""
    for t in (*model.parameters(), *model.buffers()):
        if t.device.type == "cpu" and t.numel() and t.data_ptr() % _ALIGN:
            t.data = t.data.clone()
    return model


def _tiny_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE trained on a few sentences, with ChatML's special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>",
                                  "<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(_TINY_TRAINING_TEXT * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|im_end|>",
                                        unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


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
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if config_from is not None:
        src = resolve(config_from, kind="model")
        config = AutoConfig.from_pretrained(src)
        tokenizer = AutoTokenizer.from_pretrained(src)
    else:
        tokenizer = _tiny_tokenizer(vocab_size)
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
