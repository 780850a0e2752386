"""Scrape cost of stellarbase-agent beside Debian's prometheus-node-exporter on this host.

Starts both on free loopback ports (the agent configured with real PostgreSQL, Redis and
S3 from tests/servers.py), then:

- scrapes each --scrapes times, alternating between the two so that noise on the host
  hits both alike, with the request headers Prometheus 2.42 sends (gzip accepted) and a
  new connection per scrape: p50/p99 latency, and CPU seconds per scrape from the
  utime+stime deltas in /proc/<pid>/stat of each process tree;
- RSS: VmRSS of every process of each tree (the one-file binary is a bootloader parent
  and a Python child: both count);
- idle CPU: both scraped every 15 s for --idle-seconds, CPU time over wall time.

Targets (issue 6): agent p99 at most 2x node exporter's, agent RSS at most 60 MB, agent
idle CPU below 1% of one core at a 15 s scrape interval.

    .venv/bin/python bench/agent.py [--scrapes 200] [--idle-seconds 60] [--python]
        [--binary PATH] [--no-deps] [--backups]

With --backups (root), the agent measured is the stellarbase-agent.service of a pilot
installed in a throwaway systemd (tests/systemd_sandbox.py) with encrypted WAL archiving
and base backups to S3 (moto on loopback), while a writer switches a WAL segment every
second: the agent's archiver uploads all the time it is scraped.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "installer"))

from tests import servers  # noqa: E402

BINARY = REPO / "dist" / "stellarbase"
NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"

TARGET_P99_RATIO = 2.0
TARGET_RSS_BYTES = 60_000_000
TARGET_IDLE_CPU = 0.01
SCRAPE_INTERVAL_S = 15.0

# What Prometheus 2.42 sends with every scrape (scrape/scrape.go in its source tree).
SCRAPE_HEADERS = {
    "Accept": (
        "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
        "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
    ),
    "Accept-Encoding": "gzip",
    "User-Agent": "Prometheus/2.42.0",
    "X-Prometheus-Scrape-Timeout-Seconds": "10",
}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --- /proc ------------------------------------------------------------------------------------


def process_tree(root: int) -> list[int]:
    """root and all its descendants alive now."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def cpu_seconds(root: int) -> float:
    """utime + stime of every process of the tree (all their threads included)."""
    ticks = 0
    for pid in process_tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return ticks / CLOCK_TICKS


def memory_by_process(root: int, key: str = "VmRSS") -> dict[int, int]:
    """VmRSS (or another Vm* field of /proc/<pid>/status) of each process of the tree."""
    found = {}
    for pid in process_tree(root):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith(f"{key}:"):
                found[pid] = int(line.split()[1]) * 1024
    return found


def memory_bytes(root: int, key: str = "VmRSS") -> int:
    return sum(memory_by_process(root, key).values())


# --- the two exporters ------------------------------------------------------------------------


@dataclass
class Exporter:
    name: str
    proc: subprocess.Popen[bytes] | None  # None: a unit in the sandbox, measured by pid
    url: str
    pid: int = 0  # the host-side pid of the process tree's root
    latencies: list[float] = field(default_factory=list)
    last_body: bytes = b""

    def __post_init__(self) -> None:
        if self.proc is not None:
            self.pid = self.proc.pid

    def scrape(self) -> float:
        parts = urlsplit(self.url)
        start = time.perf_counter()
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
        try:
            conn.request("GET", parts.path, headers=SCRAPE_HEADERS)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{self.name}: {self.url} answered {resp.status}")
            gzipped = resp.getheader("Content-Encoding") == "gzip"
        finally:
            conn.close()
        took = time.perf_counter() - start
        self.last_body = gzip.decompress(body) if gzipped else body
        return took

    def processes(self) -> int:
        return len(process_tree(self.pid))

    def stop(self) -> None:
        if self.proc is None:
            return  # the sandbox's poweroff stops it
        self.proc.terminate()  # the one-file bootloader passes SIGTERM on to its child
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            # Children first, while the parent still holds them: their pids are still theirs.
            for pid in reversed(process_tree(self.proc.pid)):
                os.kill(pid, signal.SIGKILL)
            self.proc.wait()


def wait_answering(exporter: Exporter, path: str, timeout: float = 60) -> None:
    parts = urlsplit(exporter.url)
    deadline = time.monotonic() + timeout
    while True:
        if exporter.proc is not None and exporter.proc.poll() is not None:
            raise RuntimeError(f"{exporter.name} exited with {exporter.proc.returncode}")
        try:
            conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=2)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{exporter.name} did not answer {path} in {timeout:.0f} s")
        time.sleep(0.1)


def start_node_exporter(logs: Path) -> Exporter:
    port = servers.free_port()
    proc = subprocess.Popen(
        [NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=(logs / "node-exporter.log").open("wb"),
        stdin=subprocess.DEVNULL,
    )
    exporter = Exporter("node exporter", proc, f"http://127.0.0.1:{port}/metrics")
    wait_answering(exporter, "/metrics")
    return exporter


def agent_settings(base: Path, port: int, deps: dict[str, dict[str, str]] | None) -> Path:
    data: dict[str, object] = {
        "service": "agent",
        "bind": "127.0.0.1",
        "port": port,
        "log_level": "warning",
        "check_timeout_seconds": 3,
    }
    if deps:
        data["postgres"] = {"url": deps["postgres"]["url"]}
        data["redis"] = {"url": deps["redis"]["url"]}
        s3 = deps["s3"]
        data["s3"] = {k: s3[k] for k in ("endpoint", "bucket", "region")}
    path = base / "agent.json"
    path.write_text(json.dumps(data))
    return path


def start_agent(
    base: Path, binary: Path | None, deps: dict[str, dict[str, str]] | None
) -> tuple[Exporter, str]:
    port = servers.free_port()
    settings = agent_settings(base, port, deps)
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    if deps:
        env["STELLARBASE_POSTGRES__PASSWORD"] = deps["postgres"]["password"]
        env["STELLARBASE_REDIS__PASSWORD"] = deps["redis"]["password"]
        env["STELLARBASE_S3__ACCESS_KEY"] = deps["s3"]["access_key"]
        env["STELLARBASE_S3__SECRET_KEY"] = deps["s3"]["secret_key"]
    if binary is None:
        env["PYTHONPATH"] = str(REPO / "installer")
        argv = [sys.executable, "-m", "stellarbase"]
        how = "python -m stellarbase run agent"
    else:
        argv = [str(binary)]
        how = f"{binary} run agent (one-file binary)"
    proc = subprocess.Popen(
        [*argv, "run", "agent", "--settings", str(settings)],
        env=env,
        stdout=(base / "agent.log").open("wb"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    exporter = Exporter("agent", proc, f"http://127.0.0.1:{port}/metrics")
    wait_answering(exporter, "/healthz")
    return exporter, how


# --- with backups on: an installed pilot in a throwaway systemd ---------------------------------


class BackupsPilot:
    """A pilot installed in a systemd sandbox with WAL archiving and base backups to S3
    (moto on loopback, encrypted), and a writer that fills and switches WAL segments all
    the time the agent is measured: the agent runs as installed, archiver included."""

    def __init__(self, base: Path, binary: Path) -> None:
        from tests.integration.conftest import copy_binary, free_port_block
        from tests.systemd_sandbox import SystemdSandbox

        self.s3 = servers.start_s3(base)
        self.sandbox = SystemdSandbox.boot()
        self.binary = copy_binary(self.sandbox, binary)
        ports = free_port_block(8)
        self.agent_port, self.pg_port = ports + 1, ports + 4
        sets = [
            f"api.port={ports}",
            f"agent.port={ports + 1}",
            f"worker.port={ports + 2}",
            f"local.postgres.port={ports + 4}",
            f"local.redis.port={ports + 5}",
            "backup.repository=s3",
            "backup.archive_timeout_seconds=10",
            f"s3.endpoint={self.s3.endpoint}",
            f"s3.bucket={self.s3.bucket}",
            f"s3.region={self.s3.region}",
        ]
        env = {
            "STELLARBASE_S3__ACCESS_KEY": self.s3.access_key,
            "STELLARBASE_S3__SECRET_KEY": self.s3.secret_key,
            "STELLARBASE_BACKUP__ENCRYPTION_KEY": base64.b64encode(os.urandom(32)).decode(),
        }
        argv = [str(self.binary), "install", "--tier", "pilot", *(f"--set={s}" for s in sets)]
        out = self.sandbox.run(argv, env=env, check=False, timeout=300)
        if out.returncode != 0:
            raise RuntimeError(f"install exited {out.returncode}: {out.stdout}{out.stderr}")
        out = self.sandbox.run([str(self.binary), "backup", "now"], check=False, timeout=300)
        if out.returncode != 0:
            raise RuntimeError(f"backup now exited {out.returncode}: {out.stdout}{out.stderr}")
        self.sql("CREATE TABLE IF NOT EXISTS bench_wal (id int, pad text)")
        self.segments = 0
        self._stop = threading.Event()
        self._writer = threading.Thread(target=self._write_wal, daemon=True)
        self._writer.start()

    def sql(self, query: str) -> str:
        admin = self.sandbox.path("/etc/stellarbase/postgres-admin.env").read_text()
        password = admin.split("=", 1)[1].strip().strip("'\"")
        out = self.sandbox.run(
            ["psql", "-h", "127.0.0.1", "-p", str(self.pg_port), "-U", "postgres", "-d",
             "stellarbase", "-AtqX", "-v", "ON_ERROR_STOP=1", "-c", query],
            env={"PGPASSWORD": password},
        )  # fmt: skip
        return out.stdout.strip()

    def _write_wal(self) -> None:
        """About 5 MB of rows and a segment switch every second."""
        while not self._stop.wait(1.0):
            self.sql(
                "INSERT INTO bench_wal SELECT g, repeat(md5(g::text), 8) "
                "FROM generate_series(1, 20000) g; TRUNCATE bench_wal; SELECT pg_switch_wal()"
            )
            self.segments += 1

    def uploads(self) -> int:
        """Objects the agent has uploaded, from its last scrape."""
        text = self.exporter().last_body.decode()
        return sum(
            int(float(line.rsplit(" ", 1)[1]))
            for line in text.splitlines()
            if line.startswith("stellarbase_backup_uploads_total")
        )

    def exporter(self) -> Exporter:
        if not hasattr(self, "_exporter"):
            pid = host_pid(self.sandbox.pid, self.sandbox.main_pid("stellarbase-agent.service"))
            url = f"http://127.0.0.1:{self.agent_port}/metrics"
            self._exporter = Exporter("agent", None, url, pid=pid)
            wait_answering(self._exporter, "/healthz")
        return self._exporter

    def stop(self) -> None:
        self._stop.set()
        self._writer.join(timeout=30)
        self.sandbox.poweroff()


def host_pid(sandbox_init: int, ns_pid: int) -> int:
    """The host's pid of the process that is ns_pid inside the sandbox's pid namespace."""
    namespace = os.readlink(f"/proc/{sandbox_init}/ns/pid")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "ns" / "pid") != namespace:
                continue
            status = (entry / "status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("NSpid:") and int(line.split()[-1]) == ns_pid:
                return int(entry.name)
    raise RuntimeError(f"no process is pid {ns_pid} in the sandbox")


# --- measuring --------------------------------------------------------------------------------


def percentile(values: list[float], q: int) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[q - 1] if q < 100 else max(values)
    )


def scrape_side_by_side(exporters: list[Exporter], scrapes: int) -> dict[str, float]:
    """CPU seconds per scrape of each exporter; latencies land on the exporters."""
    for exporter in exporters:  # first scrapes pay for imports and caches
        for _ in range(10):
            exporter.scrape()
    before = {e.name: cpu_seconds(e.pid) for e in exporters}
    for i in range(scrapes):
        order = exporters if i % 2 == 0 else exporters[::-1]
        for exporter in order:
            exporter.latencies.append(exporter.scrape())
    return {e.name: (cpu_seconds(e.pid) - before[e.name]) / scrapes for e in exporters}


def idle_cpu(exporters: list[Exporter], seconds: float) -> dict[str, float]:
    """Share of one core each exporter uses while scraped every 15 s."""
    start = time.monotonic()
    before = {e.name: cpu_seconds(e.pid) for e in exporters}
    next_scrape = start
    while True:
        now = time.monotonic()
        if now - start >= seconds:
            break
        if now >= next_scrape:
            for exporter in exporters:
                exporter.scrape()
            next_scrape += SCRAPE_INTERVAL_S
        time.sleep(min(next_scrape, start + seconds) - time.monotonic())
    wall = time.monotonic() - start
    return {e.name: (cpu_seconds(e.pid) - before[e.name]) / wall for e in exporters}


def samples(body: bytes) -> int:
    return sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))


def node_exporter_version() -> str:
    out = subprocess.run(
        [NODE_EXPORTER, "--version"], capture_output=True, text=True, check=False, timeout=10
    )
    first = (out.stdout or out.stderr).splitlines()
    return first[0] if first else "unknown version"


# --- report -----------------------------------------------------------------------------------


def row(label: str, ours: float, theirs: float, fmt: str, target: str = "") -> str:
    ratio = f"{ours / theirs:6.2f}x" if theirs else "      -"
    return f"  {label:<28} {ours:{fmt}} {theirs:{fmt}}   {ratio}   {target}"


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(
    agent: Exporter,
    node: Exporter,
    cpu: dict[str, float],
    rss: dict[str, int],
    hwm: dict[str, int],
    idle: dict[str, float],
    idle_seconds: float,
) -> None:
    a, n = agent.latencies, node.latencies
    p50 = (statistics.median(a) * 1e3, statistics.median(n) * 1e3)
    p99 = (percentile(a, 99) * 1e3, percentile(n, 99) * 1e3)
    print(f"  {'':<28} {'agent':>12} {'node exp.':>12}   {'ratio':>7}   target")
    print(row("scrape p50 (ms)", *p50, "12.2f"))
    print(row("scrape p99 (ms)", *p99, "12.2f", f"<= {TARGET_P99_RATIO:g}x"))
    print(row("scrape max (ms)", max(a) * 1e3, max(n) * 1e3, "12.2f"))
    print(row("CPU per scrape (ms)", cpu[agent.name] * 1e3, cpu[node.name] * 1e3, "12.2f"))
    print(row("samples per scrape", samples(agent.last_body), samples(node.last_body), "12.0f"))
    print(
        row("exposition size (kB)", len(agent.last_body) / 1e3, len(node.last_body) / 1e3, "12.1f")
    )
    print(row("processes", agent.processes(), node.processes(), "12.0f"))
    rss_target = f"agent <= {TARGET_RSS_BYTES / 1e6:g} MB"
    print(row("RSS (MB)", rss[agent.name] / 1e6, rss[node.name] / 1e6, "12.1f", rss_target))
    print(row("peak RSS, VmHWM (MB)", hwm[agent.name] / 1e6, hwm[node.name] / 1e6, "12.1f"))
    parts = ", ".join(
        f"pid {pid} {rss / 1e6:.1f} MB" for pid, rss in memory_by_process(agent.pid).items()
    )
    print(f"  agent RSS by process (parent first): {parts}")
    idle_label = f"idle CPU, {idle_seconds:g} s (% core)"
    idle_target = f"agent < {TARGET_IDLE_CPU * 100:g}%"
    print(row(idle_label, idle[agent.name] * 100, idle[node.name] * 100, "12.3f", idle_target))
    print("targets:")
    ratio = p99[0] / p99[1]
    print(f"  p99 ratio {ratio:.2f} <= {TARGET_P99_RATIO:g}: {verdict(ratio <= TARGET_P99_RATIO)}")
    ok = rss[agent.name] <= TARGET_RSS_BYTES
    print(f"  RSS {rss[agent.name] / 1e6:.1f} MB <= {TARGET_RSS_BYTES / 1e6:g} MB: {verdict(ok)}")
    ok = idle[agent.name] < TARGET_IDLE_CPU
    print(f"  idle CPU {idle[agent.name] * 100:.3f}% < {TARGET_IDLE_CPU * 100:g}%: {verdict(ok)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--scrapes", type=int, default=200)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument(
        "--python", action="store_true", help="run the agent from source, not dist/stellarbase"
    )
    parser.add_argument("--binary", type=Path, default=BINARY, help="default: dist/stellarbase")
    parser.add_argument(
        "--no-deps", action="store_true", help="no PostgreSQL, Redis and S3 for the agent"
    )
    parser.add_argument(
        "--backups",
        action="store_true",
        help="the agent of a pilot installed in a systemd sandbox (root) with encrypted WAL "
        "archiving and base backups to S3, under a constant WAL load",
    )
    args = parser.parse_args()
    if args.backups and args.python:
        sys.exit("--backups measures the installed binary; leave out --python")
    if not shutil.which(NODE_EXPORTER):
        sys.exit(f"{NODE_EXPORTER} is missing: apt-get install prometheus-node-exporter")
    if not args.python and not args.binary.exists():
        sys.exit(f"{args.binary} is missing: bash packaging/build.sh, or pass --python")

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        started: list[Exporter] = []
        pilot: BackupsPilot | None = None
        try:
            if args.backups:
                pilot = BackupsPilot(base, args.binary)
                agent = pilot.exporter()
                how = f"{args.binary} as stellarbase-agent.service of an installed pilot"
                deps_text = "local pg and redis, encrypted S3 backups, WAL switched every second"
            else:
                deps = None
                if not args.no_deps:
                    pg, rd = servers.start_postgres(base), servers.start_redis(base)
                    deps = servers.site_deps(pg, rd, servers.start_s3(base))
                agent, how = start_agent(base, None if args.python else args.binary, deps)
                deps_text = "none" if args.no_deps else "pg, redis, s3"
            started.append(agent)
            node = start_node_exporter(base)
            started.append(node)
            print(f"agent: {how}, dependencies: {deps_text}")
            print(f"node exporter: {node_exporter_version()}, default collectors")
            print(f"{args.scrapes} scrapes each, alternating; idle: one scrape each every 15 s")
            exporters = [agent, node]
            cpu = scrape_side_by_side(exporters, args.scrapes)
            rss = {e.name: memory_bytes(e.pid) for e in exporters}
            idle = idle_cpu(exporters, args.idle_seconds)
            rss = {e.name: max(rss[e.name], memory_bytes(e.pid)) for e in exporters}
            hwm = {e.name: memory_bytes(e.pid, "VmHWM") for e in exporters}
            report(agent, node, cpu, rss, hwm, idle, args.idle_seconds)
            if pilot is not None:
                print(
                    f"WAL load: {pilot.segments} segment switches; "
                    f"{pilot.uploads()} objects uploaded by the agent"
                )
        finally:
            for exporter in started:
                exporter.stop()
            if pilot is not None:
                pilot.stop()
            servers.stop_all()


if __name__ == "__main__":
    main()
