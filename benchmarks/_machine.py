"""The machine line every benchmark prints first: figures mean little without it."""

from __future__ import annotations

import os
import platform
import time

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    """1-, 5- and 15-minute load averages: on a shared box they say how much the figures can be trusted."""
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine() -> str:
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{cpu_model()}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}, "
            f"torch threads {torch.get_num_threads()}, load average {load_average()}")


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 3, device: str = "cpu") -> float:
    """Best-of-``repeats`` GFLOP/s of an n x n x n matmul in ``dtype``: the ceiling a phase run in that dtype
    is compared against (measured in the same run, at the same thread count and load)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up (oneDNN kernels, caches)
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def ceilings(device: str = "cpu") -> dict[torch.dtype, float]:
    """fp32 and bf16 matmul ceilings (GFLOP/s), printed on one line so every benchmark reports both."""
    out = {dtype: matmul_gflops(dtype, device=device) for dtype in (torch.float32, torch.bfloat16)}
    print(f"matmul ceilings (2048^3, best of 3): fp32 {out[torch.float32]:.0f} GFLOP/s, "
          f"bf16 {out[torch.bfloat16]:.0f} GFLOP/s (x{out[torch.bfloat16] / out[torch.float32]:.2f})",
          flush=True)
    return out


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


def forward_flops(model: torch.nn.Module, lengths: list[int], kept: int) -> float:
    """Estimated forward FLOPs of ``model`` over sequences of ``lengths`` with logits for ``kept`` positions:
    2 x non-embedding parameters per token, causal attention 2 x layers x hidden x len^2, the LM head on the
    kept positions. (Backward: about twice this.)"""
    cfg = model.config
    hidden, vocab, layers = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    body = sum(p.numel() for p in model.parameters()) - vocab * hidden * (1 if cfg.tie_word_embeddings else 2)
    tokens = sum(lengths)
    attention = sum(2 * layers * hidden * n * n for n in lengths)
    return 2 * body * tokens + attention + 2 * vocab * hidden * kept
