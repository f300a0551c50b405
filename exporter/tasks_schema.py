"""The ``tasks`` table of DESIGN.md as SQLAlchemy Core, honouring config.json's name mapping.

Used by the task database source to read, and by the simulator and tests to create and fill it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Column, DateTime, Index, MetaData, String, Table
from sqlalchemy.engine import Engine

from .config import TaskDbColumns

STATUSES = ("queued", "running", "completed", "failed", "cancelled")


def tasks_table(name: str = "tasks", columns: TaskDbColumns | None = None,
                metadata: MetaData | None = None) -> Table:
    c = columns or TaskDbColumns()
    schema, _, table = name.rpartition(".")
    cols: list[Column[Any]] = [
        Column(c.id, String(64), primary_key=True, key="id"),
        Column(c.task_type, String(64), nullable=False, key="task_type"),
        Column(c.agent, String(64), nullable=True, key="agent"),
        Column(c.status, String(16), nullable=False, key="status"),
        Column(c.created_at, DateTime(timezone=False), nullable=False, key="created_at"),
        Column(c.started_at, DateTime(timezone=False), nullable=True, key="started_at"),
        Column(c.finished_at, DateTime(timezone=False), nullable=True, key="finished_at"),
    ]
    if c.workflow:
        cols.append(Column(c.workflow, String(64), nullable=True, key="workflow"))
    if c.updated_at:
        cols.append(Column(c.updated_at, DateTime(timezone=False), nullable=True, key="updated_at"))
    t = Table(table, metadata or MetaData(), *cols, schema=schema or None)
    # The indexes the incremental reader relies on (docs/task-db.md).
    Index(f"ix_{table}_finished_at", t.c.finished_at)
    Index(f"ix_{table}_status", t.c.status)
    return t


def create_tasks_table(engine: Engine, name: str = "tasks",
                       columns: TaskDbColumns | None = None) -> Table:
    """Create the table and its indexes if missing; returns the Table."""
    md = MetaData()
    t = tasks_table(name, columns, md)
    md.create_all(engine, checkfirst=True)
    return t


__all__ = ["STATUSES", "create_tasks_table", "tasks_table"]
