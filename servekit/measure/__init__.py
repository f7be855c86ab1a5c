"""Layer 5, measure: figures about a model or a server — in-process runs, load generation, bench and its peers,
tune, evaluate."""
