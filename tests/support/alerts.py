"""deploy/alerts.yml read as data: its rules and the metrics they query."""

from __future__ import annotations

import re

import yaml

from support import REPO

ALERTS = REPO / "deploy" / "alerts.yml"


PROMQL_WORDS = {"sum", "by", "rate", "on", "group_left", "changes", "time", "m", "model_name", "model_version"}


def alert_rules() -> dict[str, dict]:
    """deploy/alerts.yml's rules by alert name."""
    return {rule["alert"]: rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]}


def metric_names(expression: str) -> set[str]:
    """The metrics a PromQL expression reads: identifiers outside label matchers, ranges and quotes."""
    bare = re.sub(r"\[[^\]]*\]", "", re.sub(r"\{[^}]*\}", "", re.sub(r'"[^"]*"', "", expression)))
    return set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", bare)) - PROMQL_WORDS


def alerted_metrics() -> set[str]:
    return {name for rule in alert_rules().values() for name in metric_names(rule["expr"])}
