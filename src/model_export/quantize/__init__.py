"""Stage 3, quantization: the calibration data (calibration), GPTQ's levels (gptq) and llama.cpp's importance matrix
(imatrix) collected in one layer-streamed pass; the GGUF tensor types llama-quantize would choose (gguf_types) and the
K-quant encodings byte for byte (kquants); which modules stay unquantized in every format (keep)."""
