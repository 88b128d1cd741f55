"""Stage 7, the run: its steps declared as data (graph), run or skipped by their keys with run.json as the record
(state, manifest), in order (run: detect, check, merge, calibrate; export_step: one step per format; then verify,
benchmark, report); the checks before anything is written (validate, preflight); batches of adapters (batch); the
benchmark and the report a person reads."""
