"""Benchmark: a Q4_K_M GGUF from merged safetensors, ours against llama.cpp's route (issue 17, cost (a)).

    python benchmarks/gguf_kquants.py --size 0.6b
    python benchmarks/gguf_kquants.py --size 4b

The random-weight Qwen3-shaped model of benchmarks/merge_vs_peft.py (bf16, tied, vocabulary 151936) stands for a merged
model. Ours: ``export_gguf(merged, out, gguf_type="q4_k_m")`` (our numpy K-quants, no compiler). Theirs, as a user of
llama.cpp does it: its ``convert_hf_to_gguf.py --outtype bf16`` (from the llama-cpp-python sdist of the installed
version, downloaded from PyPI into the work folder), then its quantizer to Q4_K_M (``llama_model_quantize``, what
``llama-quantize`` runs, from the libllama the ``llamacpp`` extra built) on both cores. Each runs in its own process
after the page cache is warm; wall time and peak RSS come from wait4. The two files are then compared tensor by tensor
(bf16 values widen exactly to the float32 both quantizers start from, so the bytes should be identical).

Targets (issue 17): ours at most 1.0x their wall time (convert + quantize) and at most 1.5 GiB peak RSS.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from merge_vs_peft import bench_parser, settle, target_line, timed, write_base  # noqa: E402

TARGETS = {"wall_vs_llama_cpp": 1.0, "peak_rss_gib": 1.5}

OURS = """
import sys
from model_export.exporters.gguf_export import export_gguf
export_gguf(sys.argv[1], sys.argv[2], gguf_type="q4_k_m")
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


def converter(work: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py (with the gguf-py it imports) from the installed llama-cpp-python's sdist."""
    from importlib.metadata import version

    script = work / "llama.cpp" / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    wanted = version("llama-cpp-python")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"llama-cpp-python=={wanted}",
            "-d",
            str(work),
        ],
        check=True,
        capture_output=True,
    )
    prefix = f"llama_cpp_python-{wanted}/vendor/llama.cpp/"
    with tarfile.open(next(work.glob("llama_cpp_python-*.tar.gz"))) as sdist:
        members = [
            m
            for m in sdist.getmembers()
            if m.name.startswith(prefix)
            and (m.name == prefix + "convert_hf_to_gguf.py" or m.name.startswith(prefix + "gguf-py/"))
        ]
        for member in members:
            member.name = "llama.cpp/" + member.name[len(prefix) :]
            sdist.extract(member, work, filter="data")
    return script


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
    script = converter(work)
    settle(base)
    ours_dir, bf16, theirs = work / "ours", work / "bf16.gguf", work / "theirs-q4_k_m.gguf"
    ours = timed([sys.executable, "-c", OURS, str(base), str(ours_dir)])
    convert = timed([sys.executable, str(script), str(base), "--outtype", "bf16", "--outfile", str(bf16)])
    quantize = timed([sys.executable, "-c", QUANTIZE, str(bf16), str(theirs)])
    same, total = same_tensors(ours_dir / "model-q4_k_m.gguf", theirs)
    llama_wall = convert["wall_s"] + quantize["wall_s"]
    results = {
        "size": args.size,
        "ours": ours,
        "llama_cpp_convert_bf16": convert,
        "llama_cpp_quantize_q4_k_m": quantize,
        "llama_cpp_wall_s": round(llama_wall, 2),
        "wall_vs_llama_cpp": round(ours["wall_s"] / llama_wall, 3),
        "identical_tensors": f"{same}/{total}",
    }
    print(json.dumps(results, indent=2))
    print(f"wall vs llama.cpp: {results['wall_vs_llama_cpp']} {target_line(results['wall_vs_llama_cpp'], 1.0, 'x')}")
    print(f"peak RSS: {ours['peak_rss_gib']} GiB {target_line(ours['peak_rss_gib'], 1.5, ' GiB')}")
    (work / f"kquants-{args.size}.json").write_text(json.dumps(results, indent=2))
    if not args.keep:
        shutil.rmtree(ours_dir, ignore_errors=True)
        for path in (bf16, theirs):
            path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
