"""Writing a run's results: the markdown report and the PNG plot.

Rules kept here:
- Every figure is shown as `median [min–max]` over the rounds, with n when rounds failed.
- The summary table has one row per contender and, per workload, its headline figure
  (plus per-proxy-core figures where they mean something, and crr's p99); the detail tables
  hold the rest, with ratios against `direct` and `haproxy-1t`.
- The plot (matplotlib, Agg, no display) draws the summary columns as bars with min–max
  whiskers. Building the text is pure; only `write_plot` touches matplotlib and files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.reporting.summary import Cell, Spread, ratio

Column = tuple[str, str, str]  # (workload, figure key, header)


def fmt_num(v: float | None) -> str:
    if v is None:
        return "-"
    a = abs(v)
    if a >= 10_000:
        return f"{v / 1000:.1f}k"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def fmt_spread(st: Spread | None, rounds: int | None = None) -> str:
    if st is None:
        return "-"
    text = f"{fmt_num(st.median)} [{fmt_num(st.low)}–{fmt_num(st.high)}]"
    return text + (f" (n={st.n})" if rounds is not None and st.n < rounds else "")


def summary_columns(cells: Sequence[Cell]) -> list[Column]:
    cols: list[Column] = []
    for workload in dict.fromkeys(c.workload for c in cells):
        mode = next(c.mode for c in cells if c.workload == workload)
        if mode == "stream":
            cols += [(workload, "gbit_per_s", f"{workload} Gbit/s"), (workload, "gbit_per_core", "Gbit/s per proxy core")]
        elif mode in ("crr", "rr"):
            unit = "conn/s" if mode == "crr" else "req/s"
            cols += [(workload, "ops_per_s", f"{workload} {unit}"), (workload, "ops_per_core", f"{unit} per proxy core"),
                     (workload, "p99_ms", f"{workload} p99 ms")]
        elif mode == "latency":
            cols.append((workload, "p99_ms", f"{workload} p99 ms"))
        elif mode == "idle":
            cols += [(workload, "established", "idle established"), (workload, "mem_per_conn_kib", "KiB per conn")]
        elif mode == "affinity":
            cols += [(workload, "sticky_share", "sticky clients"), (workload, "moved_needlessly_share", "moved needlessly")]
        elif mode == "control":
            cols.append((workload, "p99_ms", f"{workload}: change to routed p99 ms"))
        elif mode in ("restart", "crash"):
            cols += [(workload, "gap_ms", f"{workload}: ms without service"),
                     (workload, "failed_per_restart", "new conns failed per restart"),
                     (workload, "held_lost_share", "open conns lost (share)")]
    return cols


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def _cell(cells: Sequence[Cell], workload: str, contender: str) -> Cell | None:
    return next((c for c in cells if c.workload == workload and c.contender == contender), None)


def summary_table(cells: Sequence[Cell], contenders: Sequence[str]) -> list[str]:
    cols = summary_columns(cells)
    rows = []
    for name in contenders:
        row = [name]
        for workload, key, _ in cols:
            c = _cell(cells, workload, name)
            row.append(fmt_spread(c.stats.get(key), c.rounds) if c else "-")
        rows.append(row)
    return _table(["contender", *(h for _, _, h in cols)], rows)


DETAIL_KEYS = {
    "stream": ("gbit_per_s", "gbit_per_core", "proxy_cores", "machine_cores"),
    "rr": ("ops_per_s", "ops_per_core", "p50_ms", "p99_ms", "p99.9_ms", "proxy_cores", "machine_cores"),
    "crr": ("ops_per_s", "ops_per_core", "p50_ms", "p99_ms", "p99.9_ms", "proxy_cores", "machine_cores"),
    "latency": ("offered_rate", "ops_per_s", "rate_kept", "p50_ms", "p90_ms", "p99_ms", "p99.9_ms", "max_ms",
                "proxy_cores", "machine_cores"),
    "idle": ("target", "established", "mem_per_conn_kib"),
    "affinity": ("sticky_share", "after_sticky_share", "moved_needlessly_share"),
    "control": ("services", "full_sync_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms"),
    "restart": ("gap_ms", "failed_per_restart", "held_lost_share"),
    "crash": ("gap_ms", "failed_per_restart", "held_lost_share"),
}
HEADLINE_KEY = {"stream": "gbit_per_s", "rr": "ops_per_s", "crr": "ops_per_s", "latency": "p99_ms",
                "idle": "established", "affinity": "sticky_share", "control": "p99_ms",
                "restart": "gap_ms", "crash": "gap_ms"}


def detail_tables(cells: Sequence[Cell], contenders: Sequence[str]) -> list[str]:
    out: list[str] = []
    for workload in dict.fromkeys(c.workload for c in cells):
        mode = next(c.mode for c in cells if c.workload == workload)
        keys = DETAIL_KEYS.get(mode, ())
        head = HEADLINE_KEY.get(mode, "")
        rows = []
        for name in contenders:
            c = _cell(cells, workload, name)
            if c is None:
                continue
            errs = c.stats.get("errors")
            row = [name, *(fmt_spread(c.stats.get(k), c.rounds) for k in keys),
                   fmt_num(errs.median if errs else None),
                   fmt_num(ratio(cells, workload, name, "direct", head)),
                   fmt_num(ratio(cells, workload, name, "haproxy-1t", head)),
                   f"{c.failures}/{c.rounds}" + (f" ({'; '.join(c.errors)[:120]})" if c.errors else "")]
            rows.append(row)
        out += [f"### {workload}", "",
                *_table(["contender", *keys, "errors/run", f"{head} vs direct", f"{head} vs haproxy-1t", "failed"], rows), ""]
    return out


def markdown(meta: Mapping[str, Any], cells: Sequence[Cell], contenders: Sequence[str],
             skipped: Mapping[str, str]) -> str:
    lines = [f"# pyproxy benchmark, {meta['started']}", "", f"Machine: {meta['machine']}", "",
             f"Rounds: {meta['rounds']} interleaved ({'quick' if meta['quick'] else 'full'} run, "
             f"{meta['duration_s']:g} s per measurement), wall time {meta['wall_s']:.0f} s. "
             "Figures: median [min–max] over rounds; per proxy core = figure / (proxy CPU s / window s).", "",
             "## Summary", "", *summary_table(cells, contenders), ""]
    if skipped:
        lines += ["## Skipped contenders", "", *(f"- {k}: {v}" for k, v in skipped.items()), ""]
    lines += ["## Details", "", *detail_tables(cells, contenders)]
    return "\n".join(lines) + "\n"


def write_plot(path: Path, cells: Sequence[Cell], contenders: Sequence[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [c for c in summary_columns(cells) if c[1] != "established"]
    if not cols:
        return
    ncols = min(3, len(cols))
    nrows = (len(cols) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.6 * nrows), squeeze=False)
    for ax, (workload, key, header) in zip(axes.flat, cols):
        names, meds, lo, hi = [], [], [], []
        for name in contenders:
            c = _cell(cells, workload, name)
            st = c.stats.get(key) if c else None
            if st is None:
                continue
            names.append(name)
            meds.append(st.median)
            lo.append(st.median - st.low)
            hi.append(st.high - st.median)
        ax.bar(range(len(names)), meds, yerr=[lo, hi], capsize=3, color="#4c72b0")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.set_title(header + (" (log)" if key.endswith("_ms") else ""), fontsize=10)
        if key.endswith("_ms") and meds and min(meds) > 0:
            ax.set_yscale("log")  # one slow contender must not flatten the others
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(cols):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.98))  # room for the title
    fig.savefig(path, dpi=110)
    plt.close(fig)
