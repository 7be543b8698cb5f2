"""fastmerge: streaming SLERP merges of safetensors checkpoints."""
