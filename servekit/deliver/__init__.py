"""Layer 6, deliver: changing what users are served — rollout and its gates, traffic splits, progressive rollouts,
golden probes."""
