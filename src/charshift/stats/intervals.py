"""Cluster-bootstrap draws, intervals (percentile or BCa, with the small-sample expansion),
bootstrap p-values and the flags that say when an interval is not to be trusted (pure)."""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from scipy.stats import t as student_t

from charshift.stats.counts import columns, k_of, macro_joint, statistics
from charshift.stats.results import FIXED_NULL_TEXT, FIXED_TEXT, Interval

_ND = NormalDist()
# Figures of a base-null cell that are fixed by construction, and why.
FIXED_FOR_NULL = {
    "accuracy": FIXED_TEXT,
    "accuracy_itt": FIXED_TEXT,
    "kappa": FIXED_NULL_TEXT,
    "kappa_itt": FIXED_NULL_TEXT,
    "macro_f1_excess": FIXED_NULL_TEXT,
    "macro_f1_excess_itt": FIXED_NULL_TEXT,
}


@dataclass(frozen=True)
class Opts:
    n_boot: int
    ci: float
    method: str
    seed: int
    min_clusters: int
    small_sample: bool = True
    n_perm: int = 0
    control: str | None = None


def draw(rng: np.random.Generator, n_boot: int, n_clusters: int) -> np.ndarray:
    """(n_boot x n_clusters) multinomial counts: how often each cluster is drawn per resample."""
    if n_clusters == 0:
        return np.zeros((n_boot, 0))
    probs = np.full(n_clusters, 1.0 / n_clusters)
    return rng.multinomial(n_clusters, probs, size=n_boot).astype(np.float64)


@functools.lru_cache(maxsize=4096)
def tail(ci: float, g: int, small_sample: bool = True) -> float:
    """The share of resamples cut off at each end for a `ci` interval from `g` clusters.

    Without the small-sample correction (or g < 2): (1 - ci) / 2. With it, the expanded
    percentile interval: Phi(-sqrt(g / (g - 1)) * t_{g-1}(1 - (1 - ci) / 2)), which widens
    the interval for the bootstrap's (g - 1) / g variance and for a t rather than normal
    reference on g - 1 degrees of freedom (10 clusters: 0.0086 instead of 0.025).
    """
    alpha = (1.0 - ci) / 2.0
    if not small_sample or g < 2:
        return alpha
    return _ND.cdf(-math.sqrt(g / (g - 1)) * float(student_t.ppf(1.0 - alpha, g - 1)))


def expansion(ci: float, g: int, small_sample: bool = True) -> float:
    """How much wider than a normal-theory interval the small-sample correction makes a
    symmetric one: sqrt(g / (g - 1)) * t_{g-1} / z (1 without it)."""
    if not small_sample or g < 2:
        return 1.0
    alpha = (1.0 - ci) / 2.0
    q = 1.0 - alpha
    return math.sqrt(g / (g - 1)) * float(student_t.ppf(q, g - 1)) / _ND.inv_cdf(q)


def interval(
    boot: np.ndarray, point: np.ndarray, jack: np.ndarray | None, o: Opts, g: int
) -> tuple[np.ndarray, np.ndarray]:
    """Elementwise interval over the trailing shape of `boot` (n_boot, ...); NaN resamples
    (figure undefined) are left out; `g` clusters carry the figure (the small-sample level).

    BCa (Efron 1987): bias correction z0 from the share of resamples below the estimate (ties
    count half, so a degenerate distribution gives z0 = 0), acceleration from the jackknife
    values `jack` (n_leave_one_out, ...), one per left-out cluster.
    """
    a = tail(o.ci, int(g), o.small_sample)
    point = np.asarray(point, dtype=np.float64)
    if o.method == "percentile":
        return _nanquantile(boot, [a, 1.0 - a])
    if o.method != "bca":
        raise ValueError(f"unknown interval method {o.method!r}; use 'percentile' or 'bca'")
    flat_boot = boot.reshape(boot.shape[0], -1)
    flat_point = point.reshape(-1)
    flat_jack = None if jack is None else jack.reshape(jack.shape[0], -1)
    lo = np.full(flat_point.shape, np.nan)
    hi = np.full(flat_point.shape, np.nan)
    for j in range(flat_point.size):
        b = flat_boot[:, j]
        b = b[~np.isnan(b)]
        theta = flat_point[j]
        if b.size == 0 or np.isnan(theta):
            continue
        jk = None if flat_jack is None else flat_jack[:, j]
        lo[j], hi[j] = _bca_ends(b, float(theta), jk, a)
    return lo.reshape(point.shape), hi.reshape(point.shape)


def _bca_ends(
    b: np.ndarray, theta: float, jk: np.ndarray | None, alpha: float
) -> tuple[float, float]:
    share = (np.sum(b < theta) + 0.5 * np.sum(b == theta)) / b.size
    share = min(max(share, 0.5 / b.size), 1.0 - 0.5 / b.size)
    z0 = _ND.inv_cdf(share)
    acc = 0.0
    if jk is not None:
        jk = jk[~np.isnan(jk)]
        if jk.size > 1:
            d = jk.mean() - jk
            den = 6.0 * float(np.sum(d**2)) ** 1.5
            acc = float(np.sum(d**3)) / den if den > 0 else 0.0
    levels = []
    for z_a in (_ND.inv_cdf(alpha), _ND.inv_cdf(1.0 - alpha)):
        denom = 1.0 - acc * (z0 + z_a)
        adj = z0 + (z0 + z_a) / denom if denom > 0 else math.copysign(np.inf, z_a)
        levels.append(_ND.cdf(adj) if np.isfinite(adj) else (0.0 if adj < 0 else 1.0))
    q = np.quantile(b, levels)
    return float(q[0]), float(q[1])


def _nanquantile(boot: np.ndarray, qs: list[float]) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(all="ignore"):
        if not np.isnan(boot).any():
            q = np.quantile(boot, qs, axis=0)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                q = np.nanquantile(boot, qs, axis=0)
    return q[0], q[1]


def p_two_sided(boot: np.ndarray, estimate: float, g: int, o: Opts, se_floor: float = 0.0) -> float:
    """Two-sided p-value of "the figure is 0" from the bootstrap standard error SE: with the
    small-sample correction, t = |estimate| / (SE sqrt(g / (g - 1))) on g - 1 degrees of
    freedom, else a normal z = |estimate| / SE. (A percentile-count p-value cannot go below
    1 / n_boot, too coarse for a multiplicity adjustment; the max-t band of the primary family
    uses the same SE.) `se_floor`: a standard error the SE may not fall below (the permutation
    null's, `nulls.null_se`). NaN with fewer than two clusters, as the interval is absent."""
    b = np.asarray(boot, dtype=np.float64)
    b = b[np.isfinite(b)]
    if b.size < 2 or not math.isfinite(estimate) or g < 2:
        return math.nan  # one cluster: the resamples hold none of its variance
    se = max(float(b.std(ddof=1)), se_floor)
    if se == 0.0:
        return 1.0 if estimate == 0.0 else 0.0
    if not o.small_sample:
        return float(2.0 * _ND.cdf(-abs(estimate) / se))
    t = abs(estimate) / (se * math.sqrt(g / (g - 1)))
    return float(min(1.0, 2.0 * student_t.sf(t, g - 1)))


def flag(estimate: float, n_clusters: int, n_empty: int, n_boot: int, min_clusters: int) -> str:
    """Why an interval is not to be trusted ("" when nothing is wrong)."""
    parts = []
    if not math.isfinite(estimate):
        parts.append("undefined: nothing scored")
    elif n_clusters < min_clusters:
        parts.append(f"{n_clusters} cluster(s) behind it, fewer than {min_clusters}")
    if n_empty and math.isfinite(estimate):  # (an undefined estimate has no defined resample)
        parts.append(f"{n_empty} of {n_boot} resamples had nothing scored and are left out")
    return "; ".join(parts)


@dataclass
class Side:
    """One set of counts (a cell, or a unit on a chain's common items) with its resamples."""

    counts: np.ndarray
    point: dict[str, np.ndarray]
    boot: dict[str, np.ndarray]
    jack: dict[str, np.ndarray] | None
    null: bool

    def n_eff(self, name: str) -> int:
        """Clusters carrying `name`: all of them for ITT and yield, scored ones otherwise."""
        if name.endswith("_itt") or name == "yield":
            return int(self.counts.shape[0])
        return int(np.sum(self.counts[:, columns(k_of(self.counts))["n_s"]] > 0))


def side(counts: np.ndarray, w: np.ndarray, method: str, null: bool) -> Side:
    jack = statistics(counts.sum(axis=0)[None, :] - counts) if method == "bca" else None
    return Side(counts, statistics(counts.sum(axis=0)), statistics(w @ counts), jack, null)


def fixed_iv(side_: Side, name: str, estimate: float) -> Interval | None:
    """The interval of a figure fixed by construction in a base-null cell, else None."""
    if side_.null and name in FIXED_FOR_NULL:
        return Interval(estimate, math.nan, math.nan, side_.n_eff(name), 0, True,
                        FIXED_FOR_NULL[name])  # fmt: skip
    return None


def scalar_iv(side_: Side, name: str, o: Opts) -> Interval:
    """A cell's figure `name` with its interval (persona-averaged over its own personas)."""
    est = float(side_.point[name])
    n_eff = side_.n_eff(name)
    fixed = fixed_iv(side_, name, est)
    if fixed is not None:
        return fixed
    jack = None if side_.jack is None else side_.jack[name]
    lo, hi = interval(side_.boot[name], side_.point[name], jack, o, n_eff)
    n_empty = int(np.isnan(side_.boot[name]).sum())
    f = flag(est, n_eff, n_empty, o.n_boot, o.min_clusters)
    return Interval(est, float(lo), float(hi), n_eff, n_empty, False, f)


def vector_iv(side_: Side, name: str, o: Opts) -> list[Interval]:
    """Per-persona intervals of `name` ("f1" or "f1_itt")."""
    jack = None if side_.jack is None else side_.jack[name]
    n_eff = side_.n_eff(name)
    lo, hi = interval(side_.boot[name], side_.point[name], jack, o, n_eff)
    out = []
    for i, est in enumerate(side_.point[name]):
        n_empty = int(np.isnan(side_.boot[name][:, i]).sum())
        f = flag(float(est), n_eff, n_empty, o.n_boot, o.min_clusters)
        out.append(Interval(float(est), float(lo[i]), float(hi[i]), n_eff, n_empty, False, f))
    return out


def tile(st: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """A point estimate's statistics repeated `n` times along a new leading axis."""
    return {k: np.broadcast_to(v, (n, *np.shape(v))) for k, v in st.items()}


def joint_values(
    sides: list[Side], name: str, paired: bool
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray] | None]:
    """Every side's point, bootstrap and (BCa) jackknife values of `name`, persona-averaged
    figures over the personas defined on every side (per resample). Unpaired jackknife: one
    block per side, that side's leave-one-out values against the others' point estimates."""
    point = macro_joint([s.point for s in sides], name)
    boot = macro_joint([s.boot for s in sides], name)
    if any(s.jack is None for s in sides):
        return point, boot, None
    if paired:
        return point, boot, macro_joint([s.jack for s in sides], name)  # type: ignore[misc]
    blocks: list[list[np.ndarray]] = [[] for _ in sides]
    for i, s in enumerate(sides):
        n = s.jack["yield"].shape[0]  # type: ignore[index]
        sts = [s.jack if j == i else tile(o.point, n) for j, o in enumerate(sides)]
        for j, v in enumerate(macro_joint(sts, name)):  # type: ignore[arg-type]
            blocks[j].append(v)
    return point, boot, [np.concatenate(b, axis=0) for b in blocks]
