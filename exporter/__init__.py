"""AI-CRM Analytics exporter: source-system data to Prometheus metrics."""

__version__ = "0.1.0"
