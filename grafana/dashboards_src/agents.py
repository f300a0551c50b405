"""Agent Performance: success against objectives, error budgets, speed, tools, cost, models."""

from __future__ import annotations

from grafana_foundation_sdk.builders import bargauge, table, timeseries
from grafana_foundation_sdk.models import dashboard as model

from grafana import common as c

AG = 'agent=~"$agent"'


def success_ratio() -> timeseries.Panel:
    return c.timeseries_panel(
        "Success ratio",
        "Share of each agent's task results that succeeded (5m). "
        "Dashed: each agent's success objective.",
        c.RATIO,
        [
            c.query(f"agent:aicrm_agent_task_results:success_ratio_rate5m{{{AG}}}", "{{agent}}"),
            c.query(
                c.objective("agent_success_ratio", "agent", AG),
                "objective {{agent}}",
                c.THRESHOLD_REF,
            ),
        ],
        max_val=1,
    )


def budget_remaining() -> bargauge.Panel:
    # A fixed range: without a minimum the continuous scheme spans the values shown, and the
    # lowest bar is red even when every agent has most of its budget left. From -1 (spent
    # twice) to 1, an untouched budget is green, none left yellow, overspent red.
    return c.bar_panel(
        "Error budget left (30 days)",
        "Share of the 30-day success error budget (1 - objective) each agent has not spent; "
        "below 0 means overspent. Colour on a fixed scale: green untouched, yellow at none "
        "left, red at twice spent.",
        c.RATIO,
        [c.instant(f"agent:aicrm_agent_task_results:error_budget_remaining_ratio30d{{{AG}}}",
                   "{{agent}}")],
        min_val=-1,
        max_val=1,
    )


def burn_rate() -> timeseries.Panel:
    return c.timeseries_panel(
        "Error budget burn rate",
        "How many times faster than sustainable each agent spends its error budget, over 1h "
        "and 6h; 1 spends it exactly in 30 days.",
        c.FACTOR,
        [
            c.query(f"agent:aicrm_agent_task_results:burn_rate1h{{{AG}}}", "1h {{agent}}"),
            c.query(f"agent:aicrm_agent_task_results:burn_rate6h{{{AG}}}", "6h {{agent}}", "B"),
        ],
        width=8,
    )


def escalations() -> timeseries.Panel:
    return c.timeseries_panel(
        "Escalation ratio",
        "Share of each agent's results handed to a human (5m).",
        c.RATIO,
        [c.query(f"agent:aicrm_agent_task_results:escalated_ratio_rate5m{{{AG}}}", "{{agent}}")],
        width=8,
    )


def retries() -> timeseries.Panel:
    return c.timeseries_panel(
        "Retries per task",
        "Retries each agent needed per task result (5m).",
        c.FACTOR,
        [c.query(f"agent:aicrm_agent_retries_per_task:ratio_rate5m{{{AG}}}", "{{agent}}")],
        width=8,
    )


def duration() -> timeseries.Panel:
    return c.timeseries_panel(
        "Task duration (p95, agent-reported)",
        "95th percentile of task durations the agents report (5m).",
        c.SECONDS,
        [c.query(f"agent:aicrm_agent_task_duration_seconds:p95_rate5m{{{AG}}}", "{{agent}}")],
        width=8,
    )


def handoffs() -> timeseries.Panel:
    return c.timeseries_panel(
        "Handoffs",
        "Work each agent hands to the next agent of its workflow, per second (5m).",
        c.OPS,
        [c.query(f"agent:aicrm_agent_handoffs:rate5m{{{AG}}}", "{{agent}}")],
        width=8,
    )


def tool_calls() -> timeseries.Panel:
    return c.timeseries_panel(
        "Tool calls",
        "Tool calls each agent makes per second (5m).",
        c.OPS,
        [c.query(f"agent:aicrm_agent_tool_calls:rate5m{{{AG}}}", "{{agent}}")],
        width=8,
    )


def tool_failures() -> timeseries.Panel:
    return c.timeseries_panel(
        "Tool failure ratio",
        "Share of calls to each tool that failed (5m), all agents.",
        c.RATIO,
        [c.query("tool:aicrm_agent_tool_calls:failure_ratio_rate5m", "{{tool}}")],
        width=8,
    )


def tool_latency() -> timeseries.Panel:
    return c.timeseries_panel(
        "Tool call latency (p95)",
        "95th percentile duration of each tool's calls (5m), all agents.",
        c.SECONDS,
        [c.query("tool:aicrm_agent_tool_call_duration_seconds:p95_rate5m", "{{tool}}")],
        width=8,
    )


def cost_per_task() -> timeseries.Panel:
    return c.timeseries_panel(
        "Cost per successful task",
        "Model spend divided by successful task results, per agent (1h). "
        "Dashed: cost_per_successful_task_max_usd.",
        c.USD,
        [
            c.query(f"agent:aicrm_agent_cost_usd_per_successful_task:ratio_rate1h{{{AG}}}",
                    "{{agent}}"),
            c.query(c.threshold("cost_per_successful_task_max_usd"), "threshold",
                    c.THRESHOLD_REF),
        ],
        width=8,
    )


def tokens_per_task() -> timeseries.Panel:
    return c.timeseries_panel(
        "Tokens per task",
        "Input and output tokens per task result, per agent (5m).",
        c.FACTOR,
        [c.query(f"agent:gen_ai_client_token_usage_per_task:ratio_rate5m{{{AG}}}", "{{agent}}")],
        width=8,
    )


def llm_latency() -> timeseries.Panel:
    return c.timeseries_panel(
        "LLM call latency (p95)",
        "95th percentile duration of LLM calls, by model, over all agents (5m).",
        c.SECONDS,
        [c.query("model:gen_ai_client_operation_duration_seconds:p95_rate5m", "{{model}}")],
        width=8,
    )


def llm_errors() -> timeseries.Panel:
    return c.timeseries_panel(
        "LLM error ratio",
        "Share of LLM calls that ended with an error, by model, over all agents (5m).",
        c.RATIO,
        [c.query("model:gen_ai_client_operations:error_ratio_rate5m", "{{model}}")],
        width=8,
    )


def rating() -> timeseries.Panel:
    return c.timeseries_panel(
        "User rating",
        "Mean 1-5 rating users gave each agent (1h).",
        c.FACTOR,
        [c.query(f"agent:aicrm_user_feedback_rating:mean1h{{{AG}}}", "{{agent}}")],
        width=8,
        min_val=1,
        max_val=5,
    )


def scorecard() -> table.Panel:
    return c.table_panel(
        "Agent scorecard (last hour)",
        "One row per agent: success against objective, escalations, retries, cost and "
        "tokens per task, and the 30-day error budget left.",
        c.RATIO,
        [
            c.table_query(f"agent:aicrm_agent_task_results:success_ratio_rate1h{{{AG}}}", "A"),
            c.table_query(c.objective("agent_success_ratio", "agent", AG), "B"),
            c.table_query(f"agent:aicrm_agent_task_results:escalated_ratio_rate1h{{{AG}}}",
                          "C"),
            c.table_query(f"agent:aicrm_agent_retries_per_task:ratio_rate1h{{{AG}}}", "D"),
            c.table_query(
                f"agent:aicrm_agent_cost_usd_per_successful_task:ratio_rate1h{{{AG}}}", "E"
            ),
            c.table_query(f"agent:gen_ai_client_token_usage_per_task:ratio_rate1h{{{AG}}}",
                          "F"),
            c.table_query(
                f"agent:aicrm_agent_task_results:error_budget_remaining_ratio30d{{{AG}}}", "G"
            ),
        ],
        keep=["agent"],
        columns={
            "Value #A": ("success", c.RATIO),
            "Value #B": ("objective", c.RATIO),
            "Value #C": ("escalated", c.RATIO),
            "Value #D": ("retries/task", c.FACTOR),
            "Value #E": ("USD/successful task", c.USD),
            "Value #F": ("tokens/task", c.FACTOR),
            "Value #G": ("budget left (30d)", c.RATIO),
        },
    )


def build() -> model.Dashboard:
    builder = c.new_dashboard(
        "agents",
        "AI-CRM / Agent Performance",
        "Each agent's success against its objective, error budget, speed, tools and cost.",
        time_from="now-24h",
        refresh="1m",
        variables=[
            c.team_variable(),
            c.agent_variable("agent:aicrm_agent_task_results:rate1h"),
        ],
        alerts=c.firing_alerts('alertname=~"AicrmAgent.*", agent=~"$agent"'),
    )
    builder = c.add_row(builder, "Scorecard", [scorecard()])
    builder = c.add_row(
        builder, "Success and error budget", [success_ratio(), budget_remaining(), burn_rate(),
                                              escalations(), retries()]
    )
    builder = c.add_row(
        builder, "Speed and tools",
        [duration(), handoffs(), tool_calls(), tool_failures(), tool_latency(), rating()],
    )
    builder = c.add_row(
        builder, "Models and cost", [cost_per_task(), tokens_per_task(), llm_latency(),
                                     llm_errors()]
    )
    return c.finish(builder)
