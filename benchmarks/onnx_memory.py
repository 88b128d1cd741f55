"""Benchmark: what onnxruntime alone holds for an exported graph, with and without its memory options (issue 16).

    python benchmarks/onnx_memory.py /tmp/model-export-full-run/out-4b-auto/export/onnx/model.onnx

Each option set runs in its own process: load the graph as verification does (``OnnxDecoder``), run 90 prompt tokens
and 8 greedy steps, print the resident memory after loading, after running and at peak. Options: ``default``;
``noarena`` (``enable_cpu_mem_arena = False``); ``devinit`` (``session.use_device_allocator_for_initializers``);
``noprepack`` (``session.disable_prepacking``: the int4 kernels then work from the file's blocks, much slower).
"""

from __future__ import annotations

import argparse
import subprocess
import sys

PROBE = """
import resource, sys, time
import onnxruntime as ort
from model_export.runtimes.ort import OnnxDecoder

mode, graph = sys.argv[1], sys.argv[2]
plain = ort.SessionOptions


def options():
    o = plain()
    if "noarena" in mode:
        o.enable_cpu_mem_arena = False
    if "devinit" in mode:
        o.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
    if "noprepack" in mode:
        o.add_session_config_entry("session.disable_prepacking", "1")
    return o


def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 2**20


ort.SessionOptions = options
start = time.perf_counter()
decoder = OnnxDecoder(graph)
loaded = rss()
decoder.generate(list(range(100, 190)), 8)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(f"{mode}: {loaded:.2f} GiB loaded, {rss():.2f} GiB after running, {peak:.2f} GiB peak, "
      f"{time.perf_counter() - start:.1f} s")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("graph")
    parser.add_argument("--modes", default="default,noarena,devinit,noarena-devinit")
    args = parser.parse_args()
    for mode in args.modes.split(","):
        subprocess.run([sys.executable, "-c", PROBE, mode, args.graph], check=True)


if __name__ == "__main__":
    main()
