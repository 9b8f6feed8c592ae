"""The Python API: `load_results(path)` reads a finished run or a `report --predictions` output
into pandas DataFrames, and `run(config, out=...)` runs a config (object or file) end to end.

    import charshift
    res = charshift.load_results("runs/demo")
    res.metrics.query("stage == 'prompted'")[["slice", "macro_f1_excess", "macro_f1_excess_lo"]]

The tables are the CSVs the statistics wrote (`charshift.tables`), read as they are: nothing is
recomputed here. `.rows` joins the generations with their predictions: for a run directory, the
run's own records (one per scored unit, with the generation's conversation and email); for a
`report --predictions` output, the copy of the predictions file it keeps (`predictions.jsonl`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from charshift.config import RunConfig

TABLES = ("metrics", "differences", "chains", "per_persona", "scorer_check", "retention")
# written only where the run has several scorers / a Likert judge: an empty frame otherwise
OPTIONAL_TABLES = ("agreement", "agreement_signs", "likert")


class ResultsError(ValueError):
    """A path that holds no charshift results, named with what is missing."""


@dataclass
class Results:
    """A run's (or a predictions report's) results as pandas DataFrames.

    `metrics`: one row per (base, stage, slice, scorer) cell (metrics.csv; every table has a
    `scorer` column, the classifier's rows first); `differences`: ladder rungs,
    chain totals, contrasts, stage differences and the primary family (differences.csv);
    `chains`: every chain's units with their estimates (chains.csv); `per_persona`
    (per_persona.csv); `scorer_check` and `retention`; `rows`: generations joined with
    predictions (see the module docstring); `settings`: stats.json (interval settings, label
    sets); `path`: where they were read from; `report`: the HTML report's path. Where the run
    has them (else empty): `agreement` and `agreement_signs` (whether its scorers agree) and
    `likert` (the Likert judge's mean score and excess per cell)."""

    path: Path
    metrics: pd.DataFrame
    differences: pd.DataFrame
    chains: pd.DataFrame
    per_persona: pd.DataFrame
    scorer_check: pd.DataFrame
    retention: pd.DataFrame
    rows: pd.DataFrame
    settings: dict[str, Any] = field(default_factory=dict)
    agreement: pd.DataFrame | None = None
    agreement_signs: pd.DataFrame | None = None
    likert: pd.DataFrame | None = None

    @property
    def report(self) -> Path:
        return self.path / "report" / "index.html"

    @property
    def family(self) -> pd.DataFrame:
        """The declared primary family's rows of `differences`."""
        return self.differences[self.differences["family"] == "primary"]

    def __repr__(self) -> str:
        return (
            f"Results({str(self.path)!r}: {len(self.metrics)} cells, {len(self.differences)} "
            f"differences, {len(self.rows)} rows)"
        )


def _read_csv(path: Path) -> pd.DataFrame:
    import pandas as pd

    # strings stay strings: a base or persona called "1" or "NA" must not become a number/NaN
    frame = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"base": str})
    return frame


def _empty() -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame()


def _record_rows(
    records: list[Any], extra: dict[str, dict[str, Any]] | None = None
) -> pd.DataFrame:
    import pandas as pd

    rows = []
    for r in records:
        row = r.to_dict()
        row.update((extra or {}).get(r.key or "", {}))
        rows.append(row)
    return pd.DataFrame(rows)


def _run_rows(root: Path) -> pd.DataFrame:
    """A run directory's records joined with their generations (conversation, email)."""
    from charshift import analysis, pipeline

    store = pipeline.RunStore(root, create=False, writable=False)
    cfg = pipeline.load_run_config(store)
    records = analysis.prediction_records(cfg, store)
    extra = {}
    for r in records:
        g = store.generations.get(r.key or "")
        if g is not None:
            extra[r.key or ""] = {"messages": g.messages, "email": g.email, "tool_log": g.tool_log}
    return _record_rows(records, extra)


def _rows(root: Path) -> pd.DataFrame:
    from charshift.external import PREDICTIONS_COPY, load_predictions_jsonl

    copy = root / PREDICTIONS_COPY
    if copy.is_file():
        return _record_rows(load_predictions_jsonl(copy))
    if (root / "config.yaml").is_file():
        return _run_rows(root)
    import pandas as pd

    return pd.DataFrame()


def load_results(path: str | Path) -> Results:
    """Read the results under `path`: a run directory (`charshift run`) or the `--out` folder of
    `charshift report --predictions`. Raises ResultsError naming the missing table."""
    root = Path(path)
    if not root.is_dir():
        raise ResultsError(f"{root}: not a folder; give a run directory or a report's --out")
    missing = [f"{t}.csv" for t in TABLES if not (root / f"{t}.csv").is_file()]
    if missing:
        raise ResultsError(
            f"{root}: no charshift results here (missing {', '.join(missing)}); run `charshift "
            "run` or `charshift report` first"
        )
    tables = {t: _read_csv(root / f"{t}.csv") for t in TABLES}
    for t in OPTIONAL_TABLES:
        tables[t] = _read_csv(root / f"{t}.csv") if (root / f"{t}.csv").is_file() else _empty()
    stats_json = root / "stats.json"
    settings = json.loads(stats_json.read_text(encoding="utf-8")) if stats_json.is_file() else {}
    return Results(path=root, rows=_rows(root), settings=settings, **tables)


def run(config: RunConfig | str | Path, out: str | Path | None = None) -> Results:
    """Run a config end to end (generate, train the classifier if asked, score, report), resuming
    whatever `out` already holds, and return its results. `config`: a `RunConfig`, a YAML file or
    a preset name; `out`: the run directory (default runs/<config name>)."""
    from charshift import config as cfgmod
    from charshift.pipeline import run_all

    if isinstance(config, cfgmod.RunConfig):
        cfg = config
    elif Path(config).is_file():
        cfg = cfgmod.load_config(Path(config))
    elif str(config) in cfgmod.preset_names():
        cfg = cfgmod.load_preset(str(config))
    else:
        raise cfgmod.ConfigError(
            f"{config}: neither a config file nor a preset ({', '.join(cfgmod.preset_names())})"
        )
    target = Path(out) if out is not None else Path("runs") / cfg.name
    run_all(cfg, target)
    return load_results(target)


# Columns whose cells are nested (lists, dicts): stored in parquet as their JSON text, so every
# row keeps exactly what it held whatever shape its neighbours have.
NESTED_COLUMNS = (
    "messages", "email", "tool_log", "probs", "scores", "judge_scores", "judge_rationale",
)  # fmt: skip
GENERATION_COLUMNS = ("messages", "email", "tool_log")  # the generation's side of `rows`
EXPORT_FILES = ("rows.parquet", "predictions.parquet")


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v)  # None, or pandas' NaN for it


def _flat(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    for col in NESTED_COLUMNS:
        if col in out.columns:
            out[col] = [
                None if _missing(v) else json.dumps(v, ensure_ascii=False, allow_nan=False)
                for v in out[col]
            ]
    return out


def export_parquet(results: Results, out: str | Path) -> list[Path]:
    """Write `results.rows` (generations joined with predictions) as rows.parquet and the
    predictions alone (without the conversation, email and tool log) as predictions.parquet,
    each atomically, into `out`. Nested cells (`NESTED_COLUMNS`) are stored as JSON text:
    `json.loads` gives back exactly what the row held."""
    import io

    from charshift.fileio import atomic_write_bytes

    if results.rows.empty:
        raise ResultsError(f"{results.path}: no rows to export (no generations or predictions)")
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    rows = _flat(results.rows)
    frames = (rows, rows.drop(columns=[c for c in GENERATION_COLUMNS if c in rows.columns]))
    written = []
    for name, frame in zip(EXPORT_FILES, frames, strict=True):
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False, engine="pyarrow")
        written.append(atomic_write_bytes(target / name, buf.getvalue()))
    return written
