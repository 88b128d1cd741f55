"""A layer-streamed forward pass: base + adapter, the LoRA unmerged in fp32, one decoder layer in memory at a time.

Verification needs the logits and greedy continuation of base + adapter (what PEFT's unmerged model computes). Loading
that model whole costs 4 bytes per parameter in fp32 (16 GB at 4B). Here transformers builds the model on the meta
device (no memory), and hooks around each decoder layer widen that layer's tensors from the base's safetensors (a
mapping of the file whose pages are released after each read: merging/reader.py) into fp32 just before it runs; a
layer not kept goes into one of two buffers reused in turn. The LoRA updates are applied unmerged, as PEFT's layers do:
``W x + b + scaling * B (A x)`` (rsLoRA, rank and alpha patterns, lora bias), DoRA as PEFT computes it (for one
adapter or several side by side: merging/unmerged.py), LoRA on embeddings, and whole tensors the adapter saved
(modules_to_save, added tokens) in place of the base's. The embedding reads only the rows asked for; the head
multiplies in row blocks. The layers run in transformers' own code, so
attention, rotary embeddings, masks, the KV cache and ``generate`` are transformers'.

Two things make repeated passes cheap. ``max_memory`` keeps widened layers (then the head) resident, in order, up to
that many bytes, so a decoding step reads only the rest: the reference's greedy decoding then costs compute, not reads.
``adapter_index`` (adapter numbers broadcast to [batch, seq], -1 for the base alone; None: the adapter everywhere) says
which adapter applies at which position, so the base alone and base + adapter go through the same pass (the reference
scores the held-out text both ways at once), and so do several adapters on one base (``StreamedModel(base, [a, b])``:
a batch's references, each base layer read once for all of them; adapters that replace base tensors - saved whole
modules, added tokens, an untied head - cannot share the base's layers, see ``shares_base``).

    model = StreamedModel(base_dir, checkpoint, max_memory=8 << 30)      # (Qwen3, Qwen2, Llama, Mistral)
    logits = model(ids).logits                        # [batch, seq, vocab], fp32
    model.generate(ids, max_new_tokens=16, do_sample=False)

Which tensor is which comes from the merge's plan (merging.plan.make_plan), so the streamed model and the merge read the
adapter the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import i18n
from .reader import TRIM_EVERY, TensorReader, trim_heap
from .unmerged import adapted, lora_delta, lora_hook

__all__ = ["StreamedModel", "SUPPORTED", "shares_base", "streamable", "trim_heap"]

SUPPORTED = ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM")
HEAD_BLOCK_BYTES = 64 << 20  # the head's rows multiplied at a time, as fp32


def streamable(base_dir: str | Path, adapter_config: dict[str, Any] | None = None) -> str | None:
    """None when the layer-streamed pass covers this base (or artifact) and adapter; else why not (the run then uses
    transformers). A quantized folder is covered when it is compressed-tensors ``pack-quantized`` (what the int8/int4
    safetensors export writes) and the compressed-tensors package is installed."""
    import json

    config = json.loads((Path(base_dir) / "config.json").read_text(encoding="utf-8"))
    architecture = (config.get("architectures") or ["?"])[0]
    if architecture not in SUPPORTED:
        return i18n.ui("streamed_unsupported_arch", architecture=architecture, supported=", ".join(SUPPORTED))
    if adapter_config and adapter_config.get("fan_in_fan_out"):
        return i18n.ui("streamed_unsupported_adapter", feature="fan_in_fan_out")
    quantization = config.get("quantization_config")
    if quantization is not None:
        try:
            _scheme(quantization)
        except (ImportError, ValueError, TypeError, KeyError) as exc:
            return i18n.ui("streamed_unsupported_quantization", problem=str(exc)[:200])
    return None


def _scheme(quantization: Any):
    """The one compressed-tensors scheme of a pack-quantized config whose group targets every Linear layer, as the
    int8/int4 safetensors export writes it (ValueError for any other quantization)."""
    from compressed_tensors.quantization import QuantizationConfig

    if not isinstance(quantization, dict) or quantization.get("quant_method") != "compressed-tensors":
        raise ValueError(f"quant_method {quantization.get('quant_method') if isinstance(quantization, dict) else '?'}")
    parsed = QuantizationConfig.model_validate(quantization)
    if parsed.format != "pack-quantized" or len(parsed.config_groups) != 1:
        raise ValueError(f"compressed-tensors format {parsed.format} with {len(parsed.config_groups)} groups")
    scheme = next(iter(parsed.config_groups.values()))
    if list(scheme.targets) != ["Linear"] or scheme.weights is None or scheme.input_activations is not None:
        raise ValueError(f"compressed-tensors targets {scheme.targets}")
    return scheme


def shares_base(plan: Any, base: Any) -> bool:
    """Whether an adapter's plan runs on the base's own tensors (its LoRA updates aside), so that it can share a
    layer-streamed pass with other adapters: no whole tensor of its own in place of the base's, no untied head."""
    mine = {t.name: t for t in plan.tensors}
    return (
        not plan.untied
        and mine.keys() == {t.name for t in base.tensors}
        and all(mine[t.name].source_file == t.source_file and mine[t.name].shape == t.shape for t in base.tensors)
    )


class StreamedModel:
    """base + adapter with the LoRA unmerged in fp32, one decoder layer materialized at a time (see the module doc).

    Calls go to the transformers model (``model(ids)``, ``model.generate``); ``close()`` releases the files."""

    def __init__(
        self, base_dir: str | Path, checkpoint: str | Path | list[Any] | None = None, max_memory: int = 0
    ) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from ..checkpoint.adapter_format import read_adapter_config
        from ..checkpoint.base_model import inspect_base_model
        from .plan import adapter_plan, make_plan

        info = inspect_base_model(str(base_dir))
        several = isinstance(checkpoint, (list, tuple))
        checkpoints = list(checkpoint) if several else [] if checkpoint is None else [checkpoint]
        plans = [adapter_plan(Path(c), read_adapter_config(Path(c)), info, "fp32", False)[0] for c in checkpoints]
        plan = plans[0] if len(plans) == 1 and not several else make_plan({}, {}, {}, info, "fp32", False)
        if several and not all(shares_base(p, plan) for p in plans):
            raise ValueError("adapters that replace base tensors cannot share one layer-streamed pass (shares_base)")
        self.tensors = {t.name: t for t in plan.tensors}
        # each tensor's LoRA updates: (adapter number, update), the number adapter_index selects it by
        self.loras: dict[str, list[tuple[int, Any]]] = {}
        for number, adapter in enumerate(plans):
            for tensor in adapter.tensors:
                if tensor.lora is not None:
                    self.loras.setdefault(tensor.name, []).append((number, tensor.lora))
        self.scheme = _scheme(info.config["quantization_config"]) if "quantization_config" in info.config else None
        config = AutoConfig.from_pretrained(str(base_dir))
        if self.scheme is not None:  # the layers are built plain; their weights are unpacked as each layer runs
            del config.quantization_config
        for key in ("tie_word_embeddings", "vocab_size"):
            if key in plan.config:
                setattr(config, key, plan.config[key])
        config._attn_implementation = "sdpa"
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        self.model, self.config, self.reader = model.eval(), config, TensorReader()
        eos = model.generation_config.eos_token_id if model.generation_config else config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self._hooks = []
        self.on_layer: Any = None  # called after each decoder layer has run (progress)
        self._layers_run = 0
        self.adapter_index: Any = None  # adapter numbers broadcast to [batch, seq], -1 the base (None: adapter 0)
        self._positions: Any = None  # each adapter's positions in adapter_index (unmerged.positions)
        self._stacked: dict = {}  # several adapters' LoRA matrices stacked for this pass (unmerged.stacked)
        # Widened layers kept between passes, in order, up to max_memory bytes (then the head): see the module doc.
        self.max_memory, self.resident, self.resident_bytes = max(int(max_memory), 0), {}, 0
        # The next layer is read and widened by a thread of its own while this one computes (its own file handles:
        # the main thread reads embedding rows and head blocks meanwhile): two layers in memory at most. The thread
        # widens on one core: a second thread with a team of its own would leave more OpenMP threads than cores, and
        # libgomp then stops spinning between parallel regions, making the main thread's small ops (GPTQ's column
        # loop: 2.5x) wait for a wake-up each.
        from concurrent.futures import ThreadPoolExecutor

        reader = ThreadPoolExecutor(1, "layer-reader", initializer=torch.set_num_threads, initargs=(1,))
        self._ahead, self._ahead_reader, self._next = reader, TensorReader(), None
        self._layer_params = [{name: p.shape for name, p in layer.named_parameters()} for layer in model.model.layers]
        # Two sets of fp32 buffers the layers not kept resident are widened into, in turn (one computes while the
        # reader thread fills the other): new memory for every layer on every pass cost more than the widening itself.
        self._slots: list[dict[str, Any]] = [{}, {}]
        self._turn = 0
        self._bind(model)

    # ---- wiring ------------------------------------------------------------------------------------------
    def _bind(self, model: Any) -> None:
        import torch

        inner = model.model
        # Buffers computed in __init__ (rotary inv_freq) were made on meta: make them again for real.
        inner.rotary_emb = type(inner.rotary_emb)(config=self.config)
        inner.norm.weight = torch.nn.Parameter(self.reader.read(self.tensors["model.norm.weight"]), requires_grad=False)
        inner.embed_tokens = _embedding_module(self, "model.embed_tokens.weight")
        head = "lm_head.weight" if "lm_head.weight" in self.tensors else "model.embed_tokens.weight"
        model.lm_head = _head_module(self, head)
        for index, layer in enumerate(inner.layers):
            prefix = f"model.layers.{index}"
            self._hooks.append(layer.register_forward_pre_hook(self._loader(index)))
            self._hooks.append(layer.register_forward_hook(self._unloader()))
            for name, module in layer.named_modules():
                loras = self.loras.get(f"{prefix}.{name}.weight")
                if isinstance(module, torch.nn.Linear) and loras:
                    self._hooks.append(module.register_forward_hook(lora_hook(self, loras)))

    def _loader(self, index: int):
        def load(layer: Any, args: Any) -> None:
            if index in self.resident:
                for name, tensor in self.resident[index].items():
                    _set(layer, name, tensor)
                return
            ahead, self._next = self._next, None
            if ahead is not None and ahead[0] != index:  # a layer read for a pass that did not come
                weights, kept = ahead[1].result(), ahead[2]
                if kept:
                    self.resident[ahead[0]] = weights
                ahead = None
            if ahead is None:
                kept = self._admit_layer(index)
                weights = self._read_layer(index, self.reader, self._buffers(index, kept))
            else:
                weights, kept = ahead[1].result(), ahead[2]
            for name, tensor in weights.items():
                _set(layer, name, tensor)
            if kept:
                self.resident[index] = weights
            following = self._following(index)  # the next layer not resident (after the last, the next pass's first)
            if following is not None:
                kept = self._admit_layer(following)
                buffers = self._buffers(following, kept)
                read = self._ahead.submit(self._read_layer, following, self._ahead_reader, buffers)
                self._next = (following, read, kept)

        return load

    def _admit_layer(self, index: int) -> bool:
        """Whether a layer's widened weights are kept between passes: while they fit in max_memory (in order)."""
        return self.admit(sum(4 * shape.numel() for shape in self._layer_params[index].values()))

    def _buffers(self, index: int, kept: bool) -> dict[str, Any] | None:
        """Where a layer's weights are widened: None (new memory, kept resident) or the next set of buffers in turn,
        made (on this thread) the first time a shape is asked for."""
        if kept:
            return None
        import torch

        slot, self._turn = self._slots[self._turn], 1 - self._turn
        for name, shape in self._layer_params[index].items():
            if name not in slot or slot[name].shape != shape:
                slot[name] = torch.empty(shape, dtype=torch.float32)
        return slot

    def admit(self, size: int) -> bool:
        """Whether ``size`` more bytes fit in max_memory beside what is kept; if so they are counted as kept."""
        if self.resident_bytes + size > self.max_memory:
            return False
        self.resident_bytes += size
        return True

    def _following(self, index: int) -> int | None:
        count = len(self._layer_params)
        for step in range(1, count + 1):
            candidate = (index + step) % count
            if candidate not in self.resident:
                return candidate
        return None

    def _read_layer(self, index: int, reader: TensorReader, buffers: dict[str, Any] | None) -> dict[str, Any]:
        names = self._layer_params[index]
        return {name: self._weight(f"model.layers.{index}.{name}", reader, (buffers or {}).get(name)) for name in names}

    def _weight(self, name: str, reader: TensorReader | None = None, out: Any = None):
        """A parameter as fp32: read and widened (into ``out`` when given), or for a compressed-tensors layer unpacked
        and dequantized by compressed-tensors itself (its ``decompress``, the code transformers runs) from the packed
        weight and scale."""
        reader, planned = reader or self.reader, self.tensors.get(name)
        if planned is not None or self.scheme is None or not name.endswith(".weight"):
            planned = planned if planned is not None else self.tensors[name]
            return reader.read(planned) if out is None else reader.into(planned, out)
        from compressed_tensors.compressors import PackedQuantizationCompressor

        stem = name.removesuffix(".weight")
        parts = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
        names = {part: f"{stem}.{part}" for part in parts if f"{stem}.{part}" in self.tensors}
        state = {part: reader.native(self.tensors[name]) for part, name in names.items()}
        return PackedQuantizationCompressor.decompress(state, self.scheme)["weight"].float()

    def _unloader(self):
        def unload(layer: Any, args: Any, output: Any) -> None:
            for name, param in list(layer.named_parameters()):
                _set(layer, name, param.new_empty(param.shape, device="meta"))
            self._layers_run += 1
            if self._layers_run % TRIM_EVERY == 0:
                trim_heap()
            if self.on_layer is not None:
                self.on_layer()

        return unload

    # ---- the model's API -------------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)

    @property
    def device(self) -> Any:
        import torch

        return torch.device("cpu")

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        if self._next is not None:
            self._next[1].cancel()
            self._next = None
        self._ahead.shutdown(wait=True)
        self.reader.close()
        self._ahead_reader.close()
        self.resident.clear()
        self._slots, self._stacked, self._positions = [{}, {}], {}, None
        self.model.lm_head.resident, self.model.lm_head.blocks = None, []


def _set(module: Any, name: str, tensor: Any) -> None:
    import torch

    *path, leaf = name.split(".")
    for part in path:
        module = getattr(module, part)
    module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)


def _embedding_module(owner: StreamedModel, name: str):
    import torch

    class StreamedEmbedding(torch.nn.Module):
        """Only the rows asked for are read; PEFT's LoRA on embeddings is added as it computes it."""

        def __init__(self) -> None:
            super().__init__()
            self.planned = owner.tensors[name]
            self.num_embeddings, self.embedding_dim = self.planned.shape

        @property
        def weight(self) -> Any:  # generate() asks for the embedding's dtype and device
            return torch.empty(self.planned.shape, dtype=torch.float32, device="meta")

        def forward(self, ids: Any) -> Any:
            flat = ids.reshape(-1)
            unique, inverse = torch.unique(flat, return_inverse=True)
            rows = torch.stack([owner.reader.read(self.planned, int(i), int(i) + 1)[0] for i in unique])
            out = rows[inverse].reshape(*ids.shape, self.embedding_dim)
            loras = owner.loras.get(name)
            if not loras:
                return out

            def change(lora: Any, pick: Any) -> Any:
                A, B = torch.from_numpy(lora.A).float(), torch.from_numpy(lora.B).float()
                return pick(out) + torch.nn.functional.embedding(pick(ids), A.T) @ B.T * lora.scaling

            return adapted(owner, loras, out, change)

    return StreamedEmbedding()


def _head_module(owner: StreamedModel, name: str):
    import torch

    class StreamedHead(torch.nn.Module):
        """hidden @ W.T in blocks of rows read from disk (or whole, kept resident when max_memory has room after the
        layers); the head's LoRA (when it has one) added unmerged. The reader thread widens the next block into the
        second of two kept buffers while this one multiplies."""

        def __init__(self) -> None:
            super().__init__()
            self.planned = owner.tensors[name]
            self.loras = owner.loras.get("lm_head.weight")
            self.resident: Any = None
            self.blocks: list[Any] = []  # two buffers of the rows read at a time when not resident, used in turn

        def forward(self, hidden: Any) -> Any:
            rows, width = self.planned.shape
            if self.resident is None and owner.admit(rows * width * 4):
                self.resident = owner.reader.read(self.planned)
            if self.resident is not None:
                logits = torch.nn.functional.linear(hidden, self.resident)
            else:
                logits = torch.cat(list(self._blocks(hidden, rows, width)), dim=-1)
            if not self.loras:
                return logits
            return adapted(owner, self.loras, logits, lambda lora, pick: pick(logits) + lora_delta(lora, pick(hidden)))

        def _blocks(self, hidden: Any, rows: int, width: int):
            step = min(rows, max(1, HEAD_BLOCK_BYTES // (4 * width)))
            if not self.blocks or self.blocks[0].shape != (step, width):
                self.blocks = [torch.empty((step, width), dtype=torch.float32) for _ in range(2)]
            starts = range(0, rows, step)

            def widen(k: int) -> Any:  # on the reader thread, with its own reader
                start, stop = starts[k], min(rows, starts[k] + step)
                return owner._ahead_reader.into(self.planned, self.blocks[k % 2][: stop - start], start, stop)

            pending = owner._ahead.submit(widen, 0)
            for k in range(len(starts)):
                weight = pending.result()
                if k + 1 < len(starts):  # the other buffer: the block before it has been multiplied
                    pending = owner._ahead.submit(widen, k + 1)
                yield torch.nn.functional.linear(hidden, weight)

    return StreamedHead()
