"""`rlstream report LAKE`: an HTML page with PNG plots of a recorded run (queries in
`pipeline.lake.report`).

Plots: reward and residual (all-correct / all-wrong) fractions over policy versions, the sampling
temperature distribution per version, staleness, and with ``--prompt ID`` the lineage of one
prompt (its pass rates and the temperatures ERPO decided for it). ``overview.png`` puts the first
three on one screenshot-sized figure.
"""

from __future__ import annotations

import html
from pathlib import Path

import polars as pl

from pipeline.lake import report as q
from pipeline.lake.store import read_topic, topics_in


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _reward_axes(ax, v: pl.DataFrame) -> None:
    x = v["bin"].to_numpy()
    ax.plot(x, v["reward"].to_numpy(), color="tab:green", label="mean reward (sampled)")
    ax.plot(x, v["all_correct"].to_numpy(), color="tab:red", label="all-correct groups")
    ax.plot(x, v["all_wrong"].to_numpy(), color="tab:blue", label="all-wrong groups")
    ax.set_xlabel("behaviour policy version")
    ax.set_ylim(0, 1)
    ax.set_title("Reward and residual fractions")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _temperature_axes(ax, v: pl.DataFrame) -> None:
    x = v["bin"].to_numpy()
    ax.fill_between(x, v["temp_p10"].to_numpy(), v["temp_p90"].to_numpy(), color="tab:orange", alpha=0.3,
                    label="p10-p90")
    ax.plot(x, v["temp_p50"].to_numpy(), color="tab:orange", label="median")
    ax.plot(x, v["temp_max"].to_numpy(), color="tab:red", ls="--", label="max")
    ax2 = ax.twinx()
    ax2.plot(x, v["hot_share"].to_numpy() * 100, color="tab:gray", lw=0.8, label="% groups above the lowest")
    ax2.set_ylabel("% of groups sampled hotter", fontsize=7)
    ax.set_xlabel("behaviour policy version")
    ax.set_title("Sampling temperature per version")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")


def _staleness_axes(ax, lags: pl.DataFrame) -> None:
    counts = lags.group_by("lag").len().sort("lag")
    ax.bar(counts["lag"].to_numpy(), counts["len"].to_numpy(), color="tab:purple")
    ax.set_xlabel("lag (policy versions) when scored")
    ax.set_ylabel("groups")
    ax.set_title("Staleness")
    ax.grid(alpha=0.3, axis="y")


def write_report(lake: Path, out: Path, prompt: str | None = None, title: str = "rlstream run") -> Path:
    """Render the report of ``lake`` into ``out`` (index.html + PNGs); returns the HTML path."""
    lake, out = Path(lake), Path(out)
    if not lake.is_dir():
        raise FileNotFoundError(f"no lake at {lake} (run the recorder, or the demo, first)")
    out.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    scored, policy = read_topic(lake, "scored"), read_topic(lake, "policy")
    temperature, deadletter = read_topic(lake, "temperature"), read_topic(lake, "deadletter")
    g = q.groups(scored)
    width = q.bin_width(g)
    v = q.by_version(g, width)
    lags = q.staleness(g, policy)
    images: list[tuple[str, str]] = []

    fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.8), dpi=100)
    _reward_axes(axes[0], v)
    _temperature_axes(axes[1], v)
    _staleness_axes(axes[2], lags)
    fig.suptitle(f"{title}: {g.height} groups, {width} version(s) per point", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "overview.png")
    plt.close(fig)
    images.append(("overview.png", "Overview"))
    for name, draw, arg in (("reward.png", _reward_axes, v), ("temperature.png", _temperature_axes, v),
                            ("staleness.png", _staleness_axes, lags)):
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        draw(ax, arg)
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        images.append((name, name.removesuffix(".png").capitalize()))

    lineage_html = ""
    if prompt is not None:
        mine, updates = q.lineage(g, temperature, prompt)
        if mine.is_empty():
            raise ValueError(f"prompt {prompt!r} has no scored group in {lake}")
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        t0 = int(mine["time_ms"].min())
        ax.plot((mine["time_ms"] - t0).to_numpy() / 1000, mine["pass_rate"].to_numpy(), "o-", color="tab:green",
                label="group pass rate")
        ax2 = ax.twinx()
        ax2.step((mine["time_ms"] - t0).to_numpy() / 1000, mine["temperature"].to_numpy(), where="post",
                 color="tab:red", label="temperature sampled at")
        if not updates.is_empty():
            ax2.plot((updates["time_ms"] - t0).to_numpy() / 1000, updates["temperature"].to_numpy(), "x",
                     color="black", label="ERPO decision")
        ax.set_xlabel("seconds since its first group")
        ax.set_ylabel("pass rate")
        ax2.set_ylabel("temperature")
        ax.set_title(f"Lineage of prompt {prompt}")
        fig.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(out / "lineage.png")
        plt.close(fig)
        images.append(("lineage.png", f"Lineage of {prompt}"))
        rows = "".join(f"<tr><td>{int(r['version'])}</td><td>{r['temperature']:.2f}</td><td>{html.escape(r['reason'])}</td></tr>"
                       for r in updates.iter_rows(named=True))
        lineage_html = (f"<h2>Temperature decisions for {html.escape(prompt)}</h2><table><tr><th>version</th>"
                        f"<th>temperature</th><th>reason</th></tr>{rows}</table>")

    facts = q.summary(g, temperature, deadletter, lags)
    facts["topics recorded"] = ", ".join(topics_in(lake))
    table = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(val))}</td></tr>" for k, val in facts.items())
    hottest = (g.group_by("prompt_id").agg(pl.col("temperature").max(), pl.len().alias("groups"))
               .sort("temperature", descending=True).head(5))
    hot = "".join(f"<li><code>{html.escape(r['prompt_id'])}</code>: up to {r['temperature']:.2f} over {r['groups']} groups "
                  f"(<code>rlstream report {html.escape(str(lake))} --prompt {html.escape(r['prompt_id'])}</code>)</li>"
                  for r in hottest.iter_rows(named=True))
    figures = "".join(f"<h2>{html.escape(t)}</h2><img src='{n}' alt='{html.escape(t)}'>" for n, t in images)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:1400px;margin:2em auto}td,th{padding:2px 12px;"
            "text-align:left}img{max-width:100%}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><table>{table}</table>"
            f"<h2>Hottest prompts</h2><ul>{hot}</ul>{figures}{lineage_html}</body></html>")
    path = out / "index.html"
    path.write_text(page)
    return path
