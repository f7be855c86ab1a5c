"""Layer 2, store: where things are kept — path conventions, the catalog of archives, labelled held-out sets."""
