#!/usr/bin/env python3
"""Turns bench/results/*.jsonl (written by bench/run.sh) into tables in BENCHMARKS.md, between
the markers <!-- bench:begin --> and <!-- bench:end --> (the rest of the file is kept), a
chart, bench/results/chart.png, and the scaling-curve plots bench/results/curve-*.png (needs
matplotlib, installed in bench/python/.venv).

    bench/python/.venv/bin/python bench/report.py [--results bench/results] [--output BENCHMARKS.md]

Every figure in the generated section comes from the result files: the goals table and
whether each goal is met, the tables, the curves, the machine and database facts (meta.json)
and the run time (timings.json). A field an older dcrf-bench did
not write is shown as unknown ("?"), never as zero. Rows with errors, unmatched replies, lost
requests, duplicate pushes or censored latencies get a warning line; a run made on a working
tree with uncommitted changes gets a loud warning at the top.
"""
import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"
INTRO = """# Benchmarks

Side-by-side measurements of `dcrf-demo` (this project), the same surface written with the
Python incumbent (Django Channels REST Framework 1.3 under uvicorn, `bench/python/`), and a
hand-written ceilings: a bare WebSocket echo server (`dcrf-bench raw-echo`), a bare retrieve
server on the same data (`dcrf-bench raw-retrieve`) and a bare fan-out server
(`dcrf-bench raw-fanout`). The load generator is
`crates/dcrf-bench`; `bench/run.sh` runs everything and regenerates the section below.
"""

SERVERS = ["raw", "raw-retrieve", "raw-fanout", "dcrf", "python"]
DB_NAMES = {"sqlite": "SQLite", "postgres": "PostgreSQL"}
SERVER_NAMES = {"raw": "raw echo", "raw-retrieve": "raw retrieve", "raw-fanout": "raw fan-out",
                "dcrf": "dcrf-demo", "python": "Python DCRF"}
# The ceiling of each scenario: the hand-written server it is compared with.
RAW_FOR = {"echo": "raw", "retrieve": "raw-retrieve", "pg-retrieve": "raw-retrieve"}
REQUEST_SCENARIOS = ["echo", "retrieve", "list", "create", "patch"]
# The pg group (bench/run.sh's `pg`): the same scenarios on PostgreSQL.
PG_SCENARIOS = ["pg-retrieve", "pg-patch"]
REQUEST_TAGS = REQUEST_SCENARIOS + PG_SCENARIOS
CURVES = ["curve-echo", "curve-retrieve", "curve-fanout", "curve-idle"]
PERCENTILES = ["p50_us", "p90_us", "p99_us", "p999_us", "max_us"]
# dcrf-bench before `censored` existed clamped every latency at 60 s without saying so.
LEGACY_CAP_US = 60_000_000.0
UNKNOWN = "?"

# The project's goals (the performance issue's table), each judged on one run's figures.
GOAL_ECHO_RAW = 0.85
GOAL_RETRIEVE_RAW = 0.7
GOAL_RETRIEVE_PY = 50.0
GOAL_CRUD_PY = 30.0
GOAL_CRUD_SCENARIOS = ("create", "patch", "list")
GOAL_PG_PY = 20.0
GOAL_PG_SCENARIOS = ("retrieve", "patch")
GOAL_PG_RETRIEVE_RAW = 0.7
GOAL_FANOUT_RAW = 0.8
GOAL_FANOUT_SUBSCRIBERS = (1_000, 10_000)
GOAL_IDLE_KIB = 10.0
GOAL_CONNECTIONS = 19_000
# Where the hand-written part of BENCHMARKS.md explains what stands in the way of a goal.
PROFILES_ANCHOR = "#what-stands-between-us-and-the-goals-profiles"

def load(results: Path):
    """The result files: groups (TAG.jsonl: one row per server), curves (curve-*.jsonl: one
    row per point and server, the point in "point"), meta.json and timings.json."""
    groups, curves = {}, {}
    for path in sorted(results.glob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not rows:
            continue
        if path.stem.startswith("curve-"):
            curves[path.stem] = rows
        else:
            groups[path.stem] = {row.get("server") or row.get("label"): row for row in rows}
    meta_path = results / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    timings_path = results / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    return groups, curves, meta, timings


def point_of(row):
    """A curve row's x value: the point run.sh recorded, else its connections."""
    return row.get("point", row.get("connections"))


def curve_series(rows, server):
    """{point: row} of one server in a curve."""
    return {point_of(r): r for r in rows if (r.get("server") or r.get("label")) == server}


def ok(row):
    return row is not None and not row.get("failed")


def fmt(v, digits=0):
    if v is None:
        return "–"
    if isinstance(v, float) and math.isnan(v):
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, float)):
        if digits == 0:
            return f"{v:,.0f}"
        return f"{v:,.{digits}f}"
    return str(v)


def ratio_value(a, b):
    if a is None or b in (None, 0):
        return None
    return a / b


def ratio(a, b):
    r = ratio_value(a, b)
    return "–" if r is None else f"{r:.2f}×"


def get(row, key):
    return row.get(key) if ok(row) else None


def cell(row, key, digits=0):
    """A plain figure; "?" when the field is missing (an older dcrf-bench)."""
    if row is None:
        return "–"
    if row.get("failed"):
        return "failed"
    if key not in row:
        return UNKNOWN
    return fmt(row.get(key), digits)


def censored_bound(row):
    """The latency (µs) from which this row's percentiles are lower bounds, or None when they
    are all measurements. Rows from before `censored` existed: the old 60 s clamp."""
    if not ok(row):
        return None
    if "censored" in row:
        if row.get("censored"):
            return row.get("censored_min_us") or 0.0
        return None
    return LEGACY_CAP_US * 0.999


def is_censored(row, key):
    v = get(row, key)
    b = censored_bound(row)
    return v is not None and b is not None and v >= b


def lat(row, key, digits=1):
    """A latency figure, shown as "≥ X" when it is only a lower bound."""
    c = cell(row, key, digits)
    if is_censored(row, key):
        return f"≥ {c}"
    return c


def lat_ms(row, key, digits=1):
    """A latency in milliseconds, "≥ X" when it is only a lower bound."""
    v = get(row, key) if row is not None else None
    if v is None:
        return cell(row, key)
    c = fmt(v / 1000, digits if v < 100_000 else 0)
    return f"≥ {c}" if is_censored(row, key) else c


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def tag_order(tag):
    """Sort key: the request scenarios in run order, then fan-out by mode and size, then idle."""
    if tag in REQUEST_TAGS:
        return (0, REQUEST_TAGS.index(tag), "", 0)
    fk = fanout_key(tag)
    if fk:
        return (1, 0, fk[0], fk[1])
    return (2, 0, tag, 0)


def fanout_key(tag):
    m = re.match(r"fanout-(\w+)-(\d+)$", tag)
    return (m.group(1), int(m.group(2))) if m else None


def legacy_fields(row):
    """The fields this row's (older) dcrf-bench did not write: unknown, not zero."""
    if not ok(row):
        return []
    return [k for k in ("censored", "duplicates") if k not in row
            and (k != "duplicates" or row.get("scenario") == "fanout")]


def problems(row):
    """What is wrong with a row's measurement, as short phrases (empty when nothing is). A
    row from an older dcrf-bench only gets a phrase when one of its latencies reached that
    generator's silent 60 s cap; the missing fields themselves are summed up once."""
    if not ok(row):
        return []
    out = []
    for key, what in (("errors", "errors"), ("lost", "lost"), ("unmatched", "unmatched"),
                      ("duplicates", "duplicate pushes"), ("connection_errors",
                                                           "connection errors")):
        if row.get(key):
            out.append(f"{fmt(row[key])} {what}")
    if row.get("censored"):
        out.append(f"{fmt(row['censored'])} censored latency samples (percentiles from "
                   f"{fmt(row.get('censored_min_us'), 1)} µs up are lower bounds)")
    if "censored" not in row:
        capped = [k.replace("_us", "") for k in PERCENTILES if is_censored(row, k)]
        if capped:
            out.append(f"{', '.join(capped)} reached the older dcrf-bench's silent 60 s "
                       "latency cap: they are lower bounds, not measurements")
    return out


def database_paragraph(meta):
    """The database facts of the run, from meta.json only; and warnings about them."""
    db = meta.get("database")
    warnings = []
    demo = meta.get("demo_database", "?")
    if not db:
        text = (f"**Database:** dcrf-demo used `--database {demo}`; the Python baseline's "
                "database was not recorded by this (older) `bench/run.sh`.")
        if ":memory:" in demo or "mode=memory" in demo:
            warnings.append(
                f"dcrf-demo ran on an in-memory SQLite database (`{demo}`) and the Python "
                "baseline's database was not recorded: the database scenarios (`retrieve`, "
                "`list`, `create`, `patch`, fan-out) do not compare like with like.")
        return text, warnings
    kind = db.get("kind", "?")
    probe = db.get("probe") or {}
    pd, pp = probe.get("dcrf") or {}, probe.get("python") or {}
    rep = pp.get("reported") or {}
    parts = []
    if kind == "sqlite":
        parts.append(
            "**Database:** both servers use a SQLite file created fresh for every server "
            f"start in a temporary directory (filesystem `{db.get('tmpdir_fs', '?')}`"
            + ("; fsync costs nothing there" if db.get("tmpdir_fs") == "tmpfs" else "")
            + ").")
        d = [f"`--database {db.get('demo_url', demo)}`"]
        if pd.get("journal_mode"):
            d.append(f"journal mode {pd['journal_mode']} (read from the file)")
        if db.get("demo_sqlite_source_id"):
            d.append(f"bundled SQLite of {db['demo_sqlite_source_id'][:10]}")
        parts.append("dcrf-demo: " + ", ".join(d) + ".")
        p = [f"`{db.get('python_env', '')}`"]
        if rep:
            p.append(f"journal_mode={rep.get('journal_mode', '?')}, "
                     f"synchronous={rep.get('synchronous', '?')}, "
                     f"busy_timeout={rep.get('busy_timeout_ms', '?')} ms, SQLite "
                     f"{rep.get('sqlite_version', '?')}"
                     + (f" of {rep['sqlite_source_id'][:10]}" if rep.get("sqlite_source_id")
                        else "")
                     + " (read back by `manage.py dbinfo`)")
        elif pp.get("journal_mode"):
            p.append(f"journal mode {pp['journal_mode']} (read from the file)")
        parts.append("Python: " + ", ".join(p) + ".")
        spw = (pd.get("syncs_per_write"), pp.get("syncs_per_write"))
        if any(v is not None for v in spw):
            parts.append(
                "fsync/fdatasync calls per committed write (strace, 1 s of `create` on one "
                f"connection before the runs): dcrf-demo {fmt(spw[0], 2)} "
                f"({fmt(pd.get('sync_calls'))} calls / {fmt(pd.get('writes'))} writes), "
                f"Python {fmt(spw[1], 2)} ({fmt(pp.get('sync_calls'))} / "
                f"{fmt(pp.get('writes'))}); with WAL, synchronous=FULL syncs at every commit "
                "and NORMAL only at checkpoints.")
            if None not in spw and (spw[0] >= 0.5) != (spw[1] >= 0.5):
                warnings.append(
                    f"the two servers do not sync alike (dcrf-demo {spw[0]:.2f} vs Python "
                    f"{spw[1]:.2f} fsyncs per write): their SQLite synchronous levels differ.")
        else:
            parts.append("The sync behaviour was not probed (`DB_PROBE=0` or no strace).")
        jm = {pd.get("journal_mode"), rep.get("journal_mode") or pp.get("journal_mode")}
        jm.discard(None)
        if len(jm) > 1:
            warnings.append(f"the journal modes differ: {', '.join(sorted(jm))}.")
    elif kind == "postgres":
        pg = db.get("postgres") or {}
        parts.append(
            "**Database:** both servers use PostgreSQL "
            f"{pg.get('server_version', rep.get('server_version', '?'))} on this machine "
            "(synchronous_commit="
            f"{pg.get('synchronous_commit', rep.get('synchronous_commit', '?'))}, fsync="
            f"{pg.get('fsync', rep.get('fsync', '?'))}), each on its own database created "
            f"fresh for every server start: dcrf-demo `--database {db.get('demo_url', demo)}`, "
            f"Python `{db.get('python_env', '')}`.")
    else:
        parts.append(f"**Database:** {kind}; dcrf-demo `--database {demo}`.")
    if db.get("demo_override"):
        warnings.append(
            f"dcrf-demo's database was overridden (`DEMO_DATABASE={db.get('demo_url')}`): the "
            "two sides do not use the same kind of database.")
    for name, pr in (("dcrf-demo", pd), ("Python", pp)):
        if pr.get("error"):
            warnings.append(f"the database probe of {name} failed: {pr['error']}")
    return " ".join(parts), warnings


def main_kind(meta):
    """The database of the main groups (older meta.json: SQLite)."""
    return (meta.get("database") or {}).get("kind", "sqlite")


def pg_tag(meta, scenario):
    """The group holding `scenario` on PostgreSQL: pg-SCENARIO, or the main group when the
    main groups ran on PostgreSQL."""
    return scenario if main_kind(meta) == "postgres" else f"pg-{scenario}"


def goals(groups, meta, db_unequal=False):
    """The goals table: every row of the issue's table, the figures of this run, the goal and
    whether it is met. `db_unequal`: the two sides did not use the same database (marks the
    database rows)."""
    rows = []

    def combine(checks, db=False):
        """checks: [(met or None, rows used)] → status text."""
        mets = [m for m, _ in checks]
        used = [r for _, rs in checks for r in rs]
        if not checks or all(m is None for m in mets):
            return "not measured"
        if any(m is False for m in mets):
            s = "not met"
        elif any(m is None for m in mets):
            s = "partly measured"
        else:
            s = "met"
        if db and db_unequal:
            return f"{s} (databases not alike, see warnings)"
        if not all(ok(r) and not problems(r) for r in used):
            return f"{s} (with warnings, see below)"
        if any(legacy_fields(r) for r in used):
            return f"{s} (older result file: censoring unknown)"
        return s

    def vs(tag, a, b, key, goal, digits=2):
        """dcrf `a` against `b` in group `tag`: (met, rows, text)."""
        g = groups.get(tag) or {}
        ra, rb = g.get(a), g.get(b)
        r = ratio_value(get(ra, key), get(rb, key))
        if r is None:
            if not g:
                why = "not run"
            elif any(x is not None and x.get("failed") for x in (ra, rb)):
                why = "failed"
            elif ra is None or rb is None:
                why = f"no {SERVER_NAMES.get(b if rb is None else a)} run"
            else:
                why = "–"
            return None, [x for x in (ra, rb) if x], why
        unit = "deliveries/s" if key == "deliveries_per_s" else "msg/s"
        return (r >= goal, [ra, rb],
                f"{r:.{digits}f}× ({fmt(get(ra, key))} vs {fmt(get(rb, key))} {unit})")

    kind = main_kind(meta)

    # echo vs raw-echo.
    met, used, text = vs("echo", "dcrf", "raw", "msgs_per_s", GOAL_ECHO_RAW)
    rows.append(["echo vs `raw-echo`", text, f"≥ {GOAL_ECHO_RAW}×", combine([(met, used)])])

    # retrieve on SQLite, vs raw-retrieve and vs Python.
    if kind == "sqlite":
        met, used, text = vs("retrieve", "dcrf", "raw-retrieve", "msgs_per_s", GOAL_RETRIEVE_RAW)
        st = combine([(met, used)], db=True)
        met2, used2, text2 = vs("retrieve", "dcrf", "python", "msgs_per_s", GOAL_RETRIEVE_PY, 1)
        st2 = combine([(met2, used2)], db=True)
    else:
        text = text2 = f"– (the main groups ran on {kind})"
        st = st2 = "not measured"
    rows.append(["retrieve vs `raw-retrieve`, SQLite", text, f"≥ {GOAL_RETRIEVE_RAW}×", st])
    rows.append(["retrieve vs Python DCRF, SQLite", text2, f"≥ {GOAL_RETRIEVE_PY:.0f}×", st2])

    # create / patch / list vs Python (the main groups' database).
    checks, texts = [], []
    for s in GOAL_CRUD_SCENARIOS:
        met, used, text = vs(s, "dcrf", "python", "msgs_per_s", GOAL_CRUD_PY, 1)
        checks.append((met, used))
        texts.append(f"{s} {text}")
    rows.append([f"create / patch / list vs Python DCRF ({DB_NAMES.get(kind, kind)})",
                 "; ".join(texts), f"≥ {GOAL_CRUD_PY:.0f}× each", combine(checks, db=True)])

    # PostgreSQL: retrieve and patch vs Python, retrieve vs raw-retrieve.
    pgs = meta.get("postgres_group") or {}
    checks, texts = [], []
    for s in GOAL_PG_SCENARIOS:
        met, used, text = vs(pg_tag(meta, s), "dcrf", "python", "msgs_per_s", GOAL_PG_PY, 1)
        checks.append((met, used))
        texts.append(f"{s} vs Python {text}")
    met, used, text = vs(pg_tag(meta, "retrieve"), "dcrf", "raw-retrieve", "msgs_per_s",
                         GOAL_PG_RETRIEVE_RAW)
    checks.append((met, used))
    texts.append(f"retrieve vs `raw-retrieve` {text}")
    measured = "; ".join(texts)
    if pgs.get("status") == "skipped":
        measured = f"– ({pgs.get('reason') or 'PostgreSQL did not answer'})"
    rows.append(["retrieve and patch on PostgreSQL vs Python DCRF on PostgreSQL; retrieve vs "
                 "`raw-retrieve --database postgres`", measured,
                 f"≥ {GOAL_PG_PY:.0f}×; ≥ {GOAL_PG_RETRIEVE_RAW}×",
                 combine(checks, db=kind == "postgres")])

    # Fan-out vs raw-fanout at 1,000 and 10,000 subscribers (every subscribe mode run).
    checks, texts = [], []
    modes = sorted({k[0] for k in (fanout_key(t) for t in groups) if k})
    for how in modes:
        for n in GOAL_FANOUT_SUBSCRIBERS:
            met, used, text = vs(f"fanout-{how}-{n}", "dcrf", "raw-fanout", "deliveries_per_s",
                                 GOAL_FANOUT_RAW)
            checks.append((met, used))
            texts.append(f"{how}, {n:,}: {text}")
    rows.append([f"fan-out deliveries/s vs `raw-fanout`, "
                 f"{' and '.join(f'{n:,}' for n in GOAL_FANOUT_SUBSCRIBERS)} subscribers",
                 "; ".join(texts) or "– (not run)", f"≥ {GOAL_FANOUT_RAW}×", combine(checks)])

    # Idle memory per connection at 19,000 connections.
    d = (groups.get("idle") or {}).get("dcrf")
    kib, n_open, n_asked = get(d, "rss_per_conn_kib"), get(d, "connections_open"), \
        get(d, "connections")
    if kib is None:
        text, met = ("failed" if d is not None and d.get("failed") else "– (not run)"), None
    elif (n_asked or 0) < GOAL_CONNECTIONS:
        text, met = f"{fmt(kib, 1)} KiB, but measured at {fmt(n_asked)} connections", None
    else:
        met = kib <= GOAL_IDLE_KIB and (n_open or 0) >= GOAL_CONNECTIONS
        text = f"{fmt(kib, 1)} KiB per connection at {fmt(n_open)} open"
    rows.append([f"idle memory per connection (dcrf-demo)", text,
                 f"≤ {GOAL_IDLE_KIB:.0f} KiB at {GOAL_CONNECTIONS:,} connections",
                 combine([(met, [d] if d else [])])])

    # Connections held by one node, each answering one echo, p99 handshake.
    if not ok(d):
        text, met = ("failed" if d is not None else "– (not run)"), None
    else:
        echoed = d.get("echoed")
        text = (f"{fmt(n_open)} of {fmt(n_asked)} open, "
                f"{'—' if echoed is None else fmt(echoed)} answered an echo, handshake p99 "
                f"{lat_ms(d, 'p99_us')} ms (p50 {lat_ms(d, 'p50_us')} ms)")
        if (n_asked or 0) < GOAL_CONNECTIONS:
            met = None
        elif (n_open or 0) < GOAL_CONNECTIONS or d.get("connection_errors"):
            met = False
        elif echoed is None:
            met = None
            text += "; this dcrf-bench does not report echoes"
        else:
            met = echoed >= n_open and get(d, "p99_us") is not None
    rows.append(["connections held by one node (dcrf-demo)", text,
                 f"{GOAL_CONNECTIONS:,} open, each answering one echo, p99 handshake measured",
                 combine([(met, [d] if d else [])])])
    return table(["measure", "this run", "goal", "status"], rows)


def render(groups, curves, meta, timings, charts):
    """The generated section. `charts`: {file stem: path relative to the report} of the
    images drawn."""
    parts = []
    mode = meta.get("mode", "?")
    commit = meta.get("commit", "?")
    dirty = meta.get("dirty")
    if dirty is None:
        # Older run.sh: it appended this to the commit when tracked files were modified.
        dirty = "+uncommitted" in str(commit)
    if dirty:
        files = meta.get("dirty_files") or []
        parts.append(
            "> **⚠ WARNING: these results were measured on a working tree with uncommitted "
            f"changes on top of commit `{commit}`. They belong to no commit and cannot be "
            "reproduced from the repository.**"
            + (f" Changed files: {', '.join(f'`{f}`' for f in files[:20])}"
               + (" …" if len(files) > 20 else "") + "." if files else "")
        )
    parts.append(
        f"Generated by `bench/report.py` from `bench/results/` on {meta.get('date', '?')} "
        f"(commit `{commit}`), **{mode} mode**: "
        f"{fmt(meta.get('duration_s'), 1)} s measured after {fmt(meta.get('warmup_s'), 1)} s "
        f"warm-up per run"
        + (f", {fmt((meta.get('curve') or {}).get('duration_s'), 1)} s per curve point"
           if curves and meta.get("curve") else "")
        + "."
        + (" Quick runs are for checking the plumbing, not for quoting." if mode == "quick" else "")
    )

    # Every row with something to warn about, and the warnings about the run itself.
    row_warnings = []
    for tag, g in sorted(groups.items(), key=lambda kv: tag_order(kv[0])):
        for srv in SERVERS + sorted(set(g) - set(SERVERS)):
            r = g.get(srv)
            if r is None:
                continue
            name = SERVER_NAMES.get(srv, srv)
            if r.get("failed"):
                err = r.get("error", "").splitlines()
                row_warnings.append(f"- ⚠ `{tag}` on {name} failed: {err[-1] if err else '?'}")
                continue
            found = problems(r)
            if found:
                row_warnings.append(f"- ⚠ `{tag}` on {name}: {'; '.join(found)}.")
    for tag in sorted(curves, key=curve_order):
        for r in curves[tag]:
            srv = r.get("server") or r.get("label")
            name = SERVER_NAMES.get(srv, srv)
            where = f"`{tag}` at {fmt(point_of(r))} on {name}"
            if r.get("failed"):
                err = r.get("error", "").splitlines()
                row_warnings.append(f"- ⚠ {where} failed: {err[-1] if err else '?'}")
                continue
            found = problems(r)
            if found:
                row_warnings.append(f"- ⚠ {where}: {'; '.join(found)}.")
    legacy_rows = [f"`{tag}` on {SERVER_NAMES.get(srv, srv)}"
                   for tag, g in sorted(groups.items(), key=lambda kv: tag_order(kv[0]))
                   for srv, r in g.items() if legacy_fields(r)]
    if legacy_rows:
        row_warnings.insert(0, (
            f"- ⚠ {len(legacy_rows)} result row(s) come from an older dcrf-bench that reported "
            "neither censored latencies nor (fan-out) duplicate pushes: those are unknown (`?`), "
            "not zero, and its fan-out `delivered` counted duplicates as deliveries"
            + (f" ({', '.join(legacy_rows)})" if len(legacy_rows) <= 6 else "") + "."))
    db_text, db_warnings = database_paragraph(meta)
    if row_warnings or db_warnings:
        parts.append(
            f"> **⚠ {len(row_warnings) + len(db_warnings)} warning(s) about these results:** "
            "runs with errors, lost or unmatched replies, duplicate pushes, censored latencies "
            "or unequal databases. See [Warnings](#warnings) before quoting a figure.")

    parts.append(
        "**Machine:** "
        f"{meta.get('nproc', '?')} CPUs ({meta.get('cpu_model', '?')}), "
        f"{meta.get('memory', '?')} RAM, Linux {meta.get('kernel', '?')}; "
        f"{meta.get('rustc', '?')}; {meta.get('python', '?')}; load average "
        f"{meta.get('loadavg', '?')} when the run started. "
        f"Every server runs pinned to CPU {meta.get('server_cpu', 0)} (`taskset -c "
        f"{meta.get('server_cpu', 0)}`), the load generator to CPU {meta.get('client_cpu', 1)}; "
        f"each server is restarted for every run with {meta.get('rows', '?')} seeded todos. "
        "The Python baseline uses the in-memory channel layer and uvicorn with uvloop, "
        "httptools and the sans-I/O `websockets` implementation, one worker. "
        + db_text
    )
    parts.append(
        "Latencies shown as `≥ X` are censored: some requests (fan-out: write × subscriber "
        "pairs) were still unanswered when the generator stopped waiting and are counted at the "
        "time they had waited, so the true value is at least X. `lost`, `unmatched`, `dup` "
        "(duplicate pushes) and `censored` are counts; `?` means the result file predates the "
        "field (unknown, not zero)."
    )

    # Goals.
    pgs = meta.get("postgres_group") or {}
    parts.append("### Goals")
    parts.append(
        "The goals of the performance issue, judged on the tables below (ratios of this one "
        "run, every server pinned to one core and the generator to the other). \"with "
        "warnings\" means a figure comes from a run listed under Warnings; a goal not met is "
        f"explained under [What stands between us and the goals]({PROFILES_ANCHOR})."
        + (f" The PostgreSQL row was not measured: {pgs.get('reason')}."
           if pgs.get("status") == "skipped" else "")
    )
    parts.append(goals(groups, meta, db_unequal=bool(db_warnings)))

    # Request/reply throughput.
    rows = []
    for s in REQUEST_TAGS:
        g = groups.get(s)
        if not g:
            continue
        raw, dcrf, py = g.get(RAW_FOR.get(s, "raw")), g.get("dcrf"), g.get("python")
        any_row = next((r for r in (dcrf, py, raw) if ok(r)), None) or {}
        shape = f"{any_row.get('connections', '?')} × {any_row.get('window', '?')}"
        rows.append([
            scenario_name(s), db_of(s, any_row, meta), shape,
            cell(raw, "msgs_per_s") if raw else "n/a",
            cell(dcrf, "msgs_per_s"), cell(py, "msgs_per_s"),
            ratio(get(dcrf, "msgs_per_s"), get(py, "msgs_per_s")),
            ratio(get(dcrf, "msgs_per_s"), get(raw, "msgs_per_s")) if raw else "n/a",
        ])
    if rows:
        parts.append("### Requests and replies (messages per second, higher is better)")
        parts.append(
            "Closed loop: every connection keeps `window` requests in flight and sends the "
            "next one when a reply arrives. `raw` is the hand-written ceiling of the scenario "
            "(`echo`: `dcrf-bench raw-echo`; `retrieve`: `dcrf-bench raw-retrieve`, the same "
            "point query on the same database with the demo's reply bytes), and `dcrf/raw` the "
            "share of it dcrf-demo reaches."
        )
        parts.append(table(
            ["scenario", "database", "connections × window", "raw", "dcrf-demo",
             "Python DCRF", "dcrf/python", "dcrf/raw"], rows))

        lat_rows = []
        for s in REQUEST_TAGS:
            g = groups.get(s) or {}
            for srv in SERVERS:
                r = g.get(srv)
                if r is None:
                    continue
                lat_rows.append([
                    scenario_name(s), SERVER_NAMES[srv], lat(r, "p50_us"), lat(r, "p90_us"),
                    lat(r, "p99_us"), lat(r, "p999_us"), cell(r, "errors"), cell(r, "lost"),
                    cell(r, "unmatched"), cell(r, "censored"),
                    cell(r, "server_cpu_pct"), cell(r, "client_cpu_pct"),
                ])
        parts.append("### Latency (µs, lower is better)")
        parts.append(table(
            ["scenario", "server", "p50", "p90", "p99", "p99.9", "errors", "lost", "unmatched",
             "censored", "server CPU %", "client CPU %"], lat_rows))

    # Fan-out.
    fan = sorted((k, v) for k, v in ((fanout_key(t), g) for t, g in groups.items()) if k)
    if fan:
        rows = []
        for (how, n), g in fan:
            dcrf, py, raw = g.get("dcrf"), g.get("python"), g.get("raw-fanout")
            for srv, r in (("raw-fanout", raw), ("dcrf", dcrf), ("python", py)):
                if r is None:
                    continue
                delivered = (
                    f"{fmt(r.get('deliveries'))} / {fmt(r.get('deliveries_expected'))}"
                    if ok(r) else "failed"
                )
                rows.append([
                    f"{n:,}", how, SERVER_NAMES[srv], cell(r, "msgs_per_s", 1),
                    cell(r, "deliveries_per_s"), lat(r, "p50_us"), lat(r, "p99_us"),
                    delivered, cell(r, "lost"), cell(r, "duplicates"), cell(r, "unmatched"),
                    cell(r, "censored"), cell(r, "errors"),
                    ratio(get(dcrf, "deliveries_per_s"), get(py, "deliveries_per_s"))
                    if srv == "dcrf" else "",
                    ratio(get(dcrf, "deliveries_per_s"), get(raw, "deliveries_per_s"))
                    if srv == "dcrf" and raw else "",
                ])
        parts.append("### Fan-out: one writer, N subscribers")
        parts.append(
            "Each subscriber subscribes (`instance`: `subscribe_instance` to row 1; `all`: "
            "`subscribe_to_all`), then one writer patches row 1, waiting until every "
            "subscriber has the push before the next write. Latency is from the write being "
            "sent to the push arriving at each subscriber. `delivered` counts distinct "
            "(write, subscriber) pairs for successful writes made in the measured window "
            "against writes × subscribers; `lost` is the difference (each lost pair is a "
            "censored latency sample); `dup` counts pushes a subscriber received again for a "
            "write it already had (older result files counted those as deliveries). "
            "`raw fan-out` is `dcrf-bench raw-fanout`, the ceiling: no database, one push "
            "encoded per write and written to every subscribed socket; `dcrf/raw` is the share "
            "of its deliveries/s dcrf-demo reaches."
            + (f" Python DCRF ran only up to {fmt(meta['fanout_python_max'])} subscribers "
               "(`FANOUT_PYTHON_MAX`)."
               if any(n > meta.get("fanout_python_max", 10**9) for (_, n), _ in fan) else "")
        )
        parts.append(table(
            ["subscribers", "subscribe", "server", "writes/s", "deliveries/s", "p50 µs",
             "p99 µs", "delivered", "lost", "dup", "unmatched", "censored", "errors",
             "dcrf/python", "dcrf/raw"], rows))

    # Idle.
    g = groups.get("idle")
    if g:
        rows = []
        for srv in SERVERS:
            r = g.get(srv)
            if r is None:
                continue
            before, after = get(r, "server_rss_before_kib"), get(r, "server_rss_kib")
            rows.append([
                SERVER_NAMES[srv], cell(r, "connections_open"),
                fmt(before / 1024, 1) if before is not None else "–",
                fmt(after / 1024, 1) if after is not None else "–",
                cell(r, "rss_per_conn_kib", 1),
                "—" if ok(r) and r.get("echoed") is None else cell(r, "echoed"),
                lat(r, "p50_us"), lat(r, "p99_us"),
                cell(r, "connects_per_s"), cell(r, "errors"), cell(r, "censored"),
            ])
        d, p, raw = g.get("dcrf"), g.get("python"), g.get("raw")
        capped = ""
        if ok(p) and ok(d) and (p.get("connections") or 0) < (d.get("connections") or 0):
            capped = (
                f" Python DCRF was run at {fmt(p.get('connections'))} connections, not "
                f"{fmt(d.get('connections'))} (`PY_IDLE_CONNECTIONS`): its handshakes slow down "
                "with every consumer already connected (channels' in-memory layer scans all "
                "channels on every receive), so a larger run takes minutes; its figure per "
                "connection is at that size.")
        parts.append("### Idle connections: server memory")
        parts.append(
            "Resident memory (VmRSS) of the server before opening the connections and with "
            "all of them open; latency here is the WebSocket handshake while connecting (a "
            "handshake that timed out is censored at the timeout). `echoed`: connections that "
            "answered one echo while all were open (— when this dcrf-bench does not report it)."
            f" Memory per connection, dcrf/python: "
            f"{ratio(get(d, 'rss_per_conn_kib'), get(p, 'rss_per_conn_kib'))}; dcrf/raw: "
            f"{ratio(get(d, 'rss_per_conn_kib'), get(raw, 'rss_per_conn_kib'))} (lower is better)."
            + capped
        )
        parts.append(table(
            ["server", "connections", "RSS before MiB", "RSS after MiB", "KiB per connection",
             "echoed", "handshake p50 µs", "handshake p99 µs", "connects/s", "errors",
             "censored"], rows))

    if curves:
        parts.append("### Scaling curves")
        parts.append(curves_text(curves, meta, charts))

    warnings = [f"- ⚠ {w}" for w in db_warnings] + row_warnings
    for tag, g in sorted(groups.items(), key=lambda kv: tag_order(kv[0])):
        for srv, r in g.items():
            if not ok(r):
                continue
            name = SERVER_NAMES.get(srv, srv)
            if r.get("client_saturated"):
                warnings.append(f"- `{tag}` on {name}: the load generator "
                                f"used {fmt(r.get('client_cpu_pct'))} % CPU; the result may be "
                                "limited by the client, not the server.")
            elif (tag in REQUEST_TAGS and r.get("server_cpu_pct") is not None
                  and r["server_cpu_pct"] < 80):
                warnings.append(
                    f"- `{tag}` on {name}: neither the server "
                    f"({fmt(r['server_cpu_pct'])} % CPU) nor the load generator "
                    f"({fmt(r.get('client_cpu_pct'))} %) was saturated; something else "
                    "limited the run (another process on the CPUs, or too little load).")
    for tag in sorted(curves, key=curve_order):
        sat = {}
        for r in curves[tag]:
            if ok(r) and r.get("client_saturated"):
                srv = r.get("server") or r.get("label")
                sat.setdefault(SERVER_NAMES.get(srv, srv), []).append(fmt(point_of(r)))
        if sat:
            warnings.append(
                f"- `{tag}`: the load generator used over 90 % of its core at "
                + "; ".join(f"{', '.join(v)} on {k}" for k, v in sat.items())
                + "; those points may be limited by the client, not the server.")
    if warnings:
        parts.append("### Warnings")
        parts.append("\n".join(warnings))

    if charts.get("chart"):
        parts.append(f"![Benchmark chart]({charts['chart']})")

    if timings.get("scenarios_s"):
        scen = timings["scenarios_s"]
        parts.append("### Run time")
        parts.append(
            "Wall-clock seconds of each scenario (server starts, connecting, warm-up, the "
            "measured window and waiting for stragglers), each from the last run that "
            "included it"
            + (f"; the last run's scenarios took {fmt_duration(timings.get('last_run_s'))} "
               "in all (the build, the Python setup and the database probe come on top)."
               if timings.get("last_run_s") is not None else ".")
        )
        parts.append(table(["scenario", "time"], [
            [f"`{k}`", fmt_duration(v)] for k, v in scen.items()
        ] + [["all of the above", fmt_duration(sum(scen.values()))]]))

    commands, curve_commands = [], []
    for tag, g in sorted(groups.items(), key=lambda kv: tag_order(kv[0])):
        for srv in SERVERS:
            r = g.get(srv)
            if r and r.get("command"):
                commands.append(r["command"])
    for tag in sorted(curves, key=curve_order):
        curve_commands += [r["command"] for r in curves[tag] if r.get("command")]
    parts.append("### Commands")
    bin_dir = "target/debug" if meta.get("profile") == "dev" else \
        f"target/{meta.get('profile', 'release')}"
    cpu = meta.get("server_cpu", 0)
    db = meta.get("database") or {}
    py_env = f"{db['python_env']} " if db.get("python_env") else ""
    parts.append(
        f"`bench/run.sh` (mode {mode}). Each server was started for each run pinned to its CPU "
        f"(`taskset -c {cpu} {bin_dir}/dcrf-bench raw-echo --bind ...`, `taskset -c {cpu} "
        f"{bin_dir}/dcrf-bench raw-retrieve --bind ... --database URL` on a database the demo "
        f"had just seeded, `taskset -c {cpu} {bin_dir}/dcrf-bench raw-fanout --bind ...`, "
        f"`taskset -c {cpu} "
        f"{bin_dir}/dcrf-demo --bind ... --database {meta.get('demo_database', '...')} --seed N`, "
        f"`{py_env}taskset -c {cpu} bench/python/run.sh --bind ... --seed N`), on a fresh "
        "database each time where the run recorded one, then the load generator ran:"
        if db else
        f"`bench/run.sh` (mode {mode}). Each server was started for each run pinned to its CPU "
        f"(`taskset -c {cpu} {bin_dir}/dcrf-bench raw-echo --bind ...`, `taskset -c {cpu} "
        f"{bin_dir}/dcrf-demo --bind ... --database ... --seed N`, `taskset -c {cpu} "
        "bench/python/run.sh --bind ... --seed N`), then the load generator ran:"
    )
    if pgs.get("status") == "run":
        parts.append(
            f"The `pg-*` runs used PostgreSQL instead: dcrf-demo `--database "
            f"{pgs.get('demo_url')}` (and raw-retrieve on that database once the demo had "
            f"seeded it), Python `{pgs.get('python_env')}`, each dropped and created again "
            "before every server start.")
    parts.append("```text\n" + "\n".join(commands) + "\n```")
    if curve_commands:
        parts.append(
            f"<details><summary>The {len(curve_commands)} curve runs</summary>\n\n```text\n"
            + "\n".join(curve_commands) + "\n```\n\n</details>")
    if meta.get("invocation"):
        parts.append(
            f"The last invocation was `{meta['invocation']}` (other settings at their "
            "defaults unless the commands above show otherwise)."
        )
    return "\n\n".join(parts)


def fmt_duration(seconds):
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def scenario_name(tag):
    """`retrieve`, or `retrieve` (pg group) for pg-retrieve."""
    if tag in PG_SCENARIOS:
        return f"`{tag[3:]}` (pg group)"
    return f"`{tag}`"


def db_of(tag, row, meta):
    """The database a request group ran on: the row's own record, else the run's."""
    kind = (row or {}).get("database")
    if kind is None:
        kind = "postgres" if tag in PG_SCENARIOS else main_kind(meta)
    if tag == "echo":
        return "none"
    return DB_NAMES.get(kind, kind)


def curve_order(tag):
    return (CURVES.index(tag) if tag in CURVES else len(CURVES), tag)


def curves_text(curves, meta, charts):
    """The scaling curves: what was run, a table per curve, and the plots."""
    c = meta.get("curve") or {}
    out = [
        "Short runs at growing sizes, each server restarted for every point: "
        f"{fmt(c.get('duration_s'), 1)} s measured after {fmt(c.get('warmup_s'), 1)} s warm-up "
        f"per point, closed loop with {c.get('window', '?')} request(s) in flight per "
        "connection (so the connections are the requests in flight); Python DCRF up to "
        f"{fmt(c.get('python_max_connections'))} connections (its connection set-up grows with "
        "the consumers already connected). Fan-out: `subscribe_instance` subscribers of row 1 "
        "and one closed-loop writer, dcrf-demo against raw-fanout. Memory: idle connections "
        "held open, dcrf-demo against raw-echo (both with dcrf's 2 KiB / 8 KiB socket buffers)."
    ]
    for tag, scenario in (("curve-echo", "echo"), ("curve-retrieve", "retrieve")):
        rows = curves.get(tag)
        if not rows:
            continue
        raw_name = RAW_FOR[scenario]
        series = {srv: curve_series(rows, srv) for srv in (raw_name, "dcrf", "python")}
        points = sorted({point_of(r) for r in rows if point_of(r) is not None})
        trs = []
        for n in points:
            rr, d, p = (series[raw_name].get(n), series["dcrf"].get(n), series["python"].get(n))
            trs.append([
                fmt(n), cell(rr, "msgs_per_s"), cell(d, "msgs_per_s"), cell(p, "msgs_per_s"),
                ratio(get(d, "msgs_per_s"), get(rr, "msgs_per_s")),
                ratio(get(d, "msgs_per_s"), get(p, "msgs_per_s")),
                lat_ms(rr, "p99_us", 2), lat_ms(d, "p99_us", 2), lat_ms(p, "p99_us", 2),
            ])
        out.append(f"**`{scenario}`** on {DB_NAMES.get(main_kind(meta), '?')}, "
                   "msgs/s and p99 latency (ms) by connections:" if scenario == "retrieve" else
                   f"**`{scenario}`**, msgs/s and p99 latency (ms) by connections:")
        out.append(table(["connections", f"{SERVER_NAMES[raw_name]}", "dcrf-demo",
                          "Python DCRF", "dcrf/raw", "dcrf/python", "raw p99", "dcrf p99",
                          "Python p99"], trs))
    rows = curves.get("curve-fanout")
    if rows:
        raw, d = curve_series(rows, "raw-fanout"), curve_series(rows, "dcrf")
        trs = []
        for n in sorted(set(raw) | set(d)):
            rr, dd = raw.get(n), d.get(n)
            trs.append([
                fmt(n), cell(rr, "deliveries_per_s"), cell(dd, "deliveries_per_s"),
                ratio(get(dd, "deliveries_per_s"), get(rr, "deliveries_per_s")),
                f"{lat_ms(rr, 'p50_us', 2)} / {lat_ms(rr, 'p99_us', 2)}",
                f"{lat_ms(dd, 'p50_us', 2)} / {lat_ms(dd, 'p99_us', 2)}",
                cell(rr, "lost"), cell(dd, "lost"),
            ])
        out.append("**Fan-out**, deliveries/s and write → push latency p50 / p99 (ms) by "
                   "subscribers:")
        out.append(table(["subscribers", "raw fan-out", "dcrf-demo", "dcrf/raw",
                          "raw p50 / p99", "dcrf p50 / p99", "raw lost", "dcrf lost"], trs))
    rows = curves.get("curve-idle")
    if rows:
        raw, d = curve_series(rows, "raw"), curve_series(rows, "dcrf")
        trs = []
        for n in sorted(set(raw) | set(d)):
            rr, dd = raw.get(n), d.get(n)
            trs.append([
                fmt(n), cell(rr, "connections_open"), cell(dd, "connections_open"),
                cell(rr, "rss_per_conn_kib", 1), cell(dd, "rss_per_conn_kib", 1),
                ratio(get(dd, "rss_per_conn_kib"), get(rr, "rss_per_conn_kib")),
                lat_ms(rr, "p99_us", 1), lat_ms(dd, "p99_us", 1),
            ])
        out.append(f"**Idle memory**, KiB of server RSS per open connection (goal ≤ "
                   f"{GOAL_IDLE_KIB:.0f} KiB at {GOAL_CONNECTIONS:,}) and handshake p99 (ms):")
        out.append(table(["connections", "raw open", "dcrf open", "raw KiB/conn",
                          "dcrf KiB/conn", "dcrf/raw", "raw handshake p99",
                          "dcrf handshake p99"], trs))
    for stem, alt, sentence in CURVE_PLOTS:
        if charts.get(stem):
            out.append(f"![{alt}]({charts[stem]})\n\n{sentence}")
    return "\n\n".join(out)


CURVE_PLOTS = [
    ("curve-throughput", "Throughput by connections",
     "**Throughput by connections** (log–log): look at where each line flattens, the "
     "connections a server needs to saturate its core, and at the gap between dcrf-demo and "
     "its raw ceiling at every size, not only at the 50 connections of the tables above."),
    ("curve-p99", "p99 latency by connections",
     "**p99 latency by connections** (log–log): with one request in flight per connection a "
     "saturated server's latency grows in proportion to the connections; a line that bends "
     "upward faster than its ceiling is queueing or unfairness the framework adds. Hollow "
     "markers are censored (lower bounds)."),
    ("curve-fanout", "Fan-out by subscribers",
     "**Fan-out by subscribers**: deliveries/s (left) should stay flat once the server's core "
     "is busy, and latency (right) grow with the subscribers per write; the distance from "
     "raw-fanout is the framework's cost per push."),
    ("curve-memory", "Idle memory per connection",
     "**Idle memory per connection**: KiB of server RSS per open connection against the "
     f"{GOAL_IDLE_KIB:.0f} KiB goal (dashed); a flat line means memory grows linearly with the "
     "connections, and the level is what each connection costs."),
]


def chart(groups, out: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart", file=sys.stderr)
        return False
    colors = COLORS
    panels = []
    req = [s for s in REQUEST_SCENARIOS if s in groups]
    if req:
        panels.append(("Requests/s (log)", req, "msgs_per_s", True))
        panels.append(("p99 latency µs (log; ≥: censored, a lower bound)", req, "p99_us", True))
    fan = sorted((k, t) for k, t in ((fanout_key(t), t) for t in groups) if k)
    if fan:
        panels.append(("Fan-out deliveries/s (log)", [t for _, t in fan], "deliveries_per_s", True))
    if "idle" in groups:
        panels.append(("Idle: server KiB per connection", ["idle"], "rss_per_conn_kib", False))
    if not panels:
        return False
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.2 * len(panels)))
    if len(panels) == 1:
        axes = [axes]
    for ax, (title, tags, key, log) in zip(axes, panels):
        present = [
            srv for srv in SERVERS
            if any(groups[t].get(srv) and get(groups[t][srv], key) for t in tags)
        ]
        width = 0.8 / max(len(present), 1)
        for i, srv in enumerate(present):
            xs, ys, labels = [], [], []
            for j, tag in enumerate(tags):
                r = groups[tag].get(srv)
                v = get(r, key) if r else None
                if v:
                    xs.append(j + (i - (len(present) - 1) / 2) * width)
                    ys.append(v)
                    label = fmt(v) if v >= 10 else fmt(v, 1)
                    labels.append(f"≥{label}" if key.endswith("_us") and is_censored(r, key)
                                  else label)
            if xs:
                bars = ax.bar(xs, ys, width, label=SERVER_NAMES[srv], color=colors[srv])
                ax.bar_label(bars, labels=labels, fontsize=7, padding=1)
        ax.set_xticks(range(len(tags)))
        ax.set_xticklabels([t.replace("fanout-", "") for t in tags], fontsize=8)
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.margins(y=0.15)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


COLORS = {"raw": "#7f7f7f", "raw-retrieve": "#7f7f7f", "raw-fanout": "#7f7f7f",
          "dcrf": "#d2691e", "python": "#3572a5"}


def curve_plots(curves, results: Path):
    """Draws the curve-*.png plots of the curves present; returns {stem: path}."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return {}
    drawn = {}

    def line(ax, series, key, label, color, style="-", scale=1.0):
        pts = sorted((n, r) for n, r in series.items() if n is not None and get(r, key))
        if not pts:
            return
        xs = [n for n, _ in pts]
        ys = [get(r, key) * scale for _, r in pts]
        ax.plot(xs, ys, style, color=color, marker="o", markersize=4, label=label)
        cx = [n for n, r in pts if key.endswith("_us") and is_censored(r, key)]
        cy = [get(r, key) * scale for n, r in pts if key.endswith("_us") and is_censored(r, key)]
        if cx:
            ax.plot(cx, cy, "o", markersize=8, markerfacecolor="white", color=color)

    def save(fig, stem):
        fig.tight_layout()
        path = results / f"{stem}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        drawn[stem] = path

    req = [(t, s) for t, s in (("curve-echo", "echo"), ("curve-retrieve", "retrieve"))
           if curves.get(t)]
    if req:
        for stem, key, scale, ylabel, title in (
                ("curve-throughput", "msgs_per_s", 1.0, "replies per second",
                 "Throughput by connections (one request in flight per connection)"),
                ("curve-p99", "p99_us", 1e-3, "p99 latency, ms",
                 "p99 latency by connections (hollow: censored, a lower bound)")):
            fig, ax = plt.subplots(figsize=(8, 4.8))
            for tag, scenario in req:
                style = "-" if scenario == "echo" else "--"
                for srv in (RAW_FOR[scenario], "dcrf", "python"):
                    line(ax, curve_series(curves[tag], srv), key,
                         f"{scenario}: {SERVER_NAMES[srv]}", COLORS[srv], style, scale)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("connections")
            ax.set_ylabel(ylabel)
            ax.set_title(title, fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
            save(fig, stem)
    rows = curves.get("curve-fanout")
    if rows:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
        for srv in ("raw-fanout", "dcrf"):
            s = curve_series(rows, srv)
            line(a1, s, "deliveries_per_s", SERVER_NAMES[srv], COLORS[srv])
            line(a2, s, "p50_us", f"{SERVER_NAMES[srv]} p50", COLORS[srv], "--", 1e-3)
            line(a2, s, "p99_us", f"{SERVER_NAMES[srv]} p99", COLORS[srv], "-", 1e-3)
        a1.set_ylim(bottom=0)
        a1.set_title("Fan-out: deliveries per second", fontsize=10)
        a1.set_ylabel("deliveries per second")
        a2.set_title("Fan-out: write → push latency (hollow: censored)", fontsize=10)
        a2.set_ylabel("ms")
        a2.set_yscale("log")
        for ax in (a1, a2):
            ax.set_xscale("log")
            ax.set_xlabel("subscribers")
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        save(fig, "curve-fanout")
    rows = curves.get("curve-idle")
    if rows:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
        for srv in ("raw", "dcrf"):
            s = curve_series(rows, srv)
            line(a1, s, "rss_per_conn_kib", SERVER_NAMES[srv], COLORS[srv])
            line(a2, s, "server_rss_kib", SERVER_NAMES[srv], COLORS[srv], scale=1 / 1024)
        a1.axhline(GOAL_IDLE_KIB, color="#2e8b57", linestyle="--",
                   label=f"goal ≤ {GOAL_IDLE_KIB:.0f} KiB")
        a1.set_title("Idle: server RSS per open connection", fontsize=10)
        a1.set_ylabel("KiB per connection (log)")
        a1.set_yscale("log")
        a2.set_title("Idle: server RSS with all connections open", fontsize=10)
        a2.set_ylabel("MiB")
        for ax in (a1, a2):
            ax.set_xlabel("connections")
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        save(fig, "curve-memory")
    return drawn


def write_section(output: Path, section: str):
    text = output.read_text() if output.exists() else INTRO
    block = f"{BEGIN}\n{section}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    output.write_text(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="bench/results", type=Path)
    ap.add_argument("--output", default="BENCHMARKS.md", type=Path)
    ap.add_argument("--no-chart", action="store_true", help="draw no chart and no plots")
    args = ap.parse_args()
    groups, curves, meta, timings = load(args.results)
    if not groups and not curves and not meta:
        sys.exit(f"no results in {args.results}")
    images = {}
    if not args.no_chart:
        chart_path = args.results / "chart.png"
        if groups and chart(groups, chart_path):
            images["chart"] = chart_path
        images.update(curve_plots(curves, args.results))
    charts = {k: os.path.relpath(v.resolve(), args.output.resolve().parent)
              for k, v in images.items()}
    write_section(args.output, render(groups, curves, meta, timings, charts))
    if meta.get("dirty") or "+uncommitted" in str(meta.get("commit", "")):
        print(f"warning: the results in {args.results} were measured on a working tree with "
              "uncommitted changes; the report says so at the top", file=sys.stderr)
    print(f"wrote {args.output}" + "".join(f", {v}" for v in images.values()))


if __name__ == "__main__":
    main()
