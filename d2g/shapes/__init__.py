"""The embedded shapes teacher: a procedural world, an SD1.5-layout latent diffusion model trained
on it, and an evaluator that judges samples against their prompts (docs/SHAPES.md)."""
