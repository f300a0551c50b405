"""api/queries.py reads only series the rule files record, and picks bases as documented."""

from __future__ import annotations

import re

import pytest
import yaml

from api import queries
from api.promql import Sample
from tests.api.conftest import RULES

WINDOWS = (60, 300, 600, 3600, 7200, 86400, 3 * 86400, 30 * 86400)


def _recorded() -> set[str]:
    names = set()
    for path in RULES.glob("*.rules.yml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            names.update(r["record"] for r in group["rules"] if "record" in r)
    return names


def test_every_series_read_is_recorded() -> None:
    exprs = [d.series for d in queries.DATASETS.values()]
    for w in WINDOWS:
        exprs += [queries.task_completion(w, "t", None).expr,
                  queries.agent_performance(w, "a").expr, queries.executive(w).expr]
    used = {n for e in exprs for n in re.findall(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", e)}
    assert used - _recorded() == set()


def zero_filled(inner: str, rng: str) -> str:
    """A window's mean rate in which a series counts as 0 where it has no point: the sum of its
    points over the subquery's number of points."""
    return f"(sum_over_time({inner}{rng}) / scalar(count_over_time(vector(1){rng})))"


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        (60, "task_type_status:aicrm_tasks:rate5m"),
        (300, "task_type_status:aicrm_tasks:rate5m"),
        (600, zero_filled("task_type_status:aicrm_tasks:rate5m", "[600s:30s]")),
        (3600, "task_type_status:aicrm_tasks:rate1h"),
        # Longer than a base but not twelve of them: the 5m rates, so the last hour of 90
        # minutes is not blurred by a 1h rate.
        (5400, zero_filled("task_type_status:aicrm_tasks:rate5m", "[5400s:30s]")),
        (11 * 3600, zero_filled("task_type_status:aicrm_tasks:rate5m", "[39600s:30s]")),
        (12 * 3600, zero_filled("task_type_status:aicrm_tasks:rate1h", "[43200s:60s]")),
        # 43,200 one-minute points would be read: every 30 minutes instead, 1,440 points.
        (30 * 86400, zero_filled("task_type_status:aicrm_tasks:rate1h", "[2592000s:1800s]")),
    ],
)
def test_bases(window: int, expected: str) -> None:
    assert queries.TASKS.mean(window) == expected


def test_offsets_and_1d_bases() -> None:
    assert (queries.SPEND.mean(2 * 86400, (), offset=2 * 86400)
            == zero_filled("agent:aicrm_agent_cost_usd:rate1h", "[172800s:120s] offset 172800s"))
    assert queries.SPEND.mean(86400) == "agent:aicrm_agent_cost_usd:rate1d"
    assert (queries.SPEND.mean(30 * 86400)
            == zero_filled("agent:aicrm_agent_cost_usd:rate1d", "[2592000s:1800s]"))
    assert queries.G_SAVED.mean(60) == "global:aicrm_task_human_seconds_saved:rate1h"


def test_the_window_before_a_short_one_does_not_overlap_it() -> None:
    """A window shorter than its base is the base's rate: the one before starts a base back."""
    assert (queries.G_COMPLETED.mean(60, (), offset=60)
            == "global:aicrm_tasks_completed:rate5m offset 300s")
    assert (queries.G_SAVED.mean(1800, (), offset=1800)
            == "global:aicrm_task_human_seconds_saved:rate1h offset 3600s")
    assert (queries.G_COMPLETED.mean(600, (), offset=600)
            == zero_filled("global:aicrm_tasks_completed:rate5m", "[600s:30s] offset 600s"))


def test_raw_families_use_subqueries() -> None:
    assert queries.RAW_TASKS.mean(600, ['agent="a"']) == zero_filled(
        '(sum by (task_type, status) (rate(aicrm_tasks_total{agent="a"}[5m])))', "[600s:30s]")
    assert queries.RAW_TASKS.mean(30 * 86400).endswith("(vector(1)[2592000s:3600s])))")


def test_matcher_quotes() -> None:
    assert queries.matcher("agent", 'a"b\\') == 'agent="a\\"b\\\\"'


def test_split_by_keys_each_field_by_one_label() -> None:
    f = queries.FIELD_LABEL
    samples = [
        Sample({f: "spend", "agent": "a", "__name__": "x"}, 1.0),
        Sample({f: "spend", "agent": "b"}, None),
        Sample({f: "spend", "agent": "a"}, 9.0),  # a second sample of a key: the first wins
        Sample({f: "total"}, 3.0),  # no such label: keyed by ""
        Sample({"agent": "c"}, 4.0),  # not a field of the query: ignored
    ]
    assert queries.split_by(samples, "agent") == {"spend": {"a": 1.0, "b": None},
                                                  "total": {"": 3.0}}
