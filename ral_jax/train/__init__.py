"""Training: the outer loop (loop), one step of each stage (stages), the pure jitted updates (step), state and
optimizer (state, optim, build), step inputs (inputs), data pipelines per stage (data), typed configs (config) and
checkpoints (checkpoint)."""
