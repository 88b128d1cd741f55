"""Stage 2, the merge: a plan of every output tensor from the adapter and the base (plan), the update arithmetic PEFT
applies (arithmetic), and the streaming merge that writes shard by shard and resumes (merger). ``streamed`` runs the
base with the adapter unmerged, one decoder layer in memory at a time, for calibration and the reference."""
