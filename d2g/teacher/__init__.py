"""The teacher side shared by pair generation and training: loading, solvers, noise, the VAE."""
