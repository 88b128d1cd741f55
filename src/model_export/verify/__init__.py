"""Stage 6, verification: the reference, base + adapter unmerged (reference); each artifact run in its own runtime on
the reference's inputs (artifacts) and judged on the bounds of its precision (judge); the verify step's units,
``verify:reference`` and ``verify:<artifact>``, kept while unchanged (step)."""
