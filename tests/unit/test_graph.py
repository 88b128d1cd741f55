"""The run's steps as data (graph.py): the key tests follow from the declarations instead of repeating them.

Every configuration key is declared by a step (a key, a layout key, a key it reads, a bound) or by the run itself
(RUN_KEYS, with what it decides). For every step and every key it declares, a changed value changes exactly what the
declaration says: a key changes the step's key and, through its content key, the key of every step that needs it; a
layout key changes the step's key and nothing after it; a key it only reads, or a bound, changes no key. That a step
reads nothing it does not declare is the ConfigView's part (tests/integration/test_units.py and every run in the
suite, which runs each step against its view)."""

import typing

import pytest

from model_export import ExportConfiguration
from model_export.exporters import FORMATS
from model_export.pipeline.graph import RUN_KEYS, STEP_SPECS, StepSpec, export_spec
from model_export.verify.step import reference_spec, verify_spec

SERVED = ["safetensors@vllm", "adapter@vllm"]  # verify/served.py: what vLLM serves (verification_servers)


def _all_specs() -> list[StepSpec]:
    specs = list(STEP_SPECS.values()) + [export_spec(fmt) for fmt in FORMATS] + [reference_spec()]
    return specs + [verify_spec(label) for label in [*FORMATS, *SERVED]]


def _declared(spec: StepSpec) -> set[str]:
    return set(spec.keys + spec.layout + spec.reads + spec.bounds)


def test_every_configuration_key_is_declared_by_a_step_or_by_the_run():
    declared = set().union(*(_declared(spec) for spec in _all_specs()))
    fields = set(ExportConfiguration.model_fields)
    assert fields - declared - set(RUN_KEYS) == set(), "a key no step declares: declare it where it is read"
    assert declared | set(RUN_KEYS) <= fields, "a declaration names no configuration key"
    for spec in _all_specs():
        kinds = [set(spec.keys), set(spec.layout), set(spec.reads), set(spec.bounds)]
        assert sum(len(k) for k in kinds) == len(set().union(*kinds)), f"{spec.name} declares a key twice"
        assert set(spec.needs) <= set(STEP_SPECS) | {"verify:reference"} | {f"export:{f}" for f in FORMATS}


def _candidates(key: str, value: typing.Any) -> list[typing.Any]:
    """Other values for ``key``, from its annotation: the other choices of a Literal, the other bool, a number
    doubled, another string, one more list item."""
    annotation = ExportConfiguration.model_fields[key].annotation
    options: list[typing.Any] = []
    for arg in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(arg) is typing.Literal:
            options += [choice for choice in typing.get_args(arg) if choice != value]
        if typing.get_origin(arg) is list:  # a list of choices: each choice alone
            options += [[choice] for inner in typing.get_args(arg) for choice in typing.get_args(inner)]
    if isinstance(value, dict) or value is None:
        options += [{}, None, {"input_ids": {0: "batch"}}]
    if isinstance(value, bool):
        options.append(not value)
    elif isinstance(value, (int, float)):
        options += [value * 2 or 1, value + 1, value / 2]
    elif isinstance(value, list):
        options += [[*value, "x"], ["q_proj"], value[:1]]
    options += ["1GB", "x", "/tmp/other", 7, 0.5, 64, True, ["x"]]
    return options


def _changed(config: ExportConfiguration, key: str) -> ExportConfiguration:
    data = config.model_dump()
    for candidate in _candidates(key, data[key]):
        try:
            other = ExportConfiguration(**{**data, key: candidate})
        except Exception:  # noqa: BLE001 - a candidate the schema refuses: try the next one
            continue
        if other.model_dump(mode="json")[key] != config.model_dump(mode="json")[key]:
            return other
    raise AssertionError(f"no other valid value found for {key}")


def _keys(config: ExportConfiguration) -> dict[str, tuple[str, str]]:
    """Every step's (key, content key) for ``config``, upstream content keys passed along as the run passes them."""
    content: dict[str, str] = {}
    keys = {}
    order = ["detect", "check", "merge", "calibrate"] + [f"export:{f}" for f in FORMATS]
    for name in order:
        spec = STEP_SPECS.get(name) or export_spec(name.split(":")[1])
        unit = spec.unit(config, [], content)
        keys[name], content[name] = (unit.key, unit.content_key), unit.content_key
    content["export"] = "".join(content[f"export:{f}"] for f in FORMATS)
    for spec in [STEP_SPECS["benchmark"], reference_spec()]:
        unit = spec.unit(config, [], content)
        keys[spec.name], content[spec.name] = (unit.key, unit.content_key), unit.content_key
    for label in [*FORMATS, *SERVED]:
        unit = verify_spec(label).unit(config, [], content)
        keys[unit.name] = (unit.key, unit.content_key)
    return keys


def _needs(name: str, changed: str, specs: dict[str, StepSpec]) -> bool:
    """Whether step ``name`` needs step ``changed``, directly or through the steps it needs."""
    if name not in specs:
        return name == "export" and changed.startswith("export:")
    needs = specs[name].needs
    if "export" in needs and changed.startswith("export:"):
        return True
    return changed in needs or any(_needs(n, changed, specs) for n in needs)


# export and verify run every time (their units, export:<format> and verify:<artifact>, decide what is kept); the
# report is written on every run
KEYED = [spec for spec in _all_specs() if spec.name not in ("export", "verify", "report")]


@pytest.mark.parametrize("spec", KEYED, ids=lambda spec: spec.name)
def test_a_declared_key_changes_its_step_and_what_needs_it_and_nothing_else(spec):
    config = ExportConfiguration(export_formats=list(FORMATS))
    specs = {s.name: s for s in _all_specs()}
    before = _keys(config)
    assert set(before) == {s.name for s in KEYED}
    for key in spec.keys + spec.layout + spec.reads + spec.bounds:
        after = _keys(_changed(config, key))
        changed = {name for name in before if before[name][0] != after[name][0]}
        readers = _readers(key) & set(before)  # the steps whose key or layout declares it
        content = {r for r in readers if key in specs[r].keys}  # their content changes: what needs them reruns
        expected = readers | {n for n in before if any(_needs(n, r, specs) for r in content)}
        assert changed == expected, (spec.name, key)
        assert (spec.name in changed) == (key in spec.keys + spec.layout or spec.name in expected), (spec.name, key)
        if key in spec.layout:  # the steps after it keep their keys
            assert before[spec.name][1] == after[spec.name][1], (spec.name, key)


def _readers(key: str) -> set[str]:
    """The steps that declare ``key`` in their key or layout (a key can be read by several steps)."""
    return {s.name for s in _all_specs() if key in s.keys + s.layout}
