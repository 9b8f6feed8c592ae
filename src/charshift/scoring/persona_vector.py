"""The `persona_vector` scorer: is the persona in the model's residual stream? Two readings.

Directions (`pv_fit`): per persona, the mean activation over response tokens of the persona
stage's ID training rows minus the base stage's, at the layer that separates held-out prompts
best; fitted once per base by `ensure_vectors` (the pipeline's training step) and kept in the
run at `persona_vectors/<base>.json` with their provenance (model, layer, the training rows'
hash, every layer's held-out separation).

Readings, each a scorer of its own that gives every persona's projection as `scores` and the
persona it projects highest on as its label (identify-style):

- `persona_vector_text`: the scored text, teacher-forced through the base model (no adapter, no
  persona prompt) as the reply to its row's first user turn: a text scorer comparable to the
  classifier, blind to the condition that wrote the text.
- `persona_vector_state`: the generating model (the row's adapter on, where its stage has one)
  in the row's own context (system prompt, earlier turns, tool results), over the tokens it
  wrote in its final turn (the scored unit's part of it, where the unit's text is found in the
  turn verbatim or JSON-escaped): is the persona represented while it writes this? Its figure
  for a persona row is the projection on the row's own persona (`scores[persona]`).

Both read activations with the HF backend (`HFBackend.hidden_states`), loaded once per base and
shared by the two readings; the persona vectors' model must be a model the HF backend can load
(the base's `model`), whatever backend generated the rows.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from charshift.config import BackendConfig, BaseSpec, RunConfig
from charshift.schema import BASE_STAGE, GenerationRow, Message, stable_hash
from charshift.scoring import pv_fit
from charshift.scoring.activations import Read, ReadStats, response_means
from charshift.scoring.base import (
    Prediction,
    Progress,
    ScoreInput,
    ScorerContext,
    ScorerError,
    Verdict,
)
from charshift.scoring.settings import PersonaVectorSettings

VECTOR_DIR = "persona_vectors"
READINGS = ("text", "state")


def vectors_path(run_dir: Path, base: str) -> Path:
    return Path(run_dir) / VECTOR_DIR / f"{base}.json"


class PVModel:
    """The base model for reading activations, loaded on first use, with the base's adapters
    (for the state reading) loaded when a row needs one; shared by both readings."""

    def __init__(self, cfg: RunConfig, base: BaseSpec, cache_dir: Path | None) -> None:
        self.cfg, self.base, self.cache_dir = cfg, base, cache_dir
        self.settings: PersonaVectorSettings = cfg.persona_vector_settings
        self._backend: Any = None
        self._tokenizer: Any = None
        self._adapters: dict[tuple[str, str | None], str] | None = None
        self.stats = ReadStats()

    def _device_dtype(self) -> tuple[str, str]:
        b: BackendConfig = self.cfg.backend
        hf = b.kind == "hf"
        device = self.settings.device or (b.device if hf else "auto")
        return device, self.settings.dtype or (b.dtype if hf else "auto")

    @property
    def backend(self) -> Any:
        if self._backend is None:
            from charshift.backends.hf import HFBackend

            device, dtype = self._device_dtype()
            self._backend = HFBackend(
                self.base.model,
                revision=self.base.revision,
                device=device,
                dtype=dtype,
                batch_size=self.settings.batch_size,
                cache_dir=self.cache_dir,
                kv_cache_mb=0,
            )
        return self._backend

    @property
    def tokenizer(self) -> Any:
        """The base model's tokenizer (without loading the model, where it is not loaded)."""
        if self._backend is not None:
            return self._backend.tokenizer
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from charshift.models import resolve_model

            res = resolve_model(self.base.model, self.cache_dir, revision=self.base.revision)
            self._tokenizer = AutoTokenizer.from_pretrained(res.path, **res.load_kwargs)
        return self._tokenizer

    def adapter_of(self, row: GenerationRow | None) -> str | None:
        """The adapter the row was generated under (loaded on first need); None for none."""
        if row is None or row.stage == BASE_STAGE:
            return None
        if self._adapters is None:
            self._adapters = self._load_adapters()
        return self._adapters.get((row.stage, row.persona))

    def _load_adapters(self) -> dict[tuple[str, str | None], str]:
        from charshift.backends.build import materialise_tiny_adapters
        from charshift.planning import build_conditions

        conds, sources = build_conditions(self.cfg, self.base)
        if sources:
            failed = self.backend.load_adapters(
                materialise_tiny_adapters(self.base, list(sources.values()))
            )
            if failed:
                raise ScorerError(f"persona_vector: adapters that do not load: {failed}")
        return {(c.stage, c.persona): c.adapter for c in conds if c.adapter}

    def means(self, reads: list[Read], layers: Sequence[int], desc: str) -> np.ndarray:
        from charshift.scoring.tokens import ProgressBar

        bar = ProgressBar(True, len(reads), desc)
        try:
            return response_means(
                self.backend, reads, layers, self.settings.batch_size, self.stats, bar
            )
        finally:
            bar.close()

    def n_layers(self) -> int:
        return int(self.backend.model.config.get_text_config().num_hidden_layers)

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None


# -- reads ---------------------------------------------------------------------------------------


def _last_assistant(row: GenerationRow) -> int | None:
    return max(
        (i for i, m in enumerate(row.messages) if m.get("role") == "assistant"), default=None
    )


def text_read(row: GenerationRow | None, text: str) -> Read:
    """The text as the base model's reply to its row's first user turn (no system prompt)."""
    first = (
        None if row is None else next((m for m in row.messages if m.get("role") == "user"), None)
    )
    context: list[Message] = (
        [] if first is None else [{"role": "user", "content": str(first.get("content") or "")}]
    )
    return Read(context, text)


def _span(turn: str, text: str) -> tuple[int, int] | None:
    """Where `text` is written in `turn`: verbatim, or JSON-escaped (a tool call's body)."""
    for form in (text, json.dumps(text, ensure_ascii=False)[1:-1]):
        at = turn.find(form) if form else -1
        if at >= 0:
            return at, at + len(form)
    return None


def state_read(row: GenerationRow, text: str, adapter: str | None) -> Read:
    """The row's final turn in its own context under its adapter, over `text`'s part of it."""
    last = _last_assistant(row)
    if last is None:  # no turn of its own: read the text as the reply to the row's context
        return Read([m for m in row.messages if m.get("role") != "assistant"], text, adapter)
    turn = str(row.messages[last].get("content") or "")
    return Read(list(row.messages[:last]), turn, adapter, _span(turn, text))


# -- fitting -------------------------------------------------------------------------------------


def pv_training_rows(
    cfg: RunConfig, generations: Sequence[GenerationRow], base: str
) -> list[GenerationRow]:
    """The ID training replies of `base` the directions are fitted on: the base stage's and
    `persona_vector.stage`'s, in key order."""
    stages = (BASE_STAGE, cfg.persona_vector_settings.stage)
    rows = [
        r
        for r in generations
        if r.base == base
        and r.slice == "id_chat"
        and r.split == "train"
        and r.stage in stages
        and r.outcome == "reply"
        and r.text
    ]
    return sorted(rows, key=lambda r: r.key)


def _check_rows(rows: Sequence[GenerationRow], personas: Sequence[str], where: str) -> None:
    have = {r.persona for r in rows}
    missing = [p for p in [None, *personas] if p not in have]
    if missing:
        names = [p or f"the {BASE_STAGE} stage" for p in missing]
        raise ScorerError(
            f"persona_vector: no ID training replies of {names} in the {where} prompts; "
            "generate more training prompts (id_prompts.n_train) or check the outcomes"
        )


def _layers(model: PVModel) -> list[int]:
    n = model.n_layers()
    layers = model.settings.layers or list(range(1, n + 1))
    if max(layers) > n:
        raise ScorerError(f"persona_vector.layers: {max(layers)} > the model's {n} layers")
    return layers


def fit_vectors(
    model: PVModel, rows: Sequence[GenerationRow], personas: Sequence[str]
) -> pv_fit.VectorSet:
    """Directions from the fit prompts' rows, the layer from the held-out prompts' (see pv_fit)."""
    from charshift.scoring.heldout import split_rows

    s = model.settings
    split = split_rows([r.item_id for r in rows], s.heldout_fraction, s.seed)
    fit, held = [rows[i] for i in split.train_idx], [rows[i] for i in split.heldout_idx]
    _check_rows(fit, personas, "fit")
    _check_rows(held, personas, "held-out")
    layers = _layers(model)
    no_adapter = None  # the persona and base stages run the bare base model
    fit_acts = model.means([state_read(r, r.text or "", no_adapter) for r in fit], layers, "fit")
    dirs, base_mean = pv_fit.mean_directions(fit_acts, [r.persona for r in fit], personas)
    labels = [r.persona for r in held]
    sep = {
        reading: pv_fit.separation(
            model.means(reads, layers, f"held out ({reading})"), labels, personas, dirs, base_mean
        )
        for reading, reads in (
            ("text", [text_read(r, r.text or "") for r in held]),
            ("state", [state_read(r, r.text or "", no_adapter) for r in held]),
        )
    }
    layer = pv_fit.choose_layer(layers, sep["text"])
    li = layers.index(layer)
    return pv_fit.VectorSet(
        base=model.base.name,
        model=model.base.model,
        layer=layer,
        personas=list(personas),
        directions={p: dirs[k, li].tolist() for k, p in enumerate(personas)},
        base_mean=base_mean[li].tolist(),
        separation={
            str(lay): {k: _finite(v[i]) for k, v in sep.items()} for i, lay in enumerate(layers)
        },
        rows=_row_counts(fit, held),
        provenance=_provenance(model, rows, split.heldout_groups),
    )


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def _row_counts(fit: Sequence[GenerationRow], held: Sequence[GenerationRow]) -> dict[str, Any]:
    def count(rows: Sequence[GenerationRow]) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in rows:
            out[r.persona or BASE_STAGE] = out.get(r.persona or BASE_STAGE, 0) + 1
        return out

    return {"fit": count(fit), "heldout": count(held)}


def _provenance(
    model: PVModel, rows: Sequence[GenerationRow], held_items: Sequence[str]
) -> dict[str, Any]:
    info = model.backend.info()
    return {
        "model": info.model,
        "model_revision": info.model_revision,
        "model_provenance": info.extra.get("provenance"),
        "device": info.extra.get("device"),
        "dtype": info.extra.get("dtype"),
        "versions": info.extra.get("versions"),
        "train_rows": rows_digest(rows),
        "heldout_items": list(held_items),
        "settings": model.settings.model_dump(mode="json"),
        "reads_cut_to_context": model.stats.cut,
    }


def rows_digest(rows: Sequence[GenerationRow]) -> str:
    """A hash of the training rows' keys and texts: new or changed rows mean a new fit."""
    return stable_hash(sorted((r.key, stable_hash(r.text or "")) for r in rows), 16)


def ensure_vectors(cfg: RunConfig, store: Any, base: BaseSpec, cache_dir: Path | None) -> bool:
    """Fit `base`'s persona vectors into the run unless the file there was fitted on the same
    rows with the same settings. Returns whether it fitted."""
    path = vectors_path(store.root, base.name)
    rows = pv_training_rows(cfg, list(store.generations), base.name)
    if not rows:
        raise ScorerError(
            f"persona_vector: no ID training replies for base {base.name} yet: run `generate` first"
        )
    settings = cfg.persona_vector_settings.model_dump(mode="json")
    if path.is_file():
        try:
            old = pv_fit.load_vectors(path).provenance
        except (ValueError, TypeError, KeyError) as err:
            store.warn(f"{path}: unreadable ({err}); fitting the persona vectors again")
            old = {}
        if old.get("train_rows") == rows_digest(rows) and old.get("settings") == settings:
            return False
    model = PVModel(cfg, base, cache_dir)
    try:
        vs = fit_vectors(model, rows, cfg.persona_names)
    finally:
        model.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    pv_fit.save_vectors(vs, path)
    store.update_manifest(persona_vectors={base.name: _summary(vs, path, store.root)})
    return True


def _summary(vs: pv_fit.VectorSet, path: Path, root: Path) -> dict[str, Any]:
    """What the manifest records of a fit: the file, its hash, the layer and its separation."""
    return {
        "file": str(Path(path).relative_to(root)),
        "digest": vs.digest,
        "layer": vs.layer,
        "heldout_separation": vs.separation.get(str(vs.layer)),
        "rows": vs.rows,
    }


# -- the readings --------------------------------------------------------------------------------


class PersonaVectorReading:
    """One reading of the persona vectors (`text` or `state`, see the module doc); a
    `base.VerdictScorer`."""

    def __init__(self, reading: str, vectors: pv_fit.VectorSet, model: PVModel) -> None:
        if reading not in READINGS:
            raise ScorerError(f"persona_vector: unknown reading {reading!r}")
        self.reading, self.vectors, self.model = reading, vectors, model

    @property
    def name(self) -> str:
        return f"persona_vector_{self.reading}"

    @property
    def labels(self) -> list[str]:
        return list(self.vectors.personas)

    @property
    def provenance(self) -> dict[str, Any]:
        vs = self.vectors
        return {
            "kind": "persona_vector",
            "reading": self.reading,
            "model": vs.model,
            "layer": vs.layer,
            "vectors": vs.digest,
            "heldout_separation": vs.separation.get(str(vs.layer)),
        }

    @property
    def identity(self) -> str:
        return f"{self.name}-{stable_hash(self.provenance, 12)}"

    @property
    def tokenizer(self) -> Any:
        """The base model's tokenizer: the length controls count in it."""
        return self.model.tokenizer

    def check_personas(self, personas: Sequence[str]) -> None:
        missing = [p for p in personas if p not in self.vectors.personas]
        if missing:
            raise ScorerError(
                f"persona_vector: no direction for {missing} (fitted for {self.vectors.personas});"
                " delete the run's persona_vectors folder to fit them again"
            )

    def _read(self, item: ScoreInput) -> Read:
        if self.reading == "text" or item.row is None:
            return text_read(item.row, item.text)
        return state_read(item.row, item.text, self.model.adapter_of(item.row))

    def verdicts(
        self, inputs: Sequence[str | ScoreInput], *, progress: Progress = None
    ) -> list[Verdict]:
        items = [x if isinstance(x, ScoreInput) else ScoreInput(x) for x in inputs]
        reads = [self._read(x) for x in items]
        means = self.model.means(reads, [self.vectors.layer], self.name)[:, 0]
        proj = self.vectors.project(means)
        personas = self.vectors.personas
        return [
            Verdict(
                personas[int(np.argmax(p))],
                {},
                {q: float(v) for q, v in zip(personas, p, strict=True)},
            )
            for p in proj
        ]

    def score(
        self, inputs: Sequence[str | ScoreInput], *, progress: Progress = None
    ) -> list[Prediction]:
        return [v.prediction for v in self.verdicts(inputs, progress=progress)]

    def close(self) -> None:
        self.model.close()


def open_run_persona_vectors(context: ScorerContext) -> list[PersonaVectorReading]:
    """The registry's opener: both readings of the base's fitted vectors, one shared model."""
    if context.run_dir is None:
        raise ScorerError("persona_vector: fitted in a run; there is no run directory")
    path = vectors_path(context.run_dir, context.base.name)
    if not path.is_file():
        raise ScorerError(
            f"persona_vector: the vectors of base {context.base.name} are not fitted yet "
            f"({path} is missing): run `charshift score --run {context.run_dir}` (without "
            "--shard; the fit reads every shard's training rows)"
        )
    try:
        vectors = pv_fit.load_vectors(path)
    except (ValueError, TypeError, KeyError) as err:
        raise ScorerError(f"persona_vector: {path} cannot be read ({err})") from None
    model = PVModel(context.cfg, context.base, context.cache_dir)
    return [PersonaVectorReading(r, vectors, model) for r in READINGS]
