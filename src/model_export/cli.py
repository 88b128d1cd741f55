"""The model-export command line: one subcommand per public function, nothing more.

Exit codes: 0 success; 1 a failure the tool explains (ExportError); 2 a usage or configuration
error; 130 after Ctrl-C. Anything that is not an ExportError is explained too (errors.explain: ME406 for
a MemoryError, ME998 for Ctrl-C, ME999 for a fault of our own), as one message without a traceback;
--debug shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import i18n
from .console import STATUS_STYLE, print_batch, print_benchmark, print_run
from .errors import ExportError, explain
from .monitoring import setup_logging


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--lang", choices=i18n.LANGUAGES, default=argparse.SUPPRESS, help="message language (default: from the locale)"
    )
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    common.add_argument(
        "--log-level", default=argparse.SUPPRESS, choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
    )
    common.add_argument("--log-file", default=argparse.SUPPRESS, help="also write the log to this file")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="model-export",
        parents=[common],
        description="Turn a LoRA fine-tuning run into validated deployment artifacts.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable, help: str, json_flag: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        if json_flag:
            p.add_argument("--json", action="store_true", help="print machine-readable JSON")
        p.set_defaults(func=func)
        return p

    for add in (_run_command, _inspect_commands, _merge_command, _benchmark_command, _config_commands, _demo_command):
        add(command)
    return parser


Command = Callable[..., argparse.ArgumentParser]


def _run_command(command: Command) -> None:
    p = command("run", _run, "run the whole pipeline: detect, check, merge, export, verify, report (resumable)")
    p.add_argument("config", nargs="?", help="YAML or JSON configuration (default: the defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _inspect_commands(command: Command) -> None:
    p = command("doctor", _doctor, "check Python, packages, GPU, disk space, checkpoint and hub access")
    p.add_argument("--checkpoint", help="training output or adapter directory to check as well")
    p.add_argument("--base", help="base model (local directory or hub id) for the disk estimate and fit check")
    p.add_argument("--output-dir", default=".", help="where artifacts would be written (for free space)")

    p = command("detect", _detect, "find the checkpoint to export in a training output directory")
    p.add_argument(
        "path", nargs="?", help="training output or adapter directory (default: checkpoint_path of --config)"
    )
    _config_options(p)

    p = command("check", _check, "validate a checkpoint and its fit to the base model, without loading base weights")
    p.add_argument(
        "checkpoint", nargs="?", help="training output or adapter directory (default: checkpoint_path of --config)"
    )
    p.add_argument(
        "--base", help="base model: local directory or hub id (default: base_model_name, else adapter_config.json's)"
    )
    _config_options(p)


def _merge_command(command: Command) -> None:
    p = command("merge", _merge, "merge a LoRA adapter into its base model, streaming tensor by tensor")
    p.add_argument("--adapter", help="adapter or training output directory (default: checkpoint_path of --config)")
    p.add_argument(
        "--base", help="base model: local directory or hub id (default: base_model_name, else adapter_config.json's)"
    )
    p.add_argument("--out", help="output directory (default: <output_dir>/merge)")
    p.add_argument(
        "--dtype",
        choices=["auto", "bf16", "fp16", "fp32"],
        help="output dtype (auto: the base's; default: from quantization_level, as the run merges)",
    )
    p.add_argument("--max-shard-size", type=_size, help="largest shard, e.g. 5GB (default: max_shard_size)")
    p.add_argument("--format", choices=["safetensors", "pytorch"], default="safetensors")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="where the update math runs (default: device_map)")
    _config_options(p)


def _benchmark_command(command: Command) -> None:
    p = command(
        "benchmark",
        _benchmark,
        "benchmark every artifact of a run (or one artifact): load time, first token, decode speed, memory",
    )
    p.add_argument(
        "target",
        help="a run's output_dir (run.json), a batch's (batch.json), or one artifact: a model folder, an ONNX folder "
        "or .onnx, a GGUF folder or .gguf, a TensorRT folder",
    )
    p.add_argument(
        "--prompt",
        default=None,
        help="prompt, formatted with the chat template (default: the first test_input_samples)",
    )
    p.add_argument("--new-tokens", type=_positive, default=32)
    p.add_argument("--batch-size", type=_positive, default=1, help="also measure decode speed at this batch size")
    p.add_argument("--repeats", type=_positive, default=3, help="timed runs after one warm-up; medians are reported")
    p.add_argument(
        "--device",
        choices=["cpu", "cuda", "auto"],
        default="auto",
        help="where transformers runs (auto: the GPU when there is one); onnxruntime and llama.cpp run on the CPU",
    )


def _demo_command(command: Command) -> None:
    p = command(
        "demo", _demo, "fine-tune a LoRA on the bundled tiny model, then run the whole pipeline on it (offline)"
    )
    p.add_argument("--workdir", default=".", help="where qwen3-finetuned/ and export-demo/ go (default: here)")


def _config_commands(command: Command) -> None:
    p = command("validate-config", _validate_config, "report every problem of a YAML or JSON configuration")
    p.add_argument("file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    p = command("init-config", _init_config, "write a commented example configuration", json_flag=False)
    p.add_argument("path", nargs="?", default="model-export.yaml")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")


def _positive(text: str) -> int:
    """An argparse type: an integer of at least 1 (a bad value is a usage error, exit code 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _size(text: str) -> str:
    """An argparse type: a size such as 5GB, 500MB or 2GiB, larger than 0."""
    from .config import parse_size

    try:
        if parse_size(text) > 0:
            return text
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    raise argparse.ArgumentTypeError(f"must be larger than 0, got {text!r}")


def _config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--selection", choices=["latest", "best"], help="default: checkpoint_selection (latest)")
    p.add_argument("--config", help="YAML or JSON configuration to take defaults and logging settings from")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _log_level(args: argparse.Namespace, configured: str = "INFO") -> str:
    """--debug means DEBUG (third-party warnings and bars come through too); else --log-level; else the
    configuration's."""
    return "DEBUG" if getattr(args, "debug", False) else getattr(args, "log_level", configured)


def _load(args: argparse.Namespace):
    """The configuration named by --config/--set (defaults otherwise); its lang and logging apply unless flags say
    else."""
    from .config_file import load_config

    config = load_config(args.config, args.overrides)
    if config.lang and "lang" not in vars(args):
        i18n.set_language(config.lang)
    setup_logging(_log_level(args, config.log_level), getattr(args, "log_file", config.log_file))
    return config


def _emit(args: argparse.Namespace, data: Any, human: Callable[[Console], None]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, ensure_ascii=False, indent=2, default=str))
    else:
        human(Console(highlight=False, soft_wrap=True, markup=False))


def _run(args: argparse.Namespace) -> int:
    from .config_file import load_config
    from .pipeline.batch import run

    config = load_config(args.config, args.overrides)
    if config.lang and "lang" not in vars(args):
        i18n.set_language(config.lang)
    # --debug, --log-level and --log-file on the command line win over the configuration's log_level and log_file.
    config.log_level = _log_level(args, config.log_level)
    config.log_file = getattr(args, "log_file", config.log_file)
    result = run(config)
    if hasattr(result, "adapters"):  # a batch: its exit code says whether any adapter or artifact failed
        _emit(args, result.to_dict(), lambda console: print_batch(console, result))
        return 0 if result.passed is not False else 1
    _emit(args, result.to_dict(), lambda console: print_run(console, "model-export", result.steps, result.report))
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from .doctor import doctor

    report = doctor(checkpoint=args.checkpoint, base_model=args.base, output_dir=args.output_dir)

    def human(console: Console) -> None:
        table = Table(title=i18n.ui("doctor_title"))
        for column in ("doctor_check", "doctor_status", "doctor_detail"):
            table.add_column(i18n.ui(column), overflow="fold")
        for c in report.checks:
            table.add_row(c.name, Text(c.status, style=STATUS_STYLE[c.status]), c.detail)
        console.print(table)
        console.print(
            i18n.ui(
                "doctor_summary", failed=report.count("fail"), warned=report.count("warn"), passed=report.count("ok")
            )
        )

    _emit(args, report.to_dict(), human)
    return 1 if report.failed else 0


def _detect(args: argparse.Namespace) -> int:
    from .checkpoint.detect import detect

    config = _load(args)
    result = detect(args.path or config.checkpoint_path, args.selection or config.checkpoint_selection)

    def human(console: Console) -> None:  # skipped candidates were logged (stderr) by detect, each once
        console.print(i18n.ui("detected", path=result.selected))
        if result.trained_on:  # a QLoRA adapter: which base it was trained on
            console.print(i18n.ui("detect_trained_on", named=result.trained_on))

    _emit(args, result.to_dict(), human)
    return 0


def _check(args: argparse.Namespace) -> int:
    from .checkpoint.validate import check

    report = check(args.checkpoint, args.base, args.selection, config=_load(args))

    def human(console: Console) -> None:
        console.print(Text(i18n.ui("check_ok", path=report.path), style="green"))
        console.print(
            i18n.ui(
                "check_summary",
                rank=report.rank,
                alpha=report.lora_alpha,
                modules=report.num_modules,
                tensors=report.num_tensors,
                file=report.weights_file,
            )
        )
        if report.fit_checked:
            console.print(i18n.ui("check_fit", base=report.base_model))
        if report.base_quantization:
            console.print(report.base_quantization)
        for warning in report.warnings:
            console.print(Text(str(warning), style="yellow"))

    _emit(args, report.to_dict(), human)
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .merging.merger import ModelMerger

    config = _load(args)
    options = {"format": args.format}  # the rest from the configuration (merge_settings) unless a flag says otherwise
    if args.dtype:
        options["dtype"] = args.dtype
    if args.device:
        options["device"] = args.device
    if args.max_shard_size:
        options["max_shard_size"] = args.max_shard_size
    if args.selection:
        options["selection"] = args.selection
    result = ModelMerger(config, **options).merge(args.adapter, args.base, args.out)

    def human(console: Console) -> None:
        key = "merge_nothing_to_do" if result.already_complete else "merge_done"
        console.print(
            Text(
                i18n.ui(
                    key, out=result.output_dir, shards=len(result.shards), gb=result.bytes / 1e9, seconds=result.seconds
                ),
                style="green",
            )
        )
        if result.untied_embeddings:
            console.print(i18n.ui("merge_untied"))

    _emit(args, result.to_dict(), human)
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    from dataclasses import asdict
    from pathlib import Path

    from .pipeline.benchmark import BENCHMARK_FILE, DEFAULT_PROMPT, benchmark
    from .pipeline.report import rerender_report

    setup_logging(_log_level(args), getattr(args, "log_file", None))
    results = benchmark(
        args.target,
        prompt=args.prompt or DEFAULT_PROMPT,
        new_tokens=args.new_tokens,
        batch_size=args.batch_size,
        repeats=args.repeats,
        device_map=args.device,
    )
    report = (
        rerender_report(Path(args.target), [asdict(r) for r in results])
        if (Path(args.target) / "run.json").is_file()
        else None
    )

    def human(console: Console) -> None:
        print_benchmark(console, results, args.batch_size)
        if report:
            console.print(i18n.ui("benchmark_written", path=Path(args.target) / BENCHMARK_FILE, report=report))

    _emit(args, [asdict(r) for r in results], human)
    return 1 if any(r.status == "failed" for r in results) else 0


def _validate_config(args: argparse.Namespace) -> int:
    from .config_file import apply_overrides, read_config_file
    from .pipeline.validate import validate_config

    data, _ = read_config_file(args.file)
    if "lang" not in vars(args) and data.get("lang") in i18n.LANGUAGES:
        i18n.set_language(data["lang"])
    problems = validate_config(apply_overrides(data, args.overrides)) if args.overrides else validate_config(args.file)

    def human(console: Console) -> None:
        if not problems:
            console.print(Text(i18n.ui("config_ok", path=args.file), style="green"))
        for p in problems:
            console.print(Text.assemble((f"{args.file}:", "red"), f" {p.render()}"), soft_wrap=True)

    _emit(args, {"file": args.file, "ok": not problems, "problems": [p.to_dict() for p in problems]}, human)
    return 2 if problems else 0


def _init_config(args: argparse.Namespace) -> int:
    from .config_file import init_config

    path = init_config(args.path, force=args.force)
    print(i18n.ui("config_written", path=path))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo.run import demo

    result = demo(args.workdir)
    _emit(args, result, lambda console: print_run(console, "model-export demo", result["steps"], result["report"]))
    return 0


def _print_error(exc: ExportError, args: argparse.Namespace) -> None:
    if getattr(args, "json", False):
        print(json.dumps(exc.to_dict(), ensure_ascii=False, indent=2))
        return
    err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)  # paths and hints print as written
    err.print(Text.assemble((type(exc).__name__, "bold red"), f": {exc.render()}"))
    err.print(f"  {i18n.ui('error_code')}: {exc.code}")
    err.print(f"  {i18n.ui('error_hint')}: {exc.hint()}")
    if not getattr(args, "debug", False):
        err.print(Text(f"  {i18n.ui('debug_hint')}", style="dim"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "lang", None):
        i18n.set_language(args.lang)
    setup_logging(_log_level(args), getattr(args, "log_file", None))
    try:
        return args.func(args)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - every way out is explained in one message
        if getattr(args, "debug", False):
            import traceback

            traceback.print_exc()
        error = explain(exc, i18n.ui("where_command", command=args.command), getattr(args, "log_file", None))
        _print_error(error, args)
        return error.exit_code
    finally:
        i18n.set_language(None)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
