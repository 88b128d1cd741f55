"""llama.cpp (llama-cpp-python): a GGUF file, fed token ids, on the CPU."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from .base import Runtime, threads

__all__ = ["LlamaCppRuntime", "llama_cpp_run", "gguf_pair", "mapped"]


def gguf_pair(artifact: Path) -> tuple[Path, Path | None]:
    """(model, LoRA adapter or None) for a GGUF: a model file stands alone; a LoRA adapter GGUF (general.type adapter)
    runs on the base its folder's Ollama Modelfile names (FROM, relative to the Modelfile, and ADAPTER naming this
    file), as Ollama reads it. Raises ExportFormatError when the Modelfile is missing or does not name them."""
    from ..errors import ExportFormatError
    from .gguf_file import read_gguf

    artifact = Path(artifact)
    if read_gguf(artifact).fields.get("general.type") != "adapter":
        return artifact, None
    modelfile = artifact.parent / "Modelfile"
    lines = modelfile.read_text(encoding="utf-8").splitlines() if modelfile.is_file() else []
    named = dict(line.split(None, 1) for line in lines if line.startswith(("FROM ", "ADAPTER ")))
    base = (artifact.parent / named["FROM"].strip()).resolve() if "FROM" in named else None
    adapter = (artifact.parent / named["ADAPTER"].strip()).resolve() if "ADAPTER" in named else None
    if base is None or not base.is_file() or adapter != artifact.resolve():
        raise ExportFormatError(
            "gguf_readback_failed",
            path=str(modelfile),
            detail=f"its FROM must name an existing base GGUF and its ADAPTER {artifact.name}",
        )
    return base, artifact


def llama_cpp_run(artifact: Path, tokens: list[int], new_tokens: int) -> tuple[Any, list[int]]:
    """Prompt logits and greedy continuation of a GGUF in llama.cpp (llama-cpp-python), fed the reference's token
    ids."""
    llm = _verifier(artifact, len(tokens) + new_tokens)
    try:
        return _generate(llm, tokens, new_tokens)
    finally:
        llm.close()


EXTRA_BUFFERS_ENV = "MODEL_EXPORT_LLAMA_EXTRA_BUFFERS"


def extra_buffers() -> bool:
    """Whether llama.cpp may put weights in its extra buffer types (AMX tiles, CPU-repacked blocks): yes, except on a
    CPU with AMX, where llama-cpp-python 0.3.36's AMX matrix multiply (built natively, as pip builds it) crashed the
    process with SIGSEGV on every quantized GGUF here (q8_0, q4_k_m; f32 files do not use it). ``MODEL_EXPORT_LLAMA_
    EXTRA_BUFFERS=1`` or ``0`` decides instead."""
    given = os.environ.get(EXTRA_BUFFERS_ENV, "")
    if given in ("0", "1"):
        return given == "1"
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return True
    return " amx_int8" not in flags and " amx_tile" not in flags


def load_llama(**kwargs: Any) -> Any:
    """``llama_cpp.Llama(**kwargs)``, with llama.cpp's extra buffer types off where extra_buffers() says so (the model
    parameter llama.cpp's own ``--no-repack`` sets, which Llama() does not take as an argument), and the threads that
    evaluate a batch of tokens (a prompt, a sequence scored) as many as ``n_threads``: llama-cpp-python's default is
    every core, so two workers of a batch, each given one, spun four threads on two cores and each scored 3x slower
    (0.6B bf16, 384 tokens: 15.7 s each side by side against 8.8 s with one thread each)."""
    import llama_cpp.llama_cpp as api
    from llama_cpp import Llama

    kwargs.setdefault("n_threads_batch", kwargs.get("n_threads") or threads())

    if extra_buffers():
        return Llama(**kwargs)
    default = api.llama_model_default_params

    def without_extra_buffers() -> Any:
        params = default()
        params.use_extra_bufts = False
        return params

    api.llama_model_default_params = without_extra_buffers
    try:
        return Llama(**kwargs)
    finally:
        api.llama_model_default_params = default


def mapped(model: Path) -> bool:
    """Whether llama.cpp maps the GGUF rather than reading it into memory of its own: unless it repacks quantized
    weights for the CPU's kernels (extra_buffers() and a quantized tensor), where the file's pages stayed resident
    beside the repacked copy (twice the file in RSS). Mapped, a file just written is taken from the page cache
    (0.6B bf16: 0.27 s to load against 0.9-1.1 s read, the same peak)."""
    from .gguf_file import read_gguf

    return not extra_buffers() or all(t.tensor_type.name in _FLOAT_TYPES for t in read_gguf(model).tensors)


_FLOAT_TYPES = {"F32", "F16", "BF16"}


def _verifier(artifact: Path, longest: int) -> Any:
    """The GGUF loaded once for verification: logits of every position, an f32 KV cache (llama.cpp's default is f16,
    so an f32 file is judged on its weights, not on the cache's rounding), a context for the longest input; mapped
    where llama.cpp does not repack it (mapped())."""
    model, lora = gguf_pair(artifact)
    return load_llama(
        model_path=str(model),
        lora_path=str(lora) if lora else None,
        n_ctx=longest + 8,
        logits_all=True,
        verbose=False,
        n_threads=threads(),
        seed=0,
        type_k=0,
        type_v=0,
        use_mmap=mapped(model),
    )


def _generate(llm: Any, tokens: list[int], new_tokens: int) -> tuple[Any, list[int]]:
    """One input from an empty context: its prompt logits, then greedy tokens (stopping after end-of-sequence); the
    tests compare llama.cpp's generation with transformers' with it."""
    import numpy as np

    logits = _scores(llm, tokens)
    generated, last, eos = [], logits[-1], llm.token_eos()
    for _ in range(new_tokens):
        token = int(last.argmax())
        generated.append(token)
        if token == eos:
            break
        llm.eval([token])
        last = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    return logits, generated


def _scores(llm: Any, tokens: list[int]) -> Any:
    """One sequence from an empty context: the logits at every position."""
    import numpy as np

    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


class LlamaCppRuntime(Runtime):
    """A GGUF in llama.cpp. Verification loads it once and runs each input from an empty context (logits of every
    position); the benchmark decodes in one context of 2048 tokens."""

    name = "llama.cpp"
    batches = False  # llama-cpp-python's Llama holds one sequence

    def __init__(self, path: Path) -> None:
        from llama_cpp import Llama  # noqa: F401 - fail early with the import error when llama-cpp-python is missing

        self.path, self.device, self._llm = Path(path), "cpu", None

    def score(self, sequences: list[Any], batch_size: int = 1) -> list[Any]:
        import torch

        llm = _verifier(self.path, max(ids.numel() for ids in sequences))
        try:
            return [torch.from_numpy(_scores(llm, [int(i) for i in ids])) for ids in sequences]
        finally:
            llm.close()

    @property
    def llm(self) -> Any:
        if self._llm is None:
            model, lora = gguf_pair(self.path)
            self._llm = load_llama(
                model_path=str(model),
                lora_path=str(lora) if lora else None,
                n_ctx=2048,
                verbose=False,
                n_threads=threads(),
            )
        return self._llm

    def tokenize(self, prompt: str) -> list[int]:
        """The GGUF's own tokenizer and chat template (a GGUF folder has no Hugging Face tokenizer)."""
        text = self.llm.metadata.get("tokenizer.chat_template")
        if text:
            from jinja2 import Template

            text = Template(text).render(messages=[{"role": "user", "content": prompt}], add_generation_prompt=True)
        return self.llm.tokenize((text or prompt).encode("utf-8"), add_bos=False, special=True)

    def timed(self, ids: list[int], new_tokens: int, batch: int = 1) -> tuple[float, float]:
        import numpy as np

        llm = self.llm
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        ttft = time.perf_counter() - start
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        start = time.perf_counter()
        for _ in range(new_tokens):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        return ttft, time.perf_counter() - start

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None
