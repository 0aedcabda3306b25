"""Markdown for `benchmarks/results.md` (printed to stdout as well)."""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.comparison import (
    ADVANCED_ALCHEMY,
    CORE,
    RAW,
    RAW_NON_ATOMIC,
    TODO_STORE,
    TODO_STORE_CONNECTION,
    TODO_STORE_NON_ATOMIC,
    TUTORIAL,
    Comparison,
    Spread,
)
from benchmarks.environment import Versions
from benchmarks.leak import CacheCheck, LeakResult
from benchmarks.pages import (
    DEEP_PAGE,
    FULL_PLANS_OF,
    PAGE_SIZE,
    SEARCHES,
    SORTS,
    WORST_CASE,
    PagesRow,
)
from benchmarks.peers import HOT_CALLS
from benchmarks.round_trips import DIRECT, PathResult, cell_text, chart_data, render_chart_rows
from benchmarks.scaling import CALLED, USERS, ScalingRow
from benchmarks.workload import CALLS, TutorialClient


@dataclass(frozen=True)
class Results:
    command: str
    quick: bool
    rtt: float
    iterations: int
    versions: Versions
    raw_sql_mismatches: list[str]
    paths: list[PathResult]
    skipped_paths: list[str]  # round-trip paths not measured, with the reason
    cache_check: CacheCheck | None
    leaks: list[LeakResult]
    leak_concurrency: int
    comparison: Comparison | None  # None when only another part ran
    chart: str  # file name next to the report, or why there is none
    chart_drawn: bool
    scaling: list[ScalingRow]
    scaling_samples: int
    pages: list[PagesRow]
    pages_samples: int


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render(results: Results) -> str:
    v = results.versions
    parts = [
        "# Benchmark results",
        "",
        f"Command: `{results.command}` (from the repository root; `nox -s bench` runs the same)"
        + (" — **quick run**, fewer samples" if results.quick else "")
        + ".",
        "",
        table(
            ["", ""],
            [
                ["date", v.date],
                ["SQLAlchemy", v.sqlalchemy],
                ["asyncpg", v.asyncpg],
                ["PgBouncer", f"{v.pgbouncer} (transaction mode, pool of 4)"],
                ["PostgreSQL", f"{v.postgres} (server from: {v.server_source})"],
                ["Python", v.python],
                ["machine", v.machine],
            ],
        ),
        "",
        _round_trips(results) if results.paths else "",
        _leaks(results) if results.leaks else "",
        _comparison(results) if results.comparison is not None else "",
        _scaling(results) if results.scaling else "",
        _pages(results) if results.pages else "",
    ]
    return "\n".join(parts).rstrip() + "\n"


def _round_trips(results: Results) -> str:
    rtt_ms = results.rtt * 1000
    out = [
        "## 1. Round trips per unit of work",
        "",
        "One unit of work = `async with store.session() as s: await TaskRepo(s).<method>(...)` "
        "(a transaction holding one call; with `session(atomic=False)` no transaction), on a "
        "connection opened and warmed up beforehand. "
        f"A TCP proxy (`tests.rigs.proxy.RoundTripProxy`) adds {rtt_ms:.0f} ms to every "
        "server-to-client burst. Each cell: **round trips counted by the proxy** (client turns; "
        "deterministic) / median latency ÷ injected RTT (the same measured by time; median of "
        f"{results.iterations}, after one warm-up unit of work).",
        "",
        "Configurations: (a) `TodoStore` defaults: caching off, unnamed prepared statements, "
        "in `store.session()` and in `store.session(atomic=False)`; (b) the same with "
        "`statement_cache=True`, only where it is safe (direct, or a PgBouncer that tracks "
        "prepared statements); (c) raw "
        "asyncpg, `statement_cache_size=0`, the same SQL inside `conn.transaction()`: the floor; "
        "(d) SQLAlchemy's documented PgBouncer recipe (`statement_cache_size=0`, "
        "`prepared_statement_cache_size=0`, `prepared_statement_name_func` returning "
        "`__asyncpg_<uuid4>__`), and the same with `pool_pre_ping=True`.",
        "",
    ]
    if results.raw_sql_mismatches:
        out += [f"**Raw SQL differs** from the repositories' for: {results.raw_sql_mismatches}", ""]
    else:
        out += [
            "(c) runs the exact SQL text and parameters the repositories send (checked against "
            "SQLAlchemy's `before_cursor_execute` before measuring).",
            "",
        ]
    for path in results.paths:
        configs = [c for c in path.configs if c.key != "e"]
        header = ["method", *(c.label for c in configs)]
        rows = []
        for name in CALLS:
            row = [f"`{name}`"]
            for config in configs:
                row.append(cell_text(path.cells.get((config.key, name)), results.rtt))
            rows.append(row)
        heading = "Direct to PostgreSQL" if path.path == DIRECT else f"Through {path.path}"
        out += [f"### {heading}", "", table(header, rows), ""]
    for reason in results.skipped_paths:
        out += [f"Not measured: {reason}.", ""]
    data = chart_data(results.paths, rtt=results.rtt)
    out += [
        "### Round trips per call, by path and configuration (the chart's right panel)",
        "",
        render_chart_rows(data),
        "",
        _statement_cache_note(results),
        "",
        _tutorial(results),
    ]
    return "\n".join(out)


def _statement_cache_note(results: Results) -> str:
    tracking = [
        path.path
        for path in results.paths
        if path.path.startswith("PgBouncer") and any(c.key == "b" for c in path.configs)
    ]
    measured = (
        f"(b) through PgBouncer ran on {', '.join(tracking)}, which tracks protocol-level "
        "prepared statements (as Neon's pooler does). "
        if tracking
        else ""
    )
    version = results.versions.pgbouncer
    check = results.cache_check
    checked = ""
    if check is not None:
        errors = "; ".join(f"`{e}`" for e in check.errors) or "none"
        checked = (
            f" Checked here: with `statement_cache=True` through {version} and "
            f"{results.leak_concurrency} concurrent client connections, **{check.failed} of "
            f"{check.units} units of work failed** ({errors}; SQLSTATE 26000 is "
            "`invalid_sql_statement_name`: prepared statement does not exist)."
        )
    return (
        measured + f"(b) through {version}: **not safe, not measured.** PgBouncer tracks "
        "protocol-level prepared statements only from 1.21 (`max_prepared_statements > 0`); "
        "before that a cached statement is looked up on whichever server connection the next "
        "transaction lands on and fails with `prepared statement ... does not exist`." + checked
    )


def _tutorial(results: Results) -> str:
    header = ["path", "method", "(a) repository", "(e) tutorial ORM"]
    rows = []
    for path in results.paths:
        for name in TutorialClient.names:
            a, e = path.cells.get(("a", name)), path.cells.get(("e", name))
            if a is None or e is None:
                continue
            shown = [
                "error" if c.error else f"{c.counted_text()} / {c.ratio(results.rtt):.2f}"
                for c in (a, e)
            ]
            rows.append([path.path, f"`{name}`", *shown])
    if not rows:
        return ""
    return "\n".join(
        [
            "### (e) Tutorial ORM style, on the todo_store engine",
            "",
            "create: `session.add(Task(...)); await session.commit(); await "
            "session.refresh(task)`; update: `await session.get(Task, id)`, set the attribute, "
            "commit, refresh (SQLAlchemy's default `expire_on_commit=True`). The refresh runs "
            "in a second transaction: BEGIN and a ROLLBACK at close come on top.",
            "",
            table(header, rows),
            "",
        ]
    )


def _leaks(results: Results) -> str:
    header = ["client", "transactions", "server connections read", "left in total", "per server"]
    rows = [
        [
            r.label,
            f"{r.transactions:,}",
            str(len(r.per_server)),
            f"{r.total:,}",
            ", ".join(str(n) for n in r.per_server),
        ]
        for r in results.leaks
    ]
    return "\n".join(
        [
            "## 2. Named prepared statements left on PgBouncer's server connections",
            "",
            f"A fresh PgBouncer per client; {results.leak_concurrency} client connections run "
            "single-call units of work (get, list_for, count_for, toggle in turn) until the "
            "total is reached. Then one client per server connection opens a transaction and "
            "counts `pg_prepared_statements` there (all held at once, so each reads a different "
            "server connection). The recipe's Close for a statement goes out at the next "
            "prepare, in the next transaction, usually on another server connection: the "
            "statement stays on the one it was prepared on, and Close of an unknown name is "
            "not an error, so nothing reports it.",
            "",
            table(header, rows),
            "",
        ]
    )


READS = ("get", "list_for", "count_for")


def _spread(s: Spread, fmt: str = ",.0f") -> str:
    return f"{s.median:{fmt}} ({s.low:{fmt}}-{s.high:{fmt}})"


def _comparison(results: Results) -> str:
    c = results.comparison
    assert c is not None
    plan = c.plan
    labels = c.labels
    out = [
        "## 3. Throughput: todo_store against its peers (no injected latency)",
        "",
        f"One process, direct to PostgreSQL, {plan.workers} concurrent workers, a pool of "
        f"{plan.workers} connections, statement caching off (as the package runs by default), "
        f"{plan.users} users x {plan.tasks_per_user} tasks; every operation is its own unit of "
        "work on a random user and task. For each call the implementations run in turns, "
        f"{plan.seconds:g} s each, in an order that rotates every round; {plan.rounds} rounds; "
        "the calls in the order of the tables, the table vacuumed before each (`VACUUM ANALYZE "
        "tasks`, as pgbench does before a run). Cells: median of the rounds (min-max). Ratios "
        "are taken within each round, then summarised. Client CPU/op is this process's CPU "
        "time / operations: the database shares the machine's cores, so ops/s follows it "
        "closely.",
        "",
        "Implementations (`benchmarks/peers.py`): **todo_store** `async with store.session() as "
        "s: await TaskRepo(s).<call>(...)`; **todo_store atomic=False** the same with "
        "`store.session(atomic=False)` (each statement commits by itself: no BEGIN/COMMIT); "
        "**todo_store on AsyncConnection** the repositories on an autocommit `AsyncConnection` "
        "of the same engine (no ORM session; the engine has no public context for it yet); "
        "**tutorial ORM** `AsyncSession(engine)`, `session.get` / `select(Task)`, writes as get + "
        "attribute set + `commit()` + `refresh()`; **advanced-alchemy** `SQLAlchemyAsyncRepository`"
        " `get_one` / `list` / `add` / `update` / `count` with `auto_commit=True`; **SQLAlchemy "
        "Core** `engine.begin()` and a statement built in the call, `Row`s back; **raw asyncpg** "
        "the exact SQL todo_store sends, `statement_cache_size=0`, in `conn.transaction()` (and "
        "without one, the floor for atomic=False). All SQLAlchemy ones share todo_store's engine.",
        "",
    ]
    if results.raw_sql_mismatches:
        out += [
            "**raw asyncpg does not run the repositories' SQL** for "
            f"{results.raw_sql_mismatches}: update `benchmarks.workload.RAW`.",
            "",
        ]
    for label, why in c.missing.items():
        out += [f"Not measured: **{label}**: {why}.", ""]
    errors = {(label, call): cell.errors for (label, call), cell in c.cells.items() if cell.errors}
    if errors:
        out += [f"**Errors during the run** (label, call: count): {errors}", ""]
    if results.chart_drawn:
        out += [f"![ops/s and round trips per call]({results.chart})", ""]
    else:
        out += [f"No chart: {results.chart}.", ""]

    out += ["### Operations per second", ""]
    rows = [[f"`{call}`", *(_spread(c.ops(label, call)) for label in labels)] for call in HOT_CALLS]
    out += [table(["call", *labels], rows), ""]

    out += ["### Ratio to raw asyncpg (in a transaction), same round", ""]
    rows = []
    for call in HOT_CALLS:
        cells = [c.ratio(label, RAW, call) for label in labels]
        rows.append([f"`{call}`", *(_spread(r, ".2f") if r else "n/a" for r in cells)])
    out += [table(["call", *labels], rows), ""]

    out += ["### Client CPU per operation (ms)", ""]
    rows = [
        [f"`{call}`", *(_spread(c.cpu(label, call), ".2f") for label in labels)]
        for call in HOT_CALLS
    ]
    out += [table(["call", *labels], rows), ""]
    out += [_goal(c), ""]
    return "\n".join(out)


def _verdict(ratio: Spread | None, at_least: float) -> str:
    if ratio is None:
        return "n/a"
    mark = "✔" if ratio.median >= at_least else "✘"
    return f"{ratio.median:.2f} {mark}"


def _goal(c: Comparison) -> str:
    header = [
        "call",
        "÷ tutorial ORM (≥ 1.5)",
        "÷ advanced-alchemy (≥ 1.5)",
        "÷ Core rows (reads ≥ 1.0)",
        "÷ raw asyncpg (stretch ≥ 0.5)",
    ]
    out = ["### The goal: todo_store ÷ peer (median of per-round ratios)", ""]
    pairs = (
        (TODO_STORE, RAW),
        (TODO_STORE_NON_ATOMIC, RAW_NON_ATOMIC),
        (TODO_STORE_CONNECTION, RAW_NON_ATOMIC),
    )
    for mine, raw in pairs:
        if mine not in c.labels:
            continue
        rows = []
        for call in HOT_CALLS:
            core = _verdict(c.ratio(mine, CORE, call), 1.0) if call in READS else "—"
            rows.append(
                [
                    f"`{call}`",
                    _verdict(c.ratio(mine, TUTORIAL, call), 1.5),
                    _verdict(c.ratio(mine, ADVANCED_ALCHEMY, call), 1.5),
                    core,
                    _verdict(c.ratio(mine, raw, call), 0.5),
                ]
            )
        heading = f"**{mine}** (raw asyncpg column: `{raw}`)"
        out += [heading, "", table(header, rows), ""]
    return "\n".join(out)


def _scaling(results: Results) -> str:
    header = ["tasks", "tasks per user", *(f"`{n}` median" for n in CALLED)]
    header += [f"plan of `{n}`" for n in CALLED] + ["insert + VACUUM ANALYZE"]
    rows = []
    for r in results.scaling:
        row = [f"{r.tasks:,}", f"{r.tasks // USERS:,}"]
        row += [f"{r.median_ms[n]:.2f} ms" for n in CALLED]
        row += [r.plans[n] for n in CALLED] + [f"{r.insert_seconds:.1f} s"]
        rows.append(row)
    return "\n".join(
        [
            "## 4. Scaling: latency against table size",
            "",
            f"Tasks spread evenly over {USERS:,} users (`INSERT ... SELECT generate_series`), "
            "then `VACUUM (ANALYZE) tasks`. Median of "
            f"{results.scaling_samples} single-call units of work on random users, direct, no "
            "injected latency (so this is the database and client work alone: 4 local round "
            "trips included). `list_for` returns at most 50 rows (the default limit); "
            "`count_for` counts all of a user's tasks.",
            "",
            table(header, rows),
            "",
        ]
    )


def _pages(results: Results) -> str:
    sizes = results.pages
    header = ["query", *(f"{r.tasks:,} tasks / user {r.user_tasks:,}" for r in sizes)]

    def cell(row: PagesRow, label: str) -> str:
        c = next(c for c in row.cells if c.label == label)
        return f"{c.median_ms:.2f} ms · {c.execution_ms:.3f} ms · {c.buffers}"

    labels = [f"{s} p{n}" for s in SORTS for n in (1, DEEP_PAGE)] + [*SEARCHES, *WORST_CASE]
    rows = [[f"`{label}`", *(cell(r, label) for r in sizes)] for label in labels]
    plan_rows = [
        [f"`{label}`", *(next(c.plan for c in r.cells if c.label == label) for r in sizes)]
        for label in labels
    ]
    verdicts = []
    for r in sizes:
        by = {c.label: c for c in r.cells}
        deep = max(by[f"{s} p{DEEP_PAGE}"].median_ms / by[f"{s} p1"].median_ms for s in SORTS)
        deep_buffers = max(by[f"{s} p{DEEP_PAGE}"].buffers - by[f"{s} p1"].buffers for s in SORTS)
        search = max(by[label].median_ms for label in SEARCHES) / by["-created p1"].median_ms
        worst = max(by[label].median_ms for label in WORST_CASE) / by["-created p1"].median_ms
        verdicts.append(
            f"- {r.tasks:,} tasks: page {DEEP_PAGE} against page 1, over the sorts: at most "
            f"{deep:.2f} times the latency, at most {deep_buffers:+d} buffers; the slower "
            f"search against a plain page 1: {search:.2f} times; trigram index: "
            f"{'yes' if r.trigram_index else 'no (pg_trgm not available)'}; the worst case "
            f"against a plain page 1: {worst:.0f} times; load "
            f"{r.load_seconds:.0f} s."
        )
    largest = sizes[-1]
    full_plans = []
    for label in FULL_PLANS_OF:
        c = next(c for c in largest.cells if c.label == label)
        full_plans += [f"`{label}` at {largest.tasks:,} tasks:", "", "```", c.full_plan, "```", ""]
    return "\n".join(
        [
            "## 5. Pages: `TaskRepo.page` at 10^4 to 10^6 tasks",
            "",
            f"One user holds a tenth of the table; pages of {PAGE_SIZE} (so page {DEEP_PAGE} "
            "exists for the smallest user too); searches are newest first, page 1, for a word "
            "in 0.1 % and one in 50 % of the user's tasks, and the known worst case: a word "
            "none of the user's tasks has but an eighth of the others' do. Each cell: median "
            f"latency of {results.pages_samples} single-call units of work "
            "(`session(atomic=False)`, direct, no injected latency) · the server's execution "
            "time · shared buffers touched, both from `EXPLAIN (ANALYZE, BUFFERS)` of the SQL "
            "and parameters the repository sent.",
            "",
            table(header, rows),
            "",
            *verdicts,
            "",
            "Plans (outermost node first):",
            "",
            table(header, plan_rows),
            "",
            *full_plans,
        ]
    )
