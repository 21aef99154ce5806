#!/usr/bin/env python3
"""Turns bench/results/*.jsonl (written by bench/run.sh) into tables in BENCHMARKS.md, between
the markers <!-- bench:begin --> and <!-- bench:end --> (the rest of the file is kept), and a
chart, bench/results/chart.png (needs matplotlib, installed in bench/python/.venv).

    bench/python/.venv/bin/python bench/report.py [--results bench/results] [--output BENCHMARKS.md]

Every figure in the generated section comes from the result files: the tables, the targets
and their status, the machine and database facts (meta.json). A field an older dcrf-bench did
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
SERVER_NAMES = {"raw": "raw echo", "raw-retrieve": "raw retrieve", "raw-fanout": "raw fan-out",
                "dcrf": "dcrf-demo", "python": "Python DCRF"}
# The ceiling of each scenario: the hand-written server it is compared with.
RAW_FOR = {"echo": "raw", "retrieve": "raw-retrieve"}
REQUEST_SCENARIOS = ["echo", "retrieve", "list", "create", "patch"]
PERCENTILES = ["p50_us", "p90_us", "p99_us", "p999_us", "max_us"]
# dcrf-bench before `censored` existed clamped every latency at 60 s without saying so.
LEGACY_CAP_US = 60_000_000.0
UNKNOWN = "?"

# The project's targets: (key, text, threshold). Their status is computed from the results.
TARGET_ECHO_RAW = 0.8
TARGET_RETRIEVE_RAW = 0.7
TARGET_FANOUT_RAW = 0.8
TARGET_FANOUT_RAW_SUBSCRIBERS = (1_000, 10_000)
TARGET_ECHO_PY = 50.0
TARGET_RETRIEVE_PY = 50.0
TARGET_FANOUT_PY = 100.0
TARGET_FANOUT_P99_US = 50_000.0
TARGET_FANOUT_P99_SUBSCRIBERS = 10_000
TARGET_IDLE_KIB = 16.0
TARGET_IDLE_CONNECTIONS = 10_000


def load(results: Path):
    groups = {}
    for path in sorted(results.glob("*.jsonl")):
        rows = {}
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            rows[row.get("server") or row.get("label")] = row
        if rows:
            groups[path.stem] = rows
    meta_path = results / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return groups, meta


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


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def tag_order(tag):
    """Sort key: the request scenarios in run order, then fan-out by mode and size, then idle."""
    if tag in REQUEST_SCENARIOS:
        return (0, REQUEST_SCENARIOS.index(tag), "", 0)
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


def targets(groups, db_unequal=False):
    """The targets table: each target with the measured figures and whether it is met.
    `db_unequal`: the two sides did not use the same database (marks the database targets)."""
    rows = []

    def legacy(*rs):
        return any(legacy_fields(r) for r in rs)

    def status(met, clean=True, legacy=False, db=False):
        if met is None:
            return "not measured"
        s = "met" if met else "not met"
        if db and db_unequal:
            return f"{s} (databases not alike, see warnings)"
        if not clean:
            return f"{s} (with warnings, see below)"
        if legacy:
            return f"{s} (older result file: censoring unknown)"
        return s

    def clean(*rs):
        return all(ok(r) and not problems(r) for r in rs)

    g = groups.get("echo") or {}
    d, raw, py = g.get("dcrf"), g.get("raw"), g.get("python")
    r = ratio_value(get(d, "msgs_per_s"), get(raw, "msgs_per_s"))
    rows.append([
        f"echo ≥ {TARGET_ECHO_RAW}× the raw WebSocket ceiling",
        "–" if r is None else f"{r:.2f}× ({cell(d, 'msgs_per_s')} vs {cell(raw, 'msgs_per_s')} "
                              "msg/s)",
        status(None if r is None else r >= TARGET_ECHO_RAW, clean(d, raw), legacy(d, raw)),
    ])
    g = groups.get("retrieve") or {}
    d, raw = g.get("dcrf"), g.get("raw-retrieve")
    r = ratio_value(get(d, "msgs_per_s"), get(raw, "msgs_per_s"))
    rows.append([
        f"retrieve ≥ {TARGET_RETRIEVE_RAW}× raw-retrieve (the same query, hand-written)",
        "–" if r is None else f"{r:.2f}× ({cell(d, 'msgs_per_s')} vs {cell(raw, 'msgs_per_s')} "
                              "msg/s)",
        status(None if r is None else r >= TARGET_RETRIEVE_RAW, clean(d, raw), legacy(d, raw)),
    ])
    for tag, goal in (("echo", TARGET_ECHO_PY), ("retrieve", TARGET_RETRIEVE_PY)):
        g = groups.get(tag) or {}
        d, py = g.get("dcrf"), g.get("python")
        r = ratio_value(get(d, "msgs_per_s"), get(py, "msgs_per_s"))
        rows.append([
            f"{tag} ≥ {goal:.0f}× Python DCRF",
            "–" if r is None else f"{r:.1f}× ({cell(d, 'msgs_per_s')} vs {cell(py, 'msgs_per_s')} "
                                  "msg/s)",
            status(None if r is None else r >= goal, clean(d, py), legacy(d, py),
                   db=tag != "echo"),
        ])
    fan = sorted((k, v) for k, v in ((fanout_key(t), g) for t, g in groups.items()) if k)
    for (how, n), g in fan:
        d, py = g.get("dcrf"), g.get("python")
        a, b = get(d, "deliveries_per_s"), get(py, "deliveries_per_s")
        if a is not None and b == 0 and a > 0:
            measured = f"Python DCRF delivered nothing in the window ({fmt(a)} vs 0 deliveries/s)"
            met = True
        else:
            r = ratio_value(a, b)
            measured = "–" if r is None else f"{r:.1f}× ({fmt(a)} vs {fmt(b)} deliveries/s)"
            met = None if r is None else r >= TARGET_FANOUT_PY
        rows.append([
            f"fan-out deliveries/s ≥ {TARGET_FANOUT_PY:.0f}× Python DCRF ({how}, {n:,} "
            "subscribers)", measured, status(met, clean(d, py), legacy(d, py), db=True),
        ])
    for (how, n), g in fan:
        if n not in TARGET_FANOUT_RAW_SUBSCRIBERS:
            continue
        d, raw = g.get("dcrf"), g.get("raw-fanout")
        r = ratio_value(get(d, "deliveries_per_s"), get(raw, "deliveries_per_s"))
        rows.append([
            f"fan-out deliveries/s ≥ {TARGET_FANOUT_RAW}× raw-fanout ({how}, {n:,} subscribers)",
            "–" if r is None else f"{r:.2f}× ({cell(d, 'deliveries_per_s')} vs "
                                  f"{cell(raw, 'deliveries_per_s')} deliveries/s)",
            status(None if r is None else r >= TARGET_FANOUT_RAW, clean(d, raw), legacy(d, raw)),
        ])
    for (how, n), g in fan:
        if n != TARGET_FANOUT_P99_SUBSCRIBERS:
            continue
        d = g.get("dcrf")
        p99 = get(d, "p99_us")
        if p99 is None:
            met = None
        elif is_censored(d, "p99_us"):
            # A lower bound: it can only show that the target is missed.
            met = False if p99 > TARGET_FANOUT_P99_US else None
        else:
            met = p99 <= TARGET_FANOUT_P99_US
        rows.append([
            f"1 writer → {n:,} subscribers ({how}) on one node, p99 ≤ "
            f"{TARGET_FANOUT_P99_US / 1000:.0f} ms",
            "–" if p99 is None else f"p99 {lat(d, 'p99_us')} µs "
                                    f"({cell(d, 'deliveries_per_s')} deliveries/s)",
            status(met, clean(d), legacy(d)),
        ])
    g = groups.get("idle") or {}
    d = g.get("dcrf")
    kib = get(d, "rss_per_conn_kib")
    n = get(d, "connections_open")
    note = "" if n in (None, TARGET_IDLE_CONNECTIONS) else f", measured at {fmt(n)} connections"
    rows.append([
        f"idle connections ≤ {TARGET_IDLE_KIB:.0f} KiB RSS each at {TARGET_IDLE_CONNECTIONS:,}",
        "–" if kib is None else f"{fmt(kib, 1)} KiB{note}",
        status(None if kib is None or note else kib <= TARGET_IDLE_KIB, clean(d), legacy(d)),
    ])
    return table(["target", "measured (this run)", "status"], rows)


def render(groups, meta, chart_rel):
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
        f"warm-up per run."
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

    # Targets.
    parts.append("### Targets")
    parts.append(
        "The project's targets, computed from the tables below (ratios of one run on this "
        "machine). \"with warnings\" means a figure comes from a run listed under Warnings."
    )
    parts.append(targets(groups, db_unequal=bool(db_warnings)))

    # Request/reply throughput.
    rows = []
    for s in REQUEST_SCENARIOS:
        g = groups.get(s)
        if not g:
            continue
        raw, dcrf, py = g.get(RAW_FOR.get(s, "raw")), g.get("dcrf"), g.get("python")
        any_row = next((r for r in (dcrf, py, raw) if ok(r)), None) or {}
        shape = f"{any_row.get('connections', '?')} × {any_row.get('window', '?')}"
        rows.append([
            f"`{s}`", shape,
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
            ["scenario", "connections × window", "raw", "dcrf-demo", "Python DCRF",
             "dcrf/python", "dcrf/raw"], rows))

        lat_rows = []
        for s in REQUEST_SCENARIOS:
            g = groups.get(s) or {}
            for srv in SERVERS:
                r = g.get(srv)
                if r is None:
                    continue
                lat_rows.append([
                    f"`{s}`", SERVER_NAMES[srv], lat(r, "p50_us"), lat(r, "p90_us"),
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
                cell(r, "rss_per_conn_kib", 1), lat(r, "p50_us"), lat(r, "p99_us"),
                cell(r, "connects_per_s"), cell(r, "errors"), cell(r, "censored"),
            ])
        d, p, raw = g.get("dcrf"), g.get("python"), g.get("raw")
        parts.append("### Idle connections: server memory")
        parts.append(
            "Resident memory (VmRSS) of the server before opening the connections and with "
            "all of them open; latency here is the WebSocket handshake while connecting (a "
            "handshake that timed out is censored at the timeout)."
            f" Memory per connection, dcrf/python: "
            f"{ratio(get(d, 'rss_per_conn_kib'), get(p, 'rss_per_conn_kib'))}; dcrf/raw: "
            f"{ratio(get(d, 'rss_per_conn_kib'), get(raw, 'rss_per_conn_kib'))} (lower is better)."
        )
        parts.append(table(
            ["server", "connections", "RSS before MiB", "RSS after MiB", "KiB per connection",
             "handshake p50 µs", "handshake p99 µs", "connects/s", "errors", "censored"], rows))

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
            elif (tag in REQUEST_SCENARIOS and r.get("server_cpu_pct") is not None
                  and r["server_cpu_pct"] < 80):
                warnings.append(
                    f"- `{tag}` on {name}: neither the server "
                    f"({fmt(r['server_cpu_pct'])} % CPU) nor the load generator "
                    f"({fmt(r.get('client_cpu_pct'))} %) was saturated; something else "
                    "limited the run (another process on the CPUs, or too little load).")
    if warnings:
        parts.append("### Warnings")
        parts.append("\n".join(warnings))

    if chart_rel:
        parts.append(f"![Benchmark chart]({chart_rel})")

    commands = []
    for tag, g in sorted(groups.items(), key=lambda kv: tag_order(kv[0])):
        for srv in SERVERS:
            r = g.get(srv)
            if r and r.get("command"):
                commands.append(r["command"])
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
    parts.append("```text\n" + "\n".join(commands) + "\n```")
    if meta.get("invocation"):
        parts.append(
            f"The last invocation was `{meta['invocation']}` (other settings at their "
            "defaults unless the commands above show otherwise)."
        )
    return "\n\n".join(parts)


def chart(groups, out: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart", file=sys.stderr)
        return False
    colors = {"raw": "#9e9e9e", "raw-retrieve": "#9e9e9e", "raw-fanout": "#9e9e9e",
              "dcrf": "#d2691e", "python": "#3572a5"}
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
    ap.add_argument("--no-chart", action="store_true")
    args = ap.parse_args()
    groups, meta = load(args.results)
    if not groups:
        sys.exit(f"no results in {args.results}")
    chart_path = args.results / "chart.png"
    drawn = False if args.no_chart else chart(groups, chart_path)
    chart_rel = None
    if drawn:
        chart_rel = os.path.relpath(chart_path.resolve(), args.output.resolve().parent)
    write_section(args.output, render(groups, meta, chart_rel))
    if meta.get("dirty") or "+uncommitted" in str(meta.get("commit", "")):
        print(f"warning: the results in {args.results} were measured on a working tree with "
              "uncommitted changes; the report says so at the top", file=sys.stderr)
    print(f"wrote {args.output}" + (f" and {chart_path}" if drawn else ""))


if __name__ == "__main__":
    main()
