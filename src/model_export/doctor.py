"""model-export doctor: the guide's checklist, with the project's real minimum versions.

Python and packages, GPU (torch and nvidia-smi), free disk against 3-5x the model size,
checkpoint integrity, and whether the model hub can be reached (skipped in offline mode).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import extras, i18n
from .checkpoint.base_model import inspect_base_model, is_offline
from .errors import ExportError

__all__ = ["doctor", "DoctorReport", "Check", "MIN_PYTHON"]

MIN_PYTHON = (3, 10)
CORE = ("torch", "transformers", "peft", "accelerate", "safetensors", "huggingface_hub", "pydantic", "PyYAML", "numpy")
# Every optional package, from the one table of them (extras.OPTIONAL_PACKAGES: distribution -> extra), so that an
# extra added there is listed here too.
OPTIONAL = {package: extra for package, extra in extras.OPTIONAL_PACKAGES.values()}
_MODULES = {package: module for module, (package, _) in extras.OPTIONAL_PACKAGES.items()}
DISK_MIN_FACTOR, DISK_RECOMMENDED_FACTOR = 3, 5


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail | skip
    detail: str


@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(c.status == "fail" for c in self.checks)

    def count(self, status: str) -> int:
        return sum(c.status == status for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": not self.failed, "checks": [asdict(c) for c in self.checks]}


def _minimums() -> dict[str, str]:
    """Lowest versions from model-export's own requirements (pyproject.toml), keyed by lower-case name."""
    import importlib.metadata as metadata

    from packaging.requirements import Requirement

    try:
        requirements = metadata.requires("model-export") or []
    except metadata.PackageNotFoundError:
        return {}
    minimums = {}
    for text in requirements:
        req = Requirement(text)
        for spec in req.specifier:
            if spec.operator in (">=", "=="):
                minimums[req.name.lower().replace("_", "-")] = spec.version
    return minimums


def _package(name: str, minimum: str | None, optional_extra: str | None) -> Check:
    import importlib.metadata as metadata

    from packaging.version import InvalidVersion, Version

    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        if optional_extra:
            return Check(name, "skip", i18n.ui("doctor_optional_missing", extra=optional_extra))
        return Check(name, "fail", i18n.ui("doctor_missing", package=name))
    try:
        too_old = minimum is not None and Version(version) < Version(minimum)
    except InvalidVersion:
        too_old = False
    if too_old:
        return Check(name, "fail", i18n.ui("doctor_too_old", version=version, minimum=minimum))
    problem = extras.import_problem(_MODULES[name]) if name in _MODULES else None
    if problem:  # installed, but its import fails here (a wheel built for another glibc or CPU): what runs it says so
        return Check(name, "warn", f"{version}: {problem}")
    return Check(name, "ok", version + (f" (>= {minimum})" if minimum else ""))


def _gpu() -> list[Check]:
    checks = []
    try:
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                gib = props.total_memory / 2**30
                checks.append(
                    Check(
                        f"cuda:{i}",
                        "ok" if gib >= 8 else "warn",
                        f"{props.name}, {gib:.1f} GiB (CUDA {torch.version.cuda})",
                    )
                )
        else:
            checks.append(Check("gpu", "skip", i18n.ui("doctor_no_gpu")))
    except Exception as exc:  # noqa: BLE001 - a broken CUDA install must not stop the doctor
        checks.append(Check("gpu", "warn", f"{type(exc).__name__}: {exc}"))
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,memory.used,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=15,
            )
            checks.append(
                Check("nvidia-smi", "ok" if out.returncode == 0 else "warn", (out.stdout or out.stderr).strip()[:300])
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            checks.append(Check("nvidia-smi", "warn", str(exc)))
    return checks


def _disk(output_dir: str, model_bytes: int | None) -> Check:
    place = Path(os.path.expanduser(output_dir)).resolve()
    while not place.exists():
        place = place.parent
    free = shutil.disk_usage(place).free
    gb = lambda n: f"{n / 1e9:.1f} GB"  # noqa: E731
    if model_bytes is None:
        return Check("disk", "ok", i18n.ui("doctor_disk_free", free=gb(free), place=place))
    need, want = DISK_MIN_FACTOR * model_bytes, DISK_RECOMMENDED_FACTOR * model_bytes
    status = "fail" if free < need else "warn" if free < want else "ok"
    return Check(
        "disk",
        status,
        i18n.ui("doctor_disk", free=gb(free), place=place, model=gb(model_bytes), need=gb(need), want=gb(want)),
    )


def _hub() -> Check:
    if is_offline():
        return Check("hub", "skip", i18n.ui("doctor_offline"))
    import urllib.error
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=3)
        return Check("hub", "ok", endpoint)
    except urllib.error.HTTPError as exc:  # the server answered: reachable
        return Check("hub", "ok", f"{endpoint} (HTTP {exc.code})")
    except (OSError, ValueError) as exc:
        return Check(
            "hub", "warn", i18n.ui("doctor_hub_unreachable", endpoint=endpoint, error=getattr(exc, "reason", exc))
        )


def doctor(checkpoint: str | None = None, base_model: str | None = None, output_dir: str = ".") -> DoctorReport:
    """Run every check and return them; never raises for a failed check."""
    from .checkpoint.detect import detect
    from .checkpoint.validate import read_adapter_config, validate_checkpoint

    report = DoctorReport()
    ok = sys.version_info >= MIN_PYTHON
    report.checks.append(
        Check("python", "ok" if ok else "fail", f"{platform.python_version()} (>= {'.'.join(map(str, MIN_PYTHON))})")
    )
    minimums = _minimums()
    for name in CORE:
        report.checks.append(_package(name, minimums.get(name.lower().replace("_", "-")), None))
    for name, extra in OPTIONAL.items():
        report.checks.append(_package(name, minimums.get(name.lower()), extra))
    report.checks.extend(_gpu())
    model_bytes = None
    if checkpoint:
        try:
            chosen = detect(checkpoint).path
            base_model = base_model or read_adapter_config(chosen).get("base_model_name_or_path")
            result = validate_checkpoint(chosen, base_model, progress=False)
            report.checks.append(Check("checkpoint", "ok", f"{chosen} (r={result.rank}, {result.num_modules} modules)"))
        except ExportError as exc:
            report.checks.append(Check("checkpoint", "fail", f"[{exc.code}] {exc.render()}"))
    if base_model:
        try:
            model_bytes = inspect_base_model(base_model).weight_bytes
        except ExportError as exc:
            report.checks.append(Check("base model", "fail", f"[{exc.code}] {exc.render()}"))
    report.checks.append(_disk(output_dir, model_bytes))
    report.checks.append(_hub())
    return report
