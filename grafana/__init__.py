"""Grafana dashboards as code (grafana-foundation-sdk) and their provisioning files.

`python -m grafana.generate` writes the committed JSON under grafana/dashboards/.
"""
