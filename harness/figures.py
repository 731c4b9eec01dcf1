"""Report figures (seaborn/matplotlib), returned as inline PNG data URIs."""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")  # headless: reports are rendered on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def latency_distribution(gens: pd.DataFrame) -> str:
    data = gens.assign(ms_per_token=1e3 * gens.time_s / gens.new_tokens.clip(lower=1))
    fig, ax = plt.subplots(figsize=(7, 3.2))
    sns.boxplot(data=data, x="ms_per_token", y="series", hue="series", ax=ax, legend=False, fliersize=2)
    ax.set(xlabel="latency per generated token (ms), one point per generation", ylabel="")
    return _png(fig)


def energy_per_token(summary: pd.DataFrame) -> str | None:
    s = summary.dropna(subset=["j_per_token"])
    if s.empty:
        return None
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(s)))
    y = np.arange(len(s))
    ax.barh(y, s.j_per_token, color=sns.color_palette()[: len(s)])
    err = np.array([s.j_per_token - s.j_per_token_low, s.j_per_token_high - s.j_per_token]).clip(min=0)
    ax.errorbar(s.j_per_token, y, xerr=err, fmt="none", ecolor="black", capsize=3)
    ax.set_yticks(y, s.series)
    ax.set(xlabel="GPU energy per generated token (J), 95% CI", ylabel="")
    return _png(fig)


def acceptance_by_position(gens: pd.DataFrame) -> str | None:
    rows = []
    for series, g in gens.groupby("series", sort=False):
        drafted = np.sum([np.asarray(x) for x in g.drafted_by_position if len(x)], axis=0) if any(
            len(x) for x in g.drafted_by_position) else None
        if drafted is None:
            continue
        accepted = np.sum([np.asarray(x) for x in g.accepted_by_position if len(x)], axis=0)
        for j, (d, a) in enumerate(zip(drafted, accepted, strict=True), 1):
            if d:
                rows.append({"series": series, "draft position": j, "acceptance rate": a / d})
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.2))
    sns.lineplot(data=pd.DataFrame(rows), x="draft position", y="acceptance rate", hue="series", marker="o", ax=ax)
    ax.set(ylim=(0, 1.02), ylabel="P(drafted token j accepted)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    return _png(fig)


def speed_vs_quality(summary: pd.DataFrame) -> str | None:
    """Tokens/s against pass@1 when every setting was scored (``prompts.scorer``), else output perplexity."""
    scored = "pass_at_1" in summary and summary.pass_at_1.notna().all()
    key = "pass_at_1" if scored else "ppl"
    s = summary.dropna(subset=["tokens_per_s", key])
    if s.empty:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    def err(r, key):  # asymmetric error bar from the interval (none if it is undefined)
        return [[max(r[key] - r[f"{key}_low"], 0)], [max(r[f"{key}_high"] - r[key], 0)]]

    for color, (_, r) in zip(sns.color_palette(n_colors=len(s)), s.iterrows(), strict=False):
        ax.errorbar(r.tokens_per_s, r[key], xerr=err(r, "tokens_per_s"), yerr=err(r, key),
                    fmt="o", color=color, capsize=3, label=r.series)
    ylabel = ("pass@1, 95% Wilson interval (higher is better)" if scored
              else "output perplexity under the target (lower is better)")
    ax.set(xlabel="tokens/s (higher is faster)", ylabel=ylabel)
    ax.legend(fontsize=8)
    return _png(fig)


def tokens_per_iteration(steps: pd.DataFrame) -> str | None:
    if steps.empty:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.2))
    sns.histplot(data=steps, x="committed", hue="series", discrete=True, stat="probability", common_norm=False,
                 multiple="dodge", shrink=0.8, ax=ax)
    ax.set(xlabel="tokens committed per target forward", ylabel="share of iterations")
    ax.xaxis.get_major_locator().set_params(integer=True)
    return _png(fig)


def time_breakdown(gens: pd.DataFrame) -> str | None:
    """Per decoder, ms per generated token split into draft, verify, accept and other
    (``decoders.timing``): why a method wins or loses."""
    phases = ["draft_s", "verify_s", "accept_s", "other_s"]
    if any(c not in gens for c in phases) or gens[phases].isna().all().all():
        return None
    totals = gens.groupby("series", sort=False)[[*phases, "new_tokens"]].sum()
    per_token = 1e3 * totals[phases].div(totals.new_tokens.clip(lower=1), axis=0)
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.45 * len(per_token)))
    left = np.zeros(len(per_token))
    for phase, color in zip(phases, sns.color_palette(n_colors=len(phases)), strict=True):
        ax.barh(per_token.index, per_token[phase], left=left, color=color, label=phase.removesuffix("_s"))
        left += per_token[phase].to_numpy()
    ax.invert_yaxis()
    ax.set(xlabel="ms per generated token, by phase (all generations)", ylabel="")
    ax.legend(ncols=4, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    return _png(fig)
