"""Sweeps of decoding strategies: each family's knob x temperature, judged with intervals.

A single setting per sampler ranks samplers by accident (the 2025 re-analysis of the
min-p paper, arXiv 2506.13681): one family may simply have been given a better setting.
A sweep instead runs every family over a small grid of its knob and the temperature
(`DEFAULT_SWEEP`), with the same prompts and seeds in every setting (common random
numbers, as `model.compare.run_comparison` does), and compares families by

* their quality-diversity Pareto frontier (`pareto_frontier`);
* the quality each frontier reaches at the human text's diversity (``matched
  diversity``, `matched_quality`), after Holtzman et al. (2020), who compare samplers at
  the human text's statistics;
* the best-of-N curve (`expected_best_of_n`): the expected best score after trying N
  settings of the family drawn at random, which is what tuning effort buys.

The two axes. Quality is a loss, lower is better: the judge's NLL per token of the
continuation (a larger model of the same tokenizer, `sample.py compare --judge`), or,
without a judge, the distance |NLL_ours - NLL_human| of the generator's own NLL to that
of the human text (its own NLL alone rewards greedy loops, which it finds most
probable). Diversity, higher is more diverse: distinct-2 of each sample on its own,
averaged over samples. Unlike pooled distinct-n or self-BLEU it is defined for the human
row (one continuation per prompt), it adds up over prompts, so prompts can be resampled,
and it falls exactly where text degenerates: a loop repeats its bigrams.

Intervals. Prompts are the unit of resampling: every quantity is a ratio of per-prompt
sums (``sums[p] / counts[p]`` pooled over the prompts drawn, e.g. nats over tokens), and
one bootstrap draw of prompt indices is shared by every setting and the human row (a
paired bootstrap), so differences between settings keep the correlation the common
prompts give them. A 95% interval is the 2.5th and 97.5th percentile of a quantity over
the draws (the percentile bootstrap); the frontier, the matched quality and the winning
family are recomputed in every draw.
"""

from __future__ import annotations

import itertools
import math
import tomllib
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from model.errors import UserError
from model.strategy import DecodingSpec, parse_strategy

# Family -> {key of its compact spec: the values swept}; the grid of a family is the product
# of its lists, in this order. Temperature alone is always a family. 12 families x 6 settings.
# The knobs span each filter from strict to loose for a char model's ~65 tokens and a BPE
# model's thousands alike; min-p is swept at higher temperatures, which it was designed for.
DEFAULT_SWEEP: dict[str, dict[str, tuple[float, ...]]] = {
    "temperature": {"t": (0.5, 0.7, 0.85, 1.0, 1.15, 1.3)},
    "top-k": {"k": (5, 10, 30), "t": (0.8, 1.0)},
    "top-p": {"p": (0.8, 0.9, 0.95), "t": (0.8, 1.0)},
    "min-p": {"p": (0.05, 0.1, 0.2), "t": (1.0, 1.3)},
    "typical": {"p": (0.8, 0.9, 0.95), "t": (0.8, 1.0)},
    "eta": {"eta": (0.01, 0.03, 0.1), "t": (0.8, 1.0)},
    "epsilon": {"eps": (0.01, 0.03, 0.1), "t": (0.8, 1.0)},
    "top-n-sigma": {"n": (0.5, 1.0, 2.0), "t": (1.0, 1.3)},
    "top-h": {"h": (0.2, 0.4, 0.8), "t": (0.8, 1.0)},
    "mirostat": {"tau": (1.0, 2.0, 3.0), "t": (0.8, 1.0)},
    "xtc": {"threshold": (0.1, 0.2, 0.3), "prob": (0.25, 0.5)},
    "dry": {"mult": (0.4, 0.8, 1.5), "allowed": (4, 8)},
}
LEVEL = 0.95  # the coverage of every interval


# ----------------------------------------------------------------------------- the grid


def family_grid(family: str, knobs: Mapping[str, Sequence[float] | float]) -> list[DecodingSpec]:
    """The specs of one family: every combination of its knobs' values, first knob slowest.

    ``knobs`` maps the keys of the family's compact spec (``p``, ``t``, ...) to a value or
    a list of values. Raises UserError for no knobs, an empty list, a spec that
    `parse_strategy` refuses (unknown family or key, a value out of range) or the same
    strategy twice.
    """
    if not knobs:
        raise UserError(f"sweep family '{family}' has no knob values; give e.g. {family}:t=0.7|1")
    lists = {key: values if isinstance(values, (list, tuple)) else [values] for key, values in knobs.items()}
    empty = [key for key, values in lists.items() if not values]
    if empty:
        raise UserError(f"sweep family '{family}': {empty[0]} has no values")
    specs: list[DecodingSpec] = []
    for combination in itertools.product(*lists.values()):
        text = f"{family}:" + ",".join(f"{key}={value}" for key, value in zip(lists, combination))
        spec = parse_strategy(text)
        if spec in specs:
            raise UserError(f"sweep family '{family}' has the setting '{spec.label}' twice; list each value once")
        specs.append(spec)
    return specs


def parse_sweep(text: str) -> dict[str, list[DecodingSpec]]:
    """The compact sweep flag: families separated by ``;``, each a bare name (its row of
    `DEFAULT_SWEEP`) or ``name:key=v|v|v,key=v|v`` (values separated by ``|``). ``default``
    or an empty text is the whole default table.

    Example: ``temperature;top-p:p=0.8|0.95,t=0.7|1`` is temperature's default grid and
    four top-p settings. Raises UserError for a family given twice, a bare name without
    a default, or a bad key, value or spec (`family_grid`).
    """
    if text.strip() in ("", "default"):
        return {family: family_grid(family, knobs) for family, knobs in DEFAULT_SWEEP.items()}
    sweep: dict[str, list[DecodingSpec]] = {}
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        family, _, settings = (s.strip() for s in part.partition(":"))
        if family in sweep:
            raise UserError(f"sweep family '{family}' is given twice; list each family once")
        if not settings:
            if family not in DEFAULT_SWEEP:
                raise UserError(f"sweep family '{family}' has no default grid (those with one: "
                                f"{', '.join(DEFAULT_SWEEP)}); give its values, e.g. {family}:key=v|v")
            sweep[family] = family_grid(family, DEFAULT_SWEEP[family])
            continue
        knobs: dict[str, list[float]] = {}
        for item in settings.split(","):
            key, equals, values = (s.strip() for s in item.partition("="))
            if not equals or not key:
                raise UserError(f"'{item.strip()}' in sweep family '{family}' is not of the form key=v|v|v")
            if key in knobs:
                raise UserError(f"'{key}' is given twice in sweep family '{family}'")
            knobs[key] = [_number(key, v, family) for v in values.split("|")]
        sweep[family] = family_grid(family, knobs)
    if not sweep:
        raise UserError("the sweep has no family; give e.g. --sweep 'temperature;top-p'")
    return sweep


def parse_sweep_toml(text: str, name: str) -> dict[str, list[DecodingSpec]]:
    """A sweep from a TOML file's text (``name`` is for messages): one table per family,
    each key a list of values (or one value), e.g. ``[top-p]`` / ``p = [0.8, 0.95]`` /
    ``t = [0.7, 1.0]``. An empty table takes the family's default grid."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"sweep file {name} is not valid TOML: {error}") from None
    if not data:
        raise UserError(f"sweep file {name} has no family table; add e.g. [top-p] with p = [0.8, 0.95]")
    sweep = {}
    for family, knobs in data.items():
        if not isinstance(knobs, dict):
            raise UserError(f"sweep file {name}: '{family}' must be a table of knob values, e.g. [{family}]")
        for key, values in knobs.items():
            items = values if isinstance(values, list) else [values]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
                raise UserError(f"sweep file {name}: [{family}] {key} must be a number or a list of numbers")
        if not knobs and family not in DEFAULT_SWEEP:
            raise UserError(f"sweep file {name}: [{family}] is empty and has no default grid")
        sweep[family] = family_grid(family, knobs or DEFAULT_SWEEP[family])
    return sweep


def _number(key: str, text: str, family: str) -> float | int:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise UserError(f"{key}={text!r} in sweep family '{family}' is not a number") from None


def flatten(sweep: Mapping[str, Sequence[DecodingSpec]]) -> list[DecodingSpec]:
    """Every spec of the sweep once, in family order (a spec in two families runs once)."""
    return list(dict.fromkeys(spec for specs in sweep.values() for spec in specs))


# ----------------------------------------------------------------------------- the bootstrap


def bootstrap_indices(num_prompts: int, draws: int, seed: int) -> np.ndarray:
    """(draws, num_prompts) prompt indices, each row drawn with replacement; shared by
    every quantity of a comparison, so the bootstrap is paired."""
    if draws < 1:
        raise UserError(f"the bootstrap needs at least 1 draw, got {draws}")
    return np.random.default_rng(seed).integers(0, num_prompts, size=(draws, num_prompts))


def ratio_of_sums(sums: np.ndarray, counts: np.ndarray, indices: np.ndarray | None = None) -> np.ndarray:
    """sum_p sums[..., p] / sum_p counts[..., p] over the prompts p of each draw.

    ``sums`` and ``counts`` are (..., P). Without ``indices``, the one estimate from every
    prompt, shape (...); with (B, P) ``indices``, one per draw, shape (B, ...). A zero total
    count is nan (nothing to measure)."""
    sums, counts = np.asarray(sums, dtype=float), np.asarray(counts, dtype=float)
    if indices is None:
        total, count = sums.sum(-1), counts.sum(-1)
    else:
        total = np.moveaxis(sums[..., indices].sum(-1), -1, 0)
        count = np.moveaxis(counts[..., indices].sum(-1), -1, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.where(count > 0, count, 1), np.nan)


def interval(replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile bootstrap interval of a quantity from its values in each draw (the
    draws where it is nan are left out; (nan, nan) when all are)."""
    values = np.asarray(replicates, dtype=float)
    values = values[~np.isnan(values)]
    if not len(values):
        return math.nan, math.nan
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


# ----------------------------------------------------------------------------- frontiers


def pareto_frontier(diversity: Sequence[float], quality: Sequence[float]) -> list[int]:
    """Indices of the points on the quality-diversity Pareto frontier, by rising diversity.

    Higher diversity and lower quality (a loss) are better. A point is on the frontier
    when no other point is at least as good on both axes and better on one; of identical
    points only the first is kept; nan points are never on it. Along the result both
    diversity and quality rise strictly (more diversity costs quality).
    """
    points = [(d, q, i) for i, (d, q) in enumerate(zip(diversity, quality)) if not (math.isnan(d) or math.isnan(q))]
    # Most diverse first; on a tie the better quality, then the earlier point. Walking down
    # in diversity, a point is kept only if it is strictly better than everything kept so far.
    points.sort(key=lambda p: (-p[0], p[1], p[2]))
    frontier, best = [], math.inf
    for d, q, i in points:
        if q < best:
            frontier.append(i)
            best = q
    return frontier[::-1]


def matched_quality(diversity: Sequence[float], quality: Sequence[float], frontier: Sequence[int],
                    target: float) -> float:
    """The quality of the frontier at diversity ``target``, linearly interpolated between its
    neighbouring frontier points: q_a + (q_b - q_a) (target - d_a) / (d_b - d_a). nan when
    ``target`` lies outside the frontier's diversity range (no extrapolation), is nan, or
    the frontier is empty."""
    xs = [diversity[i] for i in frontier]
    if not xs or math.isnan(target) or not xs[0] <= target <= xs[-1]:
        return math.nan
    return float(np.interp(target, xs, [quality[i] for i in frontier]))


def expected_best_of_n(scores: Sequence[float]) -> list[float]:
    """E[min score of N settings drawn at random without replacement], for N = 1 .. M.

    Lower is better. Exact, by order statistics: with the scores sorted, s_(1) <= ... <=
    s_(M), the best of a uniformly random N-subset is s_(i) with probability
    C(M - i, N - 1) / C(M, N) (the other N - 1 come from the M - i worse ones), so
    E_N = sum_i s_(i) C(M - i, N - 1) / C(M, N). E_1 is the mean, E_M the minimum. nan
    scores are left out (M counts the others); no scores gives an empty list.
    """
    ranked = sorted(s for s in scores if not math.isnan(s))
    m = len(ranked)
    return [math.fsum(s * math.comb(m - i, n - 1) for i, s in enumerate(ranked, start=1)) / math.comb(m, n)
            for n in range(1, m + 1)]


def human_distance(diversity: np.ndarray, nll: np.ndarray, human_diversity: np.ndarray,
                   human_nll: np.ndarray) -> np.ndarray:
    """The best-of-N score of a setting: how far its text is from the human text's
    statistics, hypot((d - d_h) / d_h, (nll - nll_h) / nll_h), the relative gaps in
    diversity and in NLL (the judge's, else the generator's). 0 is the human text; lower
    is better. Arrays broadcast."""
    return np.hypot((diversity - human_diversity) / human_diversity, (nll - human_nll) / human_nll)


# ----------------------------------------------------------------------------- the summary


@dataclass
class Totals:
    """Per-prompt sums and counts of one row's quantities (see the module docstring):
    ``values[name] = (sums, counts)``, each of length P (the prompts)."""

    values: dict[str, tuple[Sequence[float], Sequence[float]]]

    def array(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        sums, counts = self.values[name]
        return np.asarray(sums, dtype=float), np.asarray(counts, dtype=float)


@dataclass
class SweepSummary:
    """What a sweep found: one record per setting and one per family (see `summarize`)."""

    quality_name: str  # "judge NLL" or "|NLL - human|"
    diversity_name: str
    human: dict[str, float]
    settings: list[dict]
    families: list[dict]
    draws: int


def summarize(sweep: Mapping[str, Sequence[DecodingSpec]], totals: Mapping[str, Totals], human: Totals, *,
              judge: str | None, draws: int = 1000, seed: int = 0) -> SweepSummary:
    """Frontiers, matched diversity, best-of-N and intervals of a sweep.

    ``totals[label]`` are the per-prompt totals of each spec's samples, ``human`` those of
    the human text: "nll" (the generator's nats, tokens), "judge_nll" (the judge's nats,
    tokens) or "oracle_nll" (a synthetic language's true chain: nats, symbols), the one
    named by ``judge`` being the quality axis (None: the generator's distance to the human
    text's NLL), "distinct_2" (the sum of per-sample distinct-2, the
    samples that have a bigram) and optionally "stuck" (stuck samples, loop-prompt
    samples). Every quantity is recomputed in each of ``draws`` paired bootstrap draws of
    the prompts (seeded ``seed``).

    Settings: family, label, quality, diversity, nll_gap (|NLL - human NLL| of the
    generator), stuck, each with a ``_ci`` (low, high), and whether it is on its family's
    frontier. Families: the frontier labels, matched quality (nan when the human
    diversity lies outside the family's frontier) with its interval and the share of
    draws where it is defined, win_share (the share of draws in which the family has the
    lowest matched quality, among the families defined in that draw) and best_of_n.
    """
    labels = [spec.label for spec in flatten(sweep)]
    num_prompts = len(human.array("nll")[0])
    indices = bootstrap_indices(num_prompts, draws, seed)

    def both(name: str, rows: Sequence[Totals]) -> tuple[np.ndarray, np.ndarray]:
        """The estimate from every prompt, shape (R,), and per draw, shape (B, R)."""
        sums = np.stack([row.array(name)[0] for row in rows])
        counts = np.stack([row.array(name)[1] for row in rows])
        return ratio_of_sums(sums, counts), ratio_of_sums(sums, counts, indices)

    rows = [totals[label] for label in labels]
    judged = judge is not None
    nll_name = judge or "nll"
    div, div_b = both("distinct_2", rows)
    nll, nll_b = both(nll_name, rows)
    own, own_b = both("nll", rows)
    human_div, human_div_b = both("distinct_2", [human])
    human_nll, human_nll_b = both(nll_name, [human])
    human_own, human_own_b = both("nll", [human])
    gap, gap_b = np.abs(own - human_own), np.abs(own_b - human_own_b)
    quality, quality_b = (nll, nll_b) if judged else (gap, gap_b)
    has_stuck = all("stuck" in row.values for row in rows)
    stuck, stuck_b = both("stuck", rows) if has_stuck else (np.full(len(rows), np.nan),) * 2
    distance = human_distance(div, nll, human_div, human_nll)

    column = {label: i for i, label in enumerate(labels)}
    families, matched_b = [], {}
    for family, specs in sweep.items():
        cols = [column[spec.label] for spec in specs]
        frontier = [cols[i] for i in pareto_frontier(div[cols], quality[cols])]
        matched = matched_quality(div, quality, frontier, float(human_div[0]))
        matched_b[family] = np.array([
            matched_quality(div_b[b], quality_b[b],
                            [cols[i] for i in pareto_frontier(div_b[b, cols], quality_b[b, cols])],
                            float(human_div_b[b, 0]))
            for b in range(draws)
        ])
        families.append({
            "family": family, "settings": len(cols), "frontier": [labels[c] for c in frontier],
            "matched_quality": matched, "matched_quality_ci": interval(matched_b[family]),
            "matched_defined_share": float(np.mean(~np.isnan(matched_b[family]))),
            "best_of_n": expected_best_of_n(distance[cols].tolist()),
        })
    stacked = np.stack(list(matched_b.values()))  # (F, B)
    defined = ~np.isnan(stacked)
    best = np.where(defined, stacked, np.inf).argmin(axis=0)
    any_defined = defined.any(axis=0)
    for f, record in enumerate(families):
        record["win_share"] = float(np.mean((best == f) & any_defined))

    settings = []
    on_frontier = {label for record in families for label in record["frontier"]}
    for family, specs in sweep.items():
        for spec in specs:
            c = column[spec.label]
            settings.append({
                "family": family, "label": spec.label, "on_frontier": spec.label in on_frontier,
                "quality": float(quality[c]), "quality_ci": interval(quality_b[:, c]),
                "diversity": float(div[c]), "diversity_ci": interval(div_b[:, c]),
                "nll": float(nll[c]), "nll_gap": float(gap[c]), "nll_gap_ci": interval(gap_b[:, c]),
                "stuck": float(stuck[c]), "stuck_ci": interval(stuck_b[:, c]) if has_stuck else (math.nan,) * 2,
                "human_distance": float(distance[c]),
            })
    human_record = {
        "diversity": float(human_div[0]), "diversity_ci": interval(human_div_b[:, 0]),
        "nll": float(human_nll[0]), "nll_ci": interval(human_nll_b[:, 0]),
        "quality": float(human_nll[0]) if judged else 0.0,
    }
    quality_name = f"{judge.removesuffix('_nll')} NLL (nats/token)" if judged else "|NLL - human NLL| (nats/token)"
    return SweepSummary(quality_name,
                        "distinct-2 per sample", human_record, settings, families, draws)


# ----------------------------------------------------------------------------- tables


def _value(value: float, ci: Sequence[float] | None = None, fmt: str = "{:.3f}") -> str:
    """A number and its interval, "0.512 [0.498, 0.530]"; nan is "—"."""
    if math.isnan(value):
        return "—"
    if ci is None or any(math.isnan(c) for c in ci):
        return fmt.format(value)
    return f"{fmt.format(value)} [{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(line, widths))) for line in [header, *rows])


def sweep_tables(summary: SweepSummary, markdown: bool = False) -> str:
    """The settings, the families (matched diversity, wins) and the best-of-N curves as
    aligned text tables (or markdown); intervals in brackets, at `LEVEL`."""
    human = summary.human
    pct = "{:.1%}"
    settings = [
        [s["family"], s["label"] + (" *" if s["on_frontier"] else ""), _value(s["quality"], s["quality_ci"]),
         _value(s["diversity"], s["diversity_ci"]), _value(s["nll_gap"], s["nll_gap_ci"]),
         _value(s["stuck"], s["stuck_ci"], pct).replace("%", ""), f"{s['human_distance']:.3f}"]
        for s in summary.settings
    ]
    settings.insert(0, ["human", "validation text", _value(human["quality"]),
                        _value(human["diversity"], human["diversity_ci"]), "0", "—", "0"])
    families = [
        [f["family"], str(f["settings"]), _value(f["matched_quality"], f["matched_quality_ci"]),
         f"{f['matched_defined_share']:.0%}".replace("%", ""), f"{f['win_share']:.0%}".replace("%", ""),
         " < ".join(f["frontier"])]
        for f in summary.families
    ]
    longest = max((len(f["best_of_n"]) for f in summary.families), default=0)
    best = [[str(n)] + [_value(f["best_of_n"][n - 1]) if n <= len(f["best_of_n"]) else "" for f in summary.families]
            for n in range(1, longest + 1)]
    level = f"{LEVEL:.0%} bootstrap intervals over prompts ({summary.draws} paired draws)"
    unmeasured = [s["label"] for s in summary.settings if math.isnan(s["quality"]) or math.isnan(s["diversity"])]
    left_out = ([f"left out of every frontier and best-of-N, with nothing measured (no sample of 2 units or "
                 f"more): {', '.join(unmeasured)}"] if unmeasured else [])
    return "\n\n".join(left_out + [
        f"settings ({level}; * = on its family's frontier)\n" + _table(
            ["family", "setting", f"quality: {summary.quality_name}", f"diversity: {summary.diversity_name}",
             "|NLL - human NLL| (generator)", "stuck %", "distance to human"], settings, markdown),
        f"families at the human text's diversity {human['diversity']:.3f} (matched diversity: quality "
        "interpolated on the family's frontier, — where the human diversity is outside its range)\n" + _table(
            ["family", "settings", "matched quality", "defined % of draws", "wins % of draws", "frontier"],
            families, markdown),
        "best-of-N: expected lowest distance to the human text after N settings drawn at random (exact)\n"
        + _table(["N", *(f["family"] for f in summary.families)], best, markdown),
    ])
