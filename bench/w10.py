#!/usr/bin/env python3
"""W10 (issue 9): does the store's cost grow with its history?

    bench/w10.sh [sqlite|postgres|both]        (default both)

For each backend: a project with two webhook workflows (`ack`: one jq step,
as in W1; `fails`: one jq step that raises, a dead letter per run) is fed
real webhooks by a real `plumb serve` (300 `ack`, 3 `fails`), so every row
is one plumb wrote. The store is then grown to 10k, 100k, 1M and 2M runs by
cloning those rows in SQL (runs, steps, step_attempts; new ids, timestamps
moved back in time): feeding 2M webhooks through the engine would take
longer than the benchmark is worth and measures intake, not history. The
first 1M runs are 0-6 days old, the second 1M 31-60 days old.

At each size, with `plumb serve` running (retention set long enough to keep
everything): `plumb status` and `plumb dlq list` (the CLI, process start
included, 10 runs each), `GET /api/v1/status` and `GET /api/v1/dlq`
(30 requests each), the store's bytes, intake (hey, 20,000 webhooks at
c=64 on `ack`, closed loop), and serve's RSS once those ran.

Then the purge: W1 at a fixed rate (hey, c=64; 2,000 req/s on SQLite, 500
on PostgreSQL, each well under its maximum here) for three 10 s windows with serve at 2M runs and retention long (no purge), then serve
restarted under the default retention (30 days), whose purge deletes the 1M
old runs while three more 10 s windows run. Reported: W1 p99 of each window,
and how long the purge took.

Needs hey, curl-free (stdlib only) Python 3, and for PostgreSQL `psql` and
PLUMB_BENCH_POSTGRES (default postgres://postgres@127.0.0.1:5432/postgres,
whose user must create databases). Results: bench/results/w10-<time>.txt
and .json.
"""

import http.client
import json
import os
import re
import socket
import statistics
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUMB = os.environ.get("PLUMB_BIN", os.path.join(ROOT, "target/release/plumb"))
ADMIN = os.environ.get("PLUMB_BENCH_POSTGRES", "postgres://postgres@127.0.0.1:5432/postgres")
SIZES = [int(x) for x in os.environ.get("W10_SIZES", "10000 100000 1000000 2000000").split()]
# How long the purge may take before the benchmark stops waiting for it.
LIMIT = int(os.environ.get("W10_PURGE_LIMIT", "900"))
# Runs up to this many are young (0-6 days old), the rest old (31-60 days).
YOUNG = int(os.environ.get("W10_YOUNG", "1000000"))
DAY = 86_400_000
STAMP = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
OUT = os.path.join(ROOT, "bench/results", f"w10-{STAMP}.txt")
RESULTS = []


def say(line):
    print(line, flush=True)
    with open(OUT, "a") as f:
        f.write(line + "\n")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def now_ms():
    return int(time.time() * 1000)


def median_range(xs):
    xs = sorted(xs)
    return f"{statistics.median(xs):.1f} ({xs[0]:.1f}-{xs[-1]:.1f})"


# --- the two stores, seen from the outside ----------------------------------


class Sqlite:
    name = "sqlite"
    # W1's fixed rate during the purge: well under what this store takes.
    w1_rate = 2000

    def __init__(self, project):
        self.path = os.path.join(project, "plumb.db")
        self.store_line = "store: sqlite://plumb.db"

    def setup(self):
        pass

    def teardown(self):
        pass

    def bytes(self):
        return sum(
            os.path.getsize(self.path + ext)
            for ext in ("", "-wal", "-shm")
            if os.path.exists(self.path + ext)
        )

    def bytes_in_use(self):
        # Pages freed by a purge stay in the file for later rows.
        db = sqlite3.connect(self.path)
        try:
            pages, free, size = (db.execute(f"PRAGMA {p}").fetchone()[0]
                                 for p in ("page_count", "freelist_count", "page_size"))
            return (pages - free) * size
        finally:
            db.close()

    def scalar(self, sql):
        db = sqlite3.connect(self.path)
        try:
            return db.execute(sql).fetchone()[0]
        finally:
            db.close()

    def script(self, statements):
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("PRAGMA busy_timeout = 10000")
            for s in statements:
                db.execute("BEGIN")
                db.execute(s)
                db.execute("COMMIT")
        finally:
            db.close()

    def columns(self, table):
        db = sqlite3.connect(self.path)
        try:
            return [r[1] for r in db.execute(f"PRAGMA table_info({table})")]
        finally:
            db.close()

    def series(self, n0, n1):
        return (
            f"WITH RECURSIVE series(n) AS (SELECT {n0} UNION ALL SELECT n + 1 FROM series "
            f"WHERE n + 1 < {n1}) "
        )

    def new_id(self, ts, g):
        # Shaped like plumb's UUIDv7 ids (time first), unique by clone index.
        return (
            f"printf('%08x-%04x-7%03x-%04x-%012x', ({ts}) >> 16, ({ts}) & 65535, "
            f"({g}) & 4095, 32768 | ((({g}) >> 12) & 16383), {g})"
        )

    def version(self):
        return "SQLite " + sqlite3.sqlite_version + " (Python's; plumb bundles its own)"


class Postgres:
    name = "postgres"
    # PostgreSQL on the same 2 vCPUs takes ~2,000/s at most: a fixed rate
    # near it would measure saturation, not the purge.
    w1_rate = 500

    def __init__(self, project):
        self.db = f"plumb_w10_{os.getpid()}"
        u = urllib.parse.urlparse(ADMIN)
        # No TLS on loopback, as with a database on the same host (TLS set-up
        # is measured apart: it adds ~0.3 s to each CLI command).
        self.url = u._replace(path="/" + self.db, query="sslmode=disable").geturl()
        self.store_line = f"store: {self.url}"

    def psql(self, url, sql):
        return subprocess.run(
            ["psql", url, "-qAtX", "-v", "ON_ERROR_STOP=1", "-c", sql],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    def setup(self):
        self.psql(ADMIN, f"CREATE DATABASE {self.db}")

    def teardown(self):
        self.psql(ADMIN, f"DROP DATABASE IF EXISTS {self.db} WITH (FORCE)")

    def bytes(self):
        return int(self.psql(self.url, "SELECT pg_database_size(current_database())"))

    def bytes_in_use(self):
        # Space of deleted rows is reused after VACUUM (autovacuum's).
        return self.bytes()

    def scalar(self, sql):
        out = self.psql(self.url, sql)
        return None if out == "" else int(out)

    def script(self, statements):
        for s in statements:
            self.psql(self.url, s)
        # Autovacuum would have vacuumed and analyzed a table that grew over
        # months (a bulk insert leaves the visibility map empty, so every
        # index-only read visits the table until a vacuum has run).
        self.psql(self.url, "VACUUM (ANALYZE) runs")

    def columns(self, table):
        out = self.psql(
            self.url,
            "SELECT column_name FROM information_schema.columns "
            f"WHERE table_name = '{table}' AND table_schema = current_schema() ORDER BY ordinal_position",
        )
        return out.split("\n")

    def series(self, n0, n1):
        return f"WITH series(n) AS (SELECT generate_series({n0}::bigint, {n1 - 1}::bigint)) "

    def new_id(self, ts, g):
        h = lambda v, w: f"lpad(to_hex({v}), {w}, '0')"  # noqa: E731
        return (
            f"{h(f'({ts}) >> 16', 8)} || '-' || {h(f'({ts}) & 65535', 4)} || '-7' || "
            f"{h(f'({g}) & 4095', 3)} || '-' || to_hex(32768 | ((({g}) >> 12) & 16383)) || '-' || "
            f"{h(g, 12)}"
        )

    def version(self):
        return "PostgreSQL " + self.psql(ADMIN, "SHOW server_version")


# --- the project and its serve ---------------------------------------------


class Project:
    def __init__(self, backend_cls):
        self.dir = tempfile.mkdtemp(prefix="plumb-w10-")
        self.store = backend_cls(self.dir)
        self.port = free_port()
        self.proc = None
        os.makedirs(os.path.join(self.dir, "workflows"))
        with open(os.path.join(self.dir, "workflows/ack.yaml"), "w") as f:
            f.write(
                "name: ack\nowner: bench@example.com\ndescription: W1, accept durably; one jq step.\n"
                "trigger:\n  webhook: { path: ack }\nsteps:\n  - id: shape\n    jq: '.trigger.body.id'\n"
            )
        with open(os.path.join(self.dir, "workflows/fails.yaml"), "w") as f:
            f.write(
                "name: fails\nowner: bench@example.com\ndescription: a dead letter per run.\n"
                "trigger:\n  webhook: { path: fails }\nsteps:\n  - id: shape\n"
                "    jq: 'error(\"bad record \\(.trigger.body.id)\")'\n"
            )
        self.configure(long_retention=True)
        self.store.setup()
        # /api/v1 needs a token: a viewer's.
        out = self.plumb("tokens", "create", "--name", "bench", "--role", "viewer", "--json").stdout
        self.token = json.loads(out)["token"]

    def configure(self, long_retention):
        retention = "defaults:\n  retention: { runs: 3650d, payloads: 3650d }\n" if long_retention else ""
        with open(os.path.join(self.dir, "plumb.yaml"), "w") as f:
            f.write(f"{self.store.store_line}\nlisten: 127.0.0.1:{self.port}\n{retention}")

    def plumb(self, *args, check=True):
        return subprocess.run(
            [PLUMB, "--project", self.dir, *args], capture_output=True, text=True, check=check
        )

    def start(self):
        log = open(os.path.join(self.dir, "serve.log"), "a")
        self.proc = subprocess.Popen([PLUMB, "--project", self.dir, "serve"], stdout=log, stderr=log)
        for _ in range(3000):
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                c.request("GET", "/readyz")
                if c.getresponse().status == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise SystemExit(f"plumb serve exited: see {self.dir}/serve.log")
            time.sleep(0.01)
        raise SystemExit("plumb serve did not become ready in 30 s")

    def stop(self):
        if self.proc:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def rss_mib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            m = re.search(r"VmRSS:\s+(\d+)", f.read())
        return int(m.group(1)) / 1024

    def get(self, conn, path):
        t0 = time.perf_counter()
        conn.request("GET", "/api/v1/" + path, headers={"Authorization": f"Bearer {self.token}"})
        r = conn.getresponse()
        body = r.read()
        ms = (time.perf_counter() - t0) * 1000
        if r.status != 200:
            raise SystemExit(f"GET {path}: {r.status} {body[:200]!r}")
        return ms, json.loads(body)

    def status(self):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        return self.get(c, "status")[1]

    def drained(self, limit=900):
        t0 = time.time()
        while time.time() - t0 < limit:
            s = self.status()
            if sum(w["queued"] + w["running"] for w in s["workflows"]) == 0:
                return
            time.sleep(0.5)
        raise SystemExit("runs still queued after 900 s")

    def send(self, path, n):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        for i in range(n):
            c.request("POST", "/hooks/" + path, body=json.dumps({"id": f"seed-{i}"}),
                      headers={"content-type": "application/json"})
            r = c.getresponse()
            r.read()
            if r.status != 202:
                raise SystemExit(f"seed webhook: {r.status}")


def hey(port, seconds, rate=None, count=None):
    body = os.path.join(tempfile.gettempdir(), "w10-body.json")
    with open(body, "w") as f:
        f.write('{"id":"w1","name":"user","email":"u@example.com"}')
    args = ["hey", *(["-n", str(count)] if count else ["-z", f"{seconds}s"]), "-c", "64",
            "-m", "POST", "-T", "application/json", "-D", body]
    if rate:
        args += ["-q", str(rate // 64)]
    out = subprocess.run(args + [f"http://127.0.0.1:{port}/hooks/ack"], capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = float(re.search(r"99% in ([\d.]+) secs", out).group(1)) * 1000
    p50 = float(re.search(r"50% in ([\d.]+) secs", out).group(1)) * 1000
    codes = dict(re.findall(r"\[(\d+)\]\s+(\d+) responses", out))
    return rps, p50, p99, codes


# --- growing the store -------------------------------------------------------


def grow(project, have, want, newest_age, oldest_age):
    """Clones the template runs until the store holds `want` runs; the new
    ones spread evenly from `newest_age` to `oldest_age` ms ago."""
    st = project.store
    templ = st.scalar("SELECT count(*) FROM w10_template")
    clones = (want - have) // templ
    if clones <= 0:
        return
    base = st.scalar("SELECT max(created_at) FROM w10_template")
    span = oldest_age - newest_age
    stmts = []
    chunk = max(1, 100_000 // templ)
    start = st.scalar("SELECT coalesce(max(n), -1) + 1 FROM w10_done")
    for n0 in range(start, start + clones, chunk):
        n1 = min(n0 + chunk, start + clones)
        # g: the clone's index over everything cloned so far; its age moves
        # evenly across the span over this growth step.
        shift = (
            f"(({now_ms()} - {newest_age} - ((n - {start}) * {span} / {clones})) - {base})"
        )
        g = f"(n * {templ} + t.k)"
        for table in ("runs", "steps", "step_attempts"):
            cols = st.columns(table)
            key = "id" if table == "runs" else "run_id"
            sel = []
            for c in cols:
                if c == key:
                    sel.append(st.new_id(f"t.created_at + {shift}", g))
                elif c.endswith("_at") and c != "created_at":
                    sel.append(f"x.{c} + {shift}" if table != "runs" else f"t.{c} + {shift}")
                elif c == "created_at" and table == "runs":
                    sel.append(f"t.created_at + {shift}")
                else:
                    sel.append(f"x.{c}" if table != "runs" else f"t.{c}")
            src = "w10_template t" if table == "runs" else f"w10_template t JOIN {table} x ON x.run_id = t.id"
            stmts.append(
                f"{st.series(n0, n1)}INSERT INTO {table} ({', '.join(cols)}) "
                f"SELECT {', '.join(sel)} FROM series, {src}"
            )
        stmts.append(f"INSERT INTO w10_done (n) VALUES ({n1 - 1})")
    st.script(stmts)


def measure(project, size, backend):
    p = project
    p.start()
    time.sleep(2)
    runs = p.store.scalar("SELECT count(*) FROM runs")

    def cli(*args):
        xs = []
        for _ in range(10):
            t0 = time.perf_counter()
            # Exit status 1 means "unhealthy" (the dead letters): still a
            # complete answer.
            p.plumb(*args, check=False)
            xs.append((time.perf_counter() - t0) * 1000)
        return xs

    cli_status = cli("status")
    cli_dlq = cli("dlq", "list")
    conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=30)
    api_status = [p.get(conn, "status")[0] for _ in range(30)]
    api_dlq = [p.get(conn, "dlq")[0] for _ in range(30)]
    size_bytes = p.store.bytes()
    status = p.status()
    # Intake: 20,000 webhooks at c=64 (adds 20,000 runs to the next size).
    rps, _, p99, codes = hey(p.port, None, count=20_000)
    p.drained()
    rss = p.rss_mib()
    row = {
        "backend": backend, "runs": runs, "cli_status_ms": cli_status, "cli_dlq_ms": cli_dlq,
        "api_status_ms": api_status, "api_dlq_ms": api_dlq, "intake_rps": rps,
        "intake_p99_ms": p99, "intake_codes": codes, "store_bytes": size_bytes,
        "serve_rss_mib": rss, "dead_letters": sum(w["dead_letters"] for w in status["workflows"]),
    }
    RESULTS.append(row)
    say(
        f"{backend:8} {size:>9,} runs ({runs:,} stored, {row['dead_letters']:,} dead letters): "
        f"plumb status {median_range(cli_status)} ms, dlq list {median_range(cli_dlq)} ms, "
        f"GET status {median_range(api_status)} ms, GET dlq {median_range(api_dlq)} ms, "
        f"intake {rps:,.0f} req/s (p99 {p99:.1f} ms, {codes}), "
        f"store {size_bytes / 2**20:,.0f} MiB ({size_bytes / max(runs, 1):,.0f} B/run), serve RSS {rss:.1f} MiB"
    )


def purge_phase(project, backend):
    p = project
    # Baseline: W1 at a fixed rate with no purge (serve still up from 2M).
    base = []
    for _ in range(3):
        _, _, p99, codes = hey(p.port, 10, rate=p.store.w1_rate)
        base.append(p99)
        say(f"{backend:8} W1 window without purge: p99 {p99:.1f} ms, {codes}")
        p.drained()
    p.stop()
    cutoff = now_ms() - 30 * DAY - 3_600_000  # an hour of margin for the run's length
    count_old = f"SELECT count(*) FROM runs WHERE created_at < {cutoff}"
    old = p.store.scalar(count_old)
    p.configure(long_retention=False)
    p.start()
    started = time.time()
    # Watches the purge from the outside, once a second, until it is done.
    finished = {}

    def watch():
        while time.time() - started < LIMIT:
            if p.store.scalar(count_old) == 0:
                finished["at"] = time.time()
                return
            time.sleep(1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    time.sleep(5)  # the purge job's first pass starts 5 s after start
    during = []
    for _ in range(3):
        _, _, p99, codes = hey(p.port, 10, rate=p.store.w1_rate)
        during.append(p99)
        say(f"{backend:8} W1 window during purge: p99 {p99:.1f} ms, {codes}; "
            f"purge {'done' if 'at' in finished else 'still going'}")
    watcher.join()
    took = finished.get("at", time.time()) - started - 5
    left = p.store.scalar(count_old)
    p.drained()
    RESULTS.append({"backend": backend, "purge_old_runs": old, "purge_seconds": took,
                    "w1_p99_no_purge_ms": base, "w1_p99_during_purge_ms": during, "old_left": left})
    say(
        f"{backend:8} purge of {old:,} old runs: {took:.0f} s ({old / took:,.0f} runs/s), {left} left; "
        f"W1 at {p.store.w1_rate:,} req/s p99 without purge {median_range(base)} ms, during purge {median_range(during)} ms; "
        f"store after {p.store.bytes() / 2**20:,.0f} MiB ({p.store.bytes_in_use() / 2**20:,.0f} MiB in use), "
        f"serve RSS {p.rss_mib():.1f} MiB"
    )


def bench(backend_cls):
    p = Project(backend_cls)
    name = p.store.name
    try:
        say(f"== {name}: {p.store.version()}")
        p.start()
        p.send("ack", 300)
        p.send("fails", 3)
        p.drained()
        p.stop()
        # The template: the 303 runs a real serve wrote, numbered.
        st = p.store
        st.script([
            "CREATE TABLE w10_template AS SELECT row_number() OVER (ORDER BY id) - 1 AS k, * FROM runs",
            "CREATE TABLE w10_done (n BIGINT NOT NULL)",
        ])
        for size in SIZES:
            have = st.scalar("SELECT count(*) FROM runs")
            t0 = time.time()
            if size <= YOUNG:
                grow(p, have, size, 60_000, 6 * DAY)
            else:
                grow(p, have, size, 31 * DAY, 60 * DAY)
            have = st.scalar("SELECT count(*) FROM runs")
            say(f"{name:8} grown to {have:,} runs in {time.time() - t0:.0f} s")
            measure(p, size, name)
            if size != SIZES[-1]:
                p.stop()
        if SIZES[-1] > YOUNG:
            purge_phase(p, name)
        p.stop()
    finally:
        p.stop()
        p.store.teardown()


def main():
    which = sys.argv[1] if len(sys.argv) > 1 else "both"
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    say(f"== machine: {os.cpu_count()} cores, {cpu}; {subprocess.run([PLUMB, '--version'], capture_output=True, text=True).stdout.strip()}")
    for cls in {"sqlite": [Sqlite], "postgres": [Postgres], "both": [Sqlite, Postgres]}[which]:
        bench(cls)
    with open(OUT.replace(".txt", ".json"), "w") as f:
        json.dump(RESULTS, f, indent=1)
    say(f"results: {OUT}")


if __name__ == "__main__":
    main()
