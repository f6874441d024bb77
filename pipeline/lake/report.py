"""Queries over the lake (`pipeline.lake.store`) behind `rlstream report`: pure functions of DataFrames.

Every function takes frames as `pipeline.lake.store.read_topic` returns them and gives a small frame
ready to plot or print. Versions are binned (``bin_width`` versions per point) so that long runs
stay readable.
"""

from __future__ import annotations

import polars as pl

from pipeline.verify.residual import residual


def groups(scored: pl.DataFrame) -> pl.DataFrame:
    """One row per scored group: group_id, prompt_id, version (behaviour policy), pass rate,
    whether it was all correct / all wrong (`pipeline.verify.residual`), mean reward, sampling
    temperature, time (ms) it was scored."""
    if scored.is_empty():
        return pl.DataFrame(schema={"group_id": pl.Utf8, "prompt_id": pl.Utf8, "version": pl.Int64,
                                    "pass_rate": pl.Float32, "all_correct": pl.Boolean, "all_wrong": pl.Boolean,
                                    "reward": pl.Float64, "temperature": pl.Float32, "time_ms": pl.Int64})
    g = (scored.group_by("group_id", maintain_order=True)
         .agg(pl.col("prompt_id").first(), pl.col("policy_version").first().alias("version"),
              pl.col("group_pass_rate").first().alias("pass_rate"), pl.col("reward").mean(),
              pl.col("temperature").first(), pl.col("_timestamp_ms").first().alias("time_ms")))
    all_correct, all_wrong = residual(g["pass_rate"].to_numpy())
    return g.insert_column(4, pl.Series("all_correct", all_correct)).insert_column(5, pl.Series("all_wrong", all_wrong))


def bin_width(g: pl.DataFrame, points: int = 50) -> int:
    if g.is_empty():
        return 1
    return max(1, (int(g["version"].max()) - int(g["version"].min()) + 1) // points)


def by_version(g: pl.DataFrame, width: int) -> pl.DataFrame:
    """Per bin of ``width`` versions: groups, mean reward, share of all-correct and all-wrong
    groups, and the sampling temperature's p10/p50/p90/max and share above the lowest."""
    tau0 = g["temperature"].min() if not g.is_empty() else 1.0
    return (g.with_columns((pl.col("version") // width * width).alias("bin"))
            .group_by("bin").agg(
                pl.len().alias("groups"),
                pl.col("reward").mean().alias("reward"),
                pl.col("all_correct").mean(),
                pl.col("all_wrong").mean(),
                pl.col("temperature").quantile(0.1).alias("temp_p10"),
                pl.col("temperature").median().alias("temp_p50"),
                pl.col("temperature").quantile(0.9).alias("temp_p90"),
                pl.col("temperature").max().alias("temp_max"),
                (pl.col("temperature") > tau0 + 1e-6).mean().alias("hot_share"))
            .sort("bin"))


def staleness(g: pl.DataFrame, policy: pl.DataFrame) -> pl.DataFrame:
    """Per group, lag = newest policy version announced when the group was scored - the version
    that sampled it (0 when no policy had been announced yet)."""
    if g.is_empty():
        return g.with_columns(pl.lit(0, pl.Int64).alias("lag"))
    if policy.is_empty():
        return g.with_columns((-pl.col("version")).clip(lower_bound=0).alias("lag"))
    announced = (policy.select(pl.col("_timestamp_ms").alias("time_ms"), pl.col("version").alias("newest"))
                 .sort("time_ms").with_columns(pl.col("newest").cum_max()))
    out = g.sort("time_ms").join_asof(announced, on="time_ms", strategy="backward")
    return out.with_columns((pl.col("newest").fill_null(0) - pl.col("version")).clip(lower_bound=0).alias("lag"))


def lineage(g: pl.DataFrame, temperature: pl.DataFrame, prompt_id: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """One prompt's history: its scored groups (time, version, pass rate, temperature sampled at)
    and the temperature updates decided for it (time, temperature, reason)."""
    mine = g.filter(pl.col("prompt_id") == prompt_id).sort("time_ms")
    if temperature.is_empty():
        updates = pl.DataFrame(schema={"time_ms": pl.Int64, "temperature": pl.Float32, "reason": pl.Utf8})
    else:
        updates = (temperature.filter(pl.col("prompt_id") == prompt_id)
                   .select(pl.col("_timestamp_ms").alias("time_ms"), "temperature", "reason",
                           pl.col("decided_at_version").alias("version"))
                   .sort("time_ms"))
    return mine, updates


def summary(g: pl.DataFrame, temperature: pl.DataFrame, deadletter: pl.DataFrame, lags: pl.DataFrame) -> dict:
    """Headline numbers of a run."""
    if g.is_empty():
        return {"groups": 0}
    n = g.height
    tenth = max(1, n // 10)
    first, last = g.head(tenth), g.tail(tenth)
    return {
        "groups": n,
        "prompts": g["prompt_id"].n_unique(),
        "policy versions": f"{int(g['version'].min())} .. {int(g['version'].max())}",
        "mean reward, first / last tenth of groups": f"{first['reward'].mean():.3f} / {last['reward'].mean():.3f}",
        "all-correct groups, first / last tenth": f"{first['all_correct'].mean():.1%} / {last['all_correct'].mean():.1%}",
        "all-wrong groups, first / last tenth": f"{first['all_wrong'].mean():.1%} / {last['all_wrong'].mean():.1%}",
        "temperature updates": temperature.height,
        "highest sampling temperature": f"{g['temperature'].max():.2f}",
        "lag (versions): mean / max": f"{lags['lag'].mean():.2f} / {int(lags['lag'].max())}",
        "dead letters": deadletter.height,
    }
