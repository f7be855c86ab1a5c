"""What the tests share, one module per purpose: servers, handlers, bodies, answers, http, processes, alerts."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
