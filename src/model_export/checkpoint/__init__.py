"""Stage 1, the inputs: find the checkpoint a Trainer run left (detect), read its adapter (adapter_format) and the base
model it names, locally or in the hub cache (base_model), and check that they fit without loading the base's weights
(validate). Also a batch's adapters (adapters), the Hugging Face folder around merged weights (hf_layout), and loading
a whole model with transformers when a stage needs one (loading)."""
