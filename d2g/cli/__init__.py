"""Command-line plumbing shared by the pairgen and distill CLIs: options, errors, Ray start."""
