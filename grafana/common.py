"""Shared defaults of every dashboard: datasource, variables, units, thresholds, links.

Dashboards read the recorded series of recording_rules/ and compare against the
`aicrm_threshold` / `aicrm_objective` series the exporter publishes from config.json, so
no number a user would want to change is typed into a panel.
"""

from __future__ import annotations

import typing
from collections.abc import Iterable, Sequence

from grafana_foundation_sdk.builders import bargauge, dashboard, prometheus, stat, table, timeseries
from grafana_foundation_sdk.builders import common as common_builder
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

DATASOURCE_UID = "aicrm-prometheus"
"""uid of the provisioned Prometheus datasource (grafana/provisioning/datasources)."""
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
TAG = "aicrm"

UIDS = {
    "overview": "aicrm-overview",
    "tasks": "aicrm-tasks",
    "agents": "aicrm-agents",
    "workflow": "aicrm-workflow",
    "integrations": "aicrm-integrations",
    "executive": "aicrm-executive",
    "stack": "aicrm-stack",
}
"""Fixed uids: alert annotations (`dashboard_url`) link to them."""

# Units (Grafana unit ids).
RATIO = "percentunit"  # 0-1 shown as a percentage
SECONDS = "s"
USD = "currencyUSD"
OPS = "ops"  # per second
REQPS = "reqps"
COUNT = "none"
SCORE = "none"  # 0-100
HOURS = "h"
FACTOR = "short"
BYTES = "bytes"

THRESHOLD_REF = "T"
"""refId of the query that carries a threshold or objective series."""

PanelBuilder = timeseries.Panel | stat.Panel | table.Panel | bargauge.Panel


# --- Queries -------------------------------------------------------------------------------


def query(expr: str, legend: str = "__auto", ref: str = "A") -> prometheus.Dataquery:
    """A range query, drawn over time."""
    return (
        prometheus.Dataquery()
        .datasource(DATASOURCE)
        .expr(expr)
        .legend_format(legend)
        .range()
        .ref_id(ref)
    )


def instant(expr: str, legend: str = "__auto", ref: str = "A") -> prometheus.Dataquery:
    """An instant query: one value per series at the end of the time range."""
    return (
        prometheus.Dataquery()
        .datasource(DATASOURCE)
        .expr(expr)
        .legend_format(legend)
        .instant()
        .ref_id(ref)
    )


def table_query(expr: str, ref: str = "A") -> prometheus.Dataquery:
    """An instant query in table format: one row per series, one column per label."""
    return instant(expr, ref=ref).format(PromQueryFormat.TABLE)


def threshold(name: str, by: str = "", matchers: str = "") -> str:
    """PromQL of a config.json threshold as published by the exporter (`aicrm_threshold`)."""
    return _config_series("aicrm_threshold", name, by, matchers)


def objective(name: str, by: str = "", matchers: str = "") -> str:
    """PromQL of a config.json objective (`aicrm_objective`)."""
    return _config_series("aicrm_objective", name, by, matchers)


def _config_series(metric: str, name: str, by: str, matchers: str) -> str:
    # Every exporter shard publishes the same value: max collapses them.
    selector = f'name="{name}"' + (f", {matchers}" if matchers else "")
    grouping = f" by ({by})" if by else ""
    return f"max{grouping} ({metric}{{{selector}}})"


# --- Panels --------------------------------------------------------------------------------


def timeseries_panel(
    title: str,
    description: str,
    unit: str,
    targets: Sequence[prometheus.Dataquery],
    *,
    width: int = 12,
    height: int = 8,
    stack: bool = False,
    min_val: float | None = None,
    max_val: float | None = None,
) -> timeseries.Panel:
    """A time series; a threshold query (refId T) is drawn as a dashed red line."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(width)
        .height(height)
        .line_width(1)
        .fill_opacity(10)
        .show_points(common.VisibilityMode.NEVER)
        .span_nulls(False)
        .legend(
            common_builder.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs(["mean", "lastNotNull"])
        )
        .tooltip(
            common_builder.VizTooltipOptions()
            .mode(common.TooltipDisplayMode.MULTI)
            .sort(common.SortOrder.DESCENDING)
        )
        .targets(list(targets))
    )
    if stack:
        panel = panel.stacking(
            common_builder.StackingConfig().mode(common.StackingMode.NORMAL)
        ).fill_opacity(40)
    if min_val is not None:
        panel = panel.min(min_val)
    if max_val is not None:
        panel = panel.max(max_val)
    if any(t.build().ref_id == THRESHOLD_REF for t in targets):
        panel = panel.override_by_query(THRESHOLD_REF, dashed_line())
    return panel


def dashed_line() -> list[model.DynamicConfigValue]:
    """Field overrides that draw a threshold series as a dashed red line without fill."""
    return [
        model.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": "red"}),
        model.DynamicConfigValue(
            id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]}
        ),
        model.DynamicConfigValue(id_val="custom.fillOpacity", value=0),
        model.DynamicConfigValue(id_val="custom.lineWidth", value=2),
        model.DynamicConfigValue(id_val="custom.stacking", value={"mode": "none", "group": "T"}),
    ]


def stat_panel(
    title: str,
    description: str,
    unit: str,
    targets: Sequence[prometheus.Dataquery],
    *,
    width: int = 6,
    height: int = 4,
    color: model.FieldColorModeId = model.FieldColorModeId.FIXED,
    min_val: float | None = None,
    max_val: float | None = None,
) -> stat.Panel:
    """A big number (the last value of each series)."""
    panel = (
        stat.Panel()
        .graph_mode(common.BigValueGraphMode.AREA)
        .color_mode(common.BigValueColorMode.VALUE)
        .text_mode(common.BigValueTextMode.AUTO)
    )
    return _last_value_panel(panel, title, description, unit, targets, width, height, color,
                             min_val, max_val)


PanelT = typing.TypeVar("PanelT", stat.Panel, bargauge.Panel)


def _last_value_panel(
    panel: PanelT,
    title: str,
    description: str,
    unit: str,
    targets: Sequence[prometheus.Dataquery],
    width: int,
    height: int,
    color: model.FieldColorModeId,
    min_val: float | None,
    max_val: float | None,
) -> PanelT:
    """What stat and bar gauge panels share: one reduced value per series, units, colours."""
    panel = (
        panel.title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(width)
        .height(height)
        .reduce_options(
            common_builder.ReduceDataOptions().calcs(["lastNotNull"]).values(False)
        )
        .color_scheme(_color(color))
        .targets(list(targets))
    )
    if min_val is not None:
        panel = panel.min(min_val)
    if max_val is not None:
        panel = panel.max(max_val)
    return panel


def _color(mode: model.FieldColorModeId) -> dashboard.FieldColor:
    color = dashboard.FieldColor().mode(mode)
    if mode == model.FieldColorModeId.FIXED:
        color = color.fixed_color("text")
    return color


def bar_panel(
    title: str,
    description: str,
    unit: str,
    targets: Sequence[prometheus.Dataquery],
    *,
    width: int = 12,
    height: int = 8,
    color: model.FieldColorModeId = model.FieldColorModeId.CONTINUOUS_RD_YL_GR,
    min_val: float | None = None,
    max_val: float | None = None,
) -> bargauge.Panel:
    """Horizontal bars, one per series: comparing agents, platforms or components now."""
    panel = (
        bargauge.Panel()
        .orientation(common.VizOrientation.HORIZONTAL)
        .display_mode(common.BarGaugeDisplayMode.GRADIENT)
    )
    return _last_value_panel(panel, title, description, unit, targets, width, height, color,
                             min_val, max_val)


def table_panel(
    title: str,
    description: str,
    unit: str,
    targets: Sequence[prometheus.Dataquery],
    *,
    columns: dict[str, tuple[str, str]] | None = None,
    keep: Sequence[str] = (),
    width: int = 24,
    height: int = 8,
) -> table.Panel:
    """A table of instant queries merged on their labels.

    columns maps "Value #<refId>" to (header, unit); keep lists the label columns to show,
    in order (the others, such as Time and __name__, are hidden).
    """
    columns = columns or {}
    panel = (
        table.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(width)
        .height(height)
        .targets(list(targets))
        .with_transformation(model.DataTransformerConfig(id_val="merge", options={}))
    )
    names = [*keep, *columns]
    panel = panel.with_transformation(
        model.DataTransformerConfig(
            id_val="filterFieldsByName", options={"include": {"names": names}}
        )
    )
    panel = panel.with_transformation(
        model.DataTransformerConfig(
            id_val="organize",
            options={
                "indexByName": {name: i for i, name in enumerate(names)},
                "renameByName": {field: header for field, (header, _) in columns.items()},
            },
        )
    )
    for field, (_, column_unit) in columns.items():
        panel = panel.override_by_name(
            field, [model.DynamicConfigValue(id_val="unit", value=column_unit)]
        )
    return panel


def threshold_from_query(
    panel: PanelT, *, above_is_bad: bool, legend: str = "threshold", apply_to: str = ""
) -> PanelT:
    """Colour a stat or bar by the value of the panel's threshold query (refId T).

    Grafana's "Config from query results" transformation turns the T series into the
    panel's first threshold step, so the colour follows config.json without a typed number.
    apply_to restricts it to one query's frames (e.g. not the "vs previous period" value).
    """
    good, bad = "green", "red"
    base, step = (good, bad) if above_is_bad else (bad, good)
    options: dict[str, object] = {
        "configRefId": THRESHOLD_REF,
        "mappings": [
            {
                "fieldName": legend,
                "handlerKey": "threshold1",
                "reducerId": "lastNotNull",
                "handlerArguments": {"threshold": {"color": step}},
            }
        ],
    }
    if apply_to:
        options["applyTo"] = {"id": "byFrameRefID", "options": apply_to}
    return (
        panel.thresholds(
            dashboard.ThresholdsConfig()
            .mode(model.ThresholdsMode.ABSOLUTE)
            .steps([model.Threshold(value=None, color=base)])
        )
        .color_scheme(dashboard.FieldColor().mode(model.FieldColorModeId.THRESHOLDS))
        .with_transformation(model.DataTransformerConfig(id_val="configFromData", options=options))
    )


def change_override(unit: str) -> list[model.DynamicConfigValue]:
    """The "vs previous period" value of an executive stat, in its own unit."""
    return [
        model.DynamicConfigValue(id_val="unit", value=unit),
        model.DynamicConfigValue(id_val="displayName", value="vs previous period"),
        model.DynamicConfigValue(id_val="decimals", value=1),
        model.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": "blue"}),
    ]


def up_down_mappings(down: str = "Down", up: str = "Up") -> list[model.ValueMapping]:
    """0/1 health gauges read as Down/Up (or another pair, such as Failed/OK)."""
    return [
        model.ValueMap(
            options={
                "0": model.ValueMappingResult(text=down, color="red", index=0),
                "1": model.ValueMappingResult(text=up, color="green", index=1),
            }
        )
    ]


# --- Variables, annotations, links --------------------------------------------------------


def datasource_variable() -> dashboard.DatasourceVariable:
    """The `datasource` variable the dashboard linter asks for; defaults to the provisioned one."""
    return (
        dashboard.DatasourceVariable("datasource")
        .label("Data source")
        .type("prometheus")
        .current(model.VariableOption(selected=True, text="Prometheus", value=DATASOURCE_UID))
    )


def label_variable(name: str, label: str, series: str) -> dashboard.QueryVariable:
    """A multi-value variable over a label of a recorded series; "All" matches everything."""
    return _multi_variable(name, label, f"label_values({series}, {name})").all_value(".*")


def _multi_variable(name: str, label: str, query: str) -> dashboard.QueryVariable:
    return (
        dashboard.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(query)
        .current(model.VariableOption(selected=True, text="All", value="$__all"))
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
    )


AGENT_INFO = "aicrm_agent_info"
"""`aicrm_agent_info{agent, team} 1` per agent declared in config.json (none for `other`)."""


def team_variable() -> dashboard.QueryVariable:
    """The teams that own the declared agents (config.json `agents[].team`); goes before
    `agent_variable`, which it narrows."""
    return label_variable("team", "Team", AGENT_INFO)


def agent_variable(series: str) -> dashboard.QueryVariable:
    """The agents of a recorded series, narrowed to those of the teams picked in `team`.

    Grafana sends a `label_values(<selector>, agent)` query to Prometheus as the `match[]` of
    /api/v1/label/agent/values, which takes series selectors only: no `and on (agent)` join
    with aicrm_agent_info. So one selector reads two series at once. `series` has no `team`
    label, and a missing label matches a regex only if the regex matches "": team=All
    (allValue `.*`) keeps every agent with data, the fallback `other` (which has no info
    series) included, while a picked team matches none of them. aicrm_agent_info then
    supplies exactly the picked teams' agents (under All it adds only declared agents, which
    the exporter starts at 0, so they are there anyway).

    No allValue: "All" agents is then the list this query returned, written as a regex of
    its values, so with a team picked and agent at All the panels (`agent=~"$agent"`) show
    that team's agents; `.*` would show everyone's.
    """
    selector = f'{{__name__=~"{series}|{AGENT_INFO}", team=~"$team"}}'
    return _multi_variable("agent", "Agent", f"label_values({selector}, agent)")


class _PrometheusAnnotation(model.AnnotationQuery):
    """AnnotationQuery plus the Prometheus annotation fields the SDK model lacks."""

    def __init__(self, name: str, expr: str, title_format: str, tag_keys: str, color: str):
        super().__init__(
            name=name, datasource=DATASOURCE, enable=True, hide=False, icon_color=color, expr=expr
        )
        self.title_format = title_format
        self.tag_keys = tag_keys

    def to_json(self) -> dict[str, object]:
        payload = super().to_json()
        payload.update(
            {
                "step": "60s",
                "titleFormat": self.title_format,
                "tagKeys": self.tag_keys,
                "textFormat": "",
                "useValueForTime": False,
            }
        )
        return payload


class PrometheusAnnotation(cogbuilder.Builder[model.AnnotationQuery]):
    def __init__(self, name: str, expr: str, title_format: str, tag_keys: str, color: str):
        self._internal = _PrometheusAnnotation(name, expr, title_format, tag_keys, color)

    def build(self) -> model.AnnotationQuery:
        return self._internal


PROBLEMS = 'alertstate="firing", severity!~"recommendation|none"'
"""Firing alerts that report a problem: not recommendations, nor the always-firing
AicrmWatchdog (severity none)."""


def firing_alerts(matchers: str = "") -> PrometheusAnnotation:
    """Firing alerts (not recommendations, nor the always-firing AicrmWatchdog) of this view,
    as annotations on every graph."""
    extra = f", {matchers}" if matchers else ""
    return PrometheusAnnotation(
        "Firing alerts",
        f"ALERTS{{{PROBLEMS}{extra}}}",
        "{{alertname}}",
        "severity,agent,task_type,platform,source",
        "red",
    )


def built_in_annotations() -> dashboard.AnnotationQuery:
    """Grafana's own annotations (hand-made notes), kept as every dashboard has them."""
    return (
        dashboard.AnnotationQuery()
        .name("Annotations & Alerts")
        .datasource(model.DataSourceRef(type_val="grafana", uid="-- Grafana --"))
        .enable(True)
        .hide(True)
        .icon_color("rgba(0, 211, 255, 1)")
        .type("dashboard")
        .built_in(1)
    )


def other_views() -> dashboard.DashboardLink:
    """Every AI-CRM view links to the others, keeping the time range and variables."""
    return (
        dashboard.DashboardLink("AI-CRM views")
        .type(model.DashboardLinkType.DASHBOARDS)
        .tags([TAG])
        .as_dropdown(False)
        .include_vars(True)
        .keep_time(True)
        .target_blank(False)
        .icon("external link")
        .tooltip("")
        .url("")
    )


def new_dashboard(
    key: str,
    title: str,
    description: str,
    *,
    time_from: str,
    refresh: str,
    variables: Iterable[cogbuilder.Builder[model.VariableModel]],
    alerts: PrometheusAnnotation,
) -> dashboard.Dashboard:
    """A dashboard with the shared settings: fixed uid, tags, links, annotations, variables."""
    builder = (
        dashboard.Dashboard(title)
        .uid(UIDS[key])
        .description(description)
        .tags([TAG, key])
        .readonly()
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .time(time_from, "now")
        .timezone("browser")
        .refresh(refresh)
        .timepicker(
            dashboard.TimePicker().refresh_intervals(["30s", "1m", "5m", "15m", "1h"])
        )
        .link(other_views())
        .annotation(built_in_annotations())
        .annotation(alerts)
        .with_variable(datasource_variable())
    )
    for variable in variables:
        builder = builder.with_variable(variable)
    return builder


def add_row(
    builder: dashboard.Dashboard, title: str, panels: Iterable[PanelBuilder]
) -> dashboard.Dashboard:
    """An open row followed by its panels, laid out left to right."""
    builder = builder.with_row(dashboard.Row(title))
    for panel in panels:
        builder = builder.with_panel(panel)
    return builder


def finish(builder: dashboard.Dashboard) -> model.Dashboard:
    """Build and number the panels, so ids (and panel links) are stable between runs."""
    built = builder.build()
    next_id = 1
    for panel in built.panels or []:
        panel.id_val = next_id
        next_id += 1
    return built
