"""The diffusion samplers, the batched step and the serving scheduler."""
