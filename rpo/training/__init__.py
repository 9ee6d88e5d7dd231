"""Training machinery: checkpoints, the EMA, the resumable state, the steps of the loop,
validation and cached latents."""
