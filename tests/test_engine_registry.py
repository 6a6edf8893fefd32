"""Engines by registration: a toy engine defined in this file works through make_engine and `memtrain answer`
with no edit elsewhere; unknown kinds are one-line errors listing the known ones; importing the engines stays
free of torch; the vLLM engine's pure parts (LoRA-merged weights, its dtype) without vLLM installed."""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from memtrain.cli.main import main
from memtrain.config import ConfigError, EngineConfig, LoraConfig, load_config
from memtrain.engines import make_engine, register_engine
from memtrain.engines.base import GenerationRequest, SamplingParams
from memtrain.engines.scripted import ScriptedEngine
from memtrain.models import load_policy, load_tokenizer

TOY_ANSWER = "\\boxed{the toy engine}"


class ToyEngine(ScriptedEngine):
    """Answers every prompt with TOY_ANSWER; remembers what it was built with."""

    def __init__(self, cfg: EngineConfig, model_name: str, tokenizer: Any) -> None:
        super().__init__(lambda prompt, sample: TOY_ANSWER, tokenizer)
        self.cfg, self.model_name = cfg, model_name


@register_engine("toy")
def build_toy(cfg: EngineConfig, model_name: str, model: Any, tokenizer: Any) -> ToyEngine:
    return ToyEngine(cfg, model_name, tokenizer if tokenizer is not None else load_tokenizer(model_name))


def test_a_registered_engine_is_built_by_make_engine(tiny_model_dir: Path) -> None:
    cfg = load_config(None, ["engine.kind=toy", "engine.batch_size=3"]).engine
    engine = make_engine(cfg, str(tiny_model_dir))
    assert isinstance(engine, ToyEngine) and engine.cfg.batch_size == 3
    assert engine.model_name == str(tiny_model_dir)
    [[completion]] = engine.generate([GenerationRequest([1, 2, 3], SamplingParams(max_tokens=32))])
    assert completion.text == TOY_ANSWER


def test_a_registered_engine_answers_through_the_cli(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_text("The box is red. " * 20, encoding="utf-8")
    cfg = tmp_path / "toy.yaml"
    cfg.write_text(f"model: {{name: {tiny_model_dir}}}\nengine: {{kind: toy}}\n"
                   "agent: {chunk_tokens: 64, memory_tokens: 16, answer_tokens: 16, max_chunks: 2}\n",
                   encoding="utf-8")
    assert main(["answer", "--config", str(cfg), "--document", str(doc), "--question", "Which colour?"]) == 0
    assert TOY_ANSWER in capsys.readouterr().out


def test_unknown_kinds_and_bad_registrations_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match=r"unknown engine kind 'vlm'; known kinds: hf, openai, scripted, "
                                          r"toy, vllm, vllm_server \(another module can add one"):
        load_config(None, ["engine.kind=vlm"])
    with pytest.raises(ValueError, match="unknown engine kind 'base'"):  # a support module, not an engine
        EngineConfig(kind="base")
    with pytest.raises(ValueError, match=r"engine kind 'Bad-Kind': expected lower-case letters"):
        register_engine("Bad-Kind")
    with pytest.raises(ValueError, match=r"engine kind 'hf' is already registered by memtrain\.engines\.hf"):
        register_engine("hf")(build_toy)
    register_engine("toy")(build_toy)  # the same builder again (a re-import) is fine


def test_importing_the_engines_and_validating_a_kind_stays_light() -> None:
    code = ("import sys; from memtrain.config import EngineConfig; import memtrain.engines; "
            "EngineConfig(kind='vllm'); EngineConfig(kind='openai'); "
            "print(sorted(m for m in ('torch', 'httpx', 'vllm', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_kind_without_vllm_says_what_to_install(tiny_model_dir: Path) -> None:
    with pytest.raises(ImportError, match=r"engine\.kind=vllm needs vLLM.*pip install -e '\.\[vllm\]'"):
        make_engine(EngineConfig(kind="vllm"), str(tiny_model_dir))


def test_vllm_weights_merge_lora_without_touching_the_trained_weights(tiny_model_dir: Path) -> None:
    from memtrain.engines.vllm import hf_weights
    from memtrain.rl.optim import apply_lora

    base = load_policy(str(tiny_model_dir), dtype="float32", device="cpu")
    peft = apply_lora(copy.deepcopy(base), LoraConfig(rank=4, alpha=8))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    before = {k: v.clone() for k, v in peft.state_dict().items()}
    merged = dict(hf_weights(peft, torch.float32))
    assert merged.keys() == base.state_dict().keys()
    plain = copy.deepcopy(base)
    plain.load_state_dict(merged)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, peft(ids).logits, atol=1e-5)
        assert not torch.allclose(base(ids).logits, peft(ids).logits, atol=1e-3)  # the adapters matter
    assert all(torch.equal(before[k], v) for k, v in peft.state_dict().items())  # nothing merged in place
    assert all(t.dtype == torch.bfloat16 for _, t in hf_weights(peft, torch.bfloat16))


def test_vllm_engine_dtype_follows_the_compute_dtype(tiny_model_dir: Path) -> None:
    from memtrain.engines.vllm import engine_dtype
    from memtrain.precision import set_compute_dtype

    model = load_policy(str(tiny_model_dir), dtype="float32", device="cpu")
    set_compute_dtype(model, torch.bfloat16)  # fp32 master weights, bf16 matmuls: the trainer's setting
    assert engine_dtype("auto", model) == torch.bfloat16
    set_compute_dtype(model, torch.float32)
    assert engine_dtype("auto", model) == torch.float32
    assert engine_dtype("bfloat16", model) == torch.bfloat16
    assert engine_dtype("auto", model.to(torch.bfloat16)) == torch.bfloat16  # weights loaded in bf16
