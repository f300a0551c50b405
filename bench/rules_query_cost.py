"""What reading the largest histogram costs Prometheus, by query shape, with no rules loaded.

Serves the same two exporter shards as bench/rules_scale.py (1,000 agents x 20 task types:
1,105,685 series), lets a real Prometheus scrape them every 15s for ``--wait`` seconds (default
5m40s, so 5m windows are full), then times each query below ``--rounds`` times through
/api/v1/query. It answers one question behind the rule intervals: does a shorter range
(``[1m]`` instead of ``[5m]``) make the per-agent bucket rates cheaper, or does the cost follow
the number of series read?

    .venv/bin/python bench/rules_query_cost.py [--wait 340] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import rules_scale as rs  # noqa: E402

H = "aicrm_agent_task_duration_seconds"
QUERIES = (
    f"sum by (agent, le) (rate({H}_bucket[5m]))",
    f"sum by (agent, le) (rate({H}_bucket[1m]))",
    f"sum by (agent, le) ({H}_bucket)",
    f"count({H}_bucket)",
    f"sum by (agent) (rate({H}_count[5m]))",
    f'sum by (agent, le) (rate({H}_bucket{{le=~"1|5|30|120|600|3600|\\\\+Inf"}}[5m]))',
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wait", type=int, default=340, help="seconds of scraping before timing")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prometheus", default=shutil.which("prometheus") or "prometheus")
    args = ap.parse_args()

    agents = [f"agent-{i:04d}" for i in range(1000)]
    task_types = [f"task-{t:02d}" for t in range(rs.TASK_TYPES)]
    platforms = [f"platform-{p}" for p in range(rs.PLATFORMS)]
    shards = [
        rs.Shard(0, agents[:500], task_types, platforms[:5], agents, owns_task_db=True),
        rs.Shard(1, agents[500:], task_types, platforms[5:], agents, owns_task_db=False),
    ]
    for s in shards:
        s.prerender(args.wait // 15 + 8)
    servers = [rs.serve(s) for s in shards]
    with tempfile.TemporaryDirectory(prefix="aicrm-query-cost-") as tmp:
        targets = ", ".join(f'"127.0.0.1:{s.server_port}"' for s in servers)
        Path(tmp, "prometheus.yml").write_text(
            "global:\n  scrape_interval: 15s\n  scrape_timeout: 14s\n"
            "scrape_configs:\n  - job_name: aicrm-exporter\n"
            f"    static_configs: [{{targets: [{targets}]}}]\n")
        port = rs.free_port()
        base = f"http://127.0.0.1:{port}"
        prom = subprocess.Popen(
            [args.prometheus, f"--config.file={tmp}/prometheus.yml",
             f"--storage.tsdb.path={tmp}/data", f"--web.listen-address=127.0.0.1:{port}",
             "--log.level=warn"])
        try:
            time.sleep(args.wait)
            print(f"nproc {os.cpu_count()}; CPU {rs.cpu_model()}; "
                  f"{sum(s.series for s in shards):,} series; no rules loaded")
            print(f"{'seconds per round':>24}  {'result series':>13}  query")
            for q in QUERIES:
                times, n = [], 0
                for _ in range(args.rounds):
                    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": q})
                    t0 = time.monotonic()
                    with urllib.request.urlopen(url, timeout=120) as resp:
                        n = len(json.load(resp)["data"]["result"])
                    times.append(time.monotonic() - t0)
                print(f"{' '.join(f'{t:7.3f}' for t in times):>24}  {n:13,}  {q}", flush=True)
        finally:
            prom.terminate()
            prom.wait(timeout=60)
            for srv in servers:
                srv.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
