"""One module per export format that needs more than the merge's own files.

``onnx_builder`` streams a decoder graph straight from merged safetensors; ``onnx_torch`` exports the
transformers model with torch.onnx; ``onnx_export`` chooses between them, adds the files
onnxruntime-genai reads, saves the optimized graph and runs ONNX artifacts for verification.
``safetensors_quant`` writes int8/int4 compressed-tensors checkpoints; ``gguf_export`` writes GGUF files
for llama.cpp and Ollama (and LoRA-only GGUFs); ``tensorrt_export`` builds an engine (experimental).
"""
