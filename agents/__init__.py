"""Reference agents for the demo, compose.yaml and benchmarks (not an installed package)."""
