"""Benchmark: a Q4_K_M GGUF from merged safetensors, ours against llama.cpp's route (issue 17, cost (a)).

    python benchmarks/gguf_kquants.py --size 0.6b
    python benchmarks/gguf_kquants.py --size 4b

The random-weight Qwen3-shaped model of benchmarks/merge_vs_peft.py (bf16, tied, vocabulary 151936) stands for a merged
model. Ours: ``export_gguf(merged, out, gguf_type="q4_k_m")``, twice: with our numpy K-quants (what every install
without llama.cpp runs, no compiler) and with llama.cpp's ggml_quantize_chunk (what the export calls where the
``llamacpp`` extra is installed, quantize/ggml_quants.py). Theirs, as a user of
llama.cpp does it: a bf16 GGUF first, then llama.cpp's quantizer to Q4_K_M (``llama_model_quantize``, what
``llama-quantize`` runs, from the libllama the ``llamacpp`` extra built) on both cores. llama.cpp's own
``convert_hf_to_gguf.py`` refuses this model's tokenizer (a BPE trained here, whose pre-tokenizer hash it does not
know, and it wants sentencepiece), so the bf16 GGUF is written by our exporter (``gguf_type="bf16"``: the same
gguf-py writer and the same bf16 tensors the converter writes; it stands in for the converter's time). Each runs in its
own process after the page cache is warm; wall time and peak RSS come from wait4. The two Q4_K_M files are then
compared tensor by tensor (bf16 widens exactly to the float32 both quantizers start from: the bytes should be equal).

Targets (issue 17): ours at most 1.0x their wall time (convert + quantize) and at most 1.5 GiB peak RSS.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from merge_vs_peft import bench_parser, settle, target_line, timed, write_base  # noqa: E402

TARGETS = {"wall_vs_llama_cpp": 1.0, "peak_rss_gib": 1.5}

TO_BF16 = """
import sys
from model_export.exporters.gguf_export import export_gguf
export_gguf(sys.argv[1], sys.argv[2], gguf_type="bf16")
"""

OURS = """
import sys
from model_export.quantize import ggml_quants
if sys.argv[3] == "numpy":
    ggml_quants._LOADED.append(None)  # as without llama-cpp-python
from model_export.exporters.gguf_export import export_gguf
quantizer = export_gguf(sys.argv[1], sys.argv[2], gguf_type="q4_k_m")["quantizer"]
assert quantizer.startswith("llama.cpp") == (sys.argv[3] == "ggml"), quantizer
"""

QUANTIZE = """
import ctypes, sys
import gguf, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.nthread = 2
params.ftype = int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
llama_cpp.llama_backend_init()
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""


def same_tensors(ours: Path, theirs: Path) -> tuple[int, int]:
    import gguf
    import numpy as np

    a = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(theirs)).tensors}
    same = sum(
        1
        for name, t in b.items()
        if name in a
        and a[name].tensor_type == t.tensor_type
        and np.array_equal(np.asarray(a[name].data).view(np.uint8), np.asarray(t.data).view(np.uint8))
    )
    return same, len(b)


def main() -> None:
    parser = bench_parser(__doc__, str(Path(tempfile.gettempdir()) / "model-export-kquants"))
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    base = work / f"base-{args.size}"
    if not base.is_dir():
        write_base(base, args.size)
    settle(base)
    ours_dir, bf16, theirs = work / "ours", work / "bf16.gguf", work / "theirs-q4_k_m.gguf"
    ours = timed([sys.executable, "-c", OURS, str(base), str(ours_dir), "numpy"])
    ours_ggml = timed([sys.executable, "-c", OURS, str(base), str(work / "ours-ggml"), "ggml"])
    convert = timed([sys.executable, "-c", TO_BF16, str(base), str(work / "bf16")])
    (work / "bf16" / "model-bf16.gguf").replace(bf16)
    quantize = timed([sys.executable, "-c", QUANTIZE, str(bf16), str(theirs)])
    same, total = same_tensors(ours_dir / "model-q4_k_m.gguf", theirs)
    same_ggml, _ = same_tensors(work / "ours-ggml" / "model-q4_k_m.gguf", theirs)
    llama_wall = convert["wall_s"] + quantize["wall_s"]
    results = {
        "size": args.size,
        "ours": ours,
        "ours_with_llama_cpp_quantizer": ours_ggml,
        "bf16_gguf_for_llama_cpp": convert,
        "llama_cpp_quantize_q4_k_m": quantize,
        "llama_cpp_wall_s": round(llama_wall, 2),
        "wall_vs_llama_cpp": round(ours["wall_s"] / llama_wall, 3),
        "identical_tensors": f"{same}/{total}",
        "with_llama_cpp_quantizer_wall_vs_llama_cpp": round(ours_ggml["wall_s"] / llama_wall, 3),
        "with_llama_cpp_quantizer_identical_tensors": f"{same_ggml}/{total}",
    }
    print(json.dumps(results, indent=2))
    print(f"wall vs llama.cpp: {results['wall_vs_llama_cpp']} {target_line(results['wall_vs_llama_cpp'], 1.0, 'x')}")
    print(f"peak RSS: {ours['peak_rss_gib']} GiB {target_line(ours['peak_rss_gib'], 1.5, ' GiB')}")
    ratio = results["with_llama_cpp_quantizer_wall_vs_llama_cpp"]
    print(f"with llama.cpp's quantizer: {ratio} {target_line(ratio, 1.0, 'x')}, {ours_ggml['peak_rss_gib']} GiB")
    (work / f"kquants-{args.size}.json").write_text(json.dumps(results, indent=2))
    if not args.keep:
        shutil.rmtree(ours_dir, ignore_errors=True)
        shutil.rmtree(work / "ours-ggml", ignore_errors=True)
        for path in (bf16, theirs):
            path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
