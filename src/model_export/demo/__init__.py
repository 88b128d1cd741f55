"""The bundled demo: a tiny Qwen3-architecture model, a real LoRA run on it, and the tool run on the result."""
