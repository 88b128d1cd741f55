"""The runtime interface: what verification and the benchmark ask of every runtime, in one small API."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..monitoring import THREADS_ENV, threads

__all__ = ["Runtime", "threads", "THREADS_ENV"]


class Runtime:
    """An artifact loaded in the runtime a user deploys it with.

    ``score(sequences, batch_size)``: the logits (fp32 torch tensor [len, vocab]) at every position of each sequence
    of token ids, each from an empty context: verification runs each artifact once over the reference's own tokens
    (teacher-forced), and reads its greedy agreement off the same logits.
    ``timed(ids, new_tokens, batch)``: seconds to the first token and for ``new_tokens`` more, decoding with the cache.
    ``tokenize(prompt)``: the runtime's own ids for a chat-templated prompt, or None when the artifact's Hugging Face
    tokenizer applies. ``close()`` frees it.
    The default methods drive a decoder with ``prompt`` and ``forward`` (onnxruntime, TensorRT).
    """

    name = "runtime"
    device = "cpu"
    batches = True  # timed() can decode several sequences at once
    placeable = False  # device_map decides where it runs (transformers); otherwise the runtime's own device
    decoder: Any = None
    path: Path

    def score(self, sequences: list[Any], batch_size: int = 1) -> list[Any]:
        import torch

        return [torch.from_numpy(self.decoder.prompt([int(i) for i in ids])[0]).float() for ids in sequences]

    def timed(self, ids: list[int], new_tokens: int, batch: int = 1) -> tuple[float, float]:
        import numpy as np

        decoder, past = self.decoder, self.decoder.empty_past(batch)

        def step(tokens: np.ndarray, start: int) -> np.ndarray:
            nonlocal past
            logits, past = decoder.forward(tokens, past, start)
            return logits[:, -1].argmax(-1)[:, None].astype(np.int64)

        start = time.perf_counter()
        token = step(np.array([ids] * batch, dtype=np.int64), 0)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(new_tokens):
            token = step(token, len(ids) + i)
        return ttft, time.perf_counter() - start

    def tokenize(self, prompt: str) -> list[int] | None:
        return None

    def close(self) -> None:
        self.decoder = None
