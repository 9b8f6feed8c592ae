"""What to ask: ID prompts, persona descriptions, OCT constitutions and break-character suffixes.

ID prompts come from one of three places (`IdPromptsConfig.source`):

- `bundled`: `data/id_prompts.jsonl`, written for this project, with a fixed train/eval split, so
  the tool runs with no network at all;
- `pure_dove`: PURE-DOVE first user turns (what OCT's classifiers were trained on). OCT trained on
  the first 500 conversations in file order, so those are dropped, and so is every later prompt
  whose text (whitespace and case aside) repeats one of them or an earlier one; a seeded sample of
  the rest is drawn: an honest held-out ID evaluation;
- `file`: the user's own JSONL.

Every selection is a pure function of the pool and the seed, so a run is reproducible and a larger
`n` with the same seed extends the earlier selection instead of replacing it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from charshift.config import ALL_PERSONAS, ConfigError, IdPromptsConfig
from charshift.fileio import jsonl_values, read_jsonl

SPLITS = ("train", "eval")
PROMPT_FIELDS = ("prompt", "text", "input")  # accepted names of the prompt text in a JSONL file
PURE_DOVE_ID = "LDJnr/Pure-Dove"
CONSTITUTION_SUFFIXES = (".json", ".jsonl", ".txt", ".md")


class PromptError(ConfigError):
    """A problem with prompt data (a bad file, too few prompts, an unknown persona).

    A ConfigError, because it always traces back to something the run config points at.
    """


@dataclass(frozen=True)
class IdPrompt:
    id: str
    prompt: str
    split: str = "eval"
    category: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _data_file(name: str) -> Any:
    return resources.files("charshift") / "data" / name


# --------------------------------------------------------------------------------------------
# JSONL prompt files (bundled and user-supplied)


def _parse_prompt_lines(records: Iterable[tuple[int, Any]], source: str) -> list[IdPrompt]:
    """Check JSONL prompt records ((line number, object) from the one JSONL reader, `fileio`);
    every error names `source`, the 1-based line and the field."""
    prompts: list[IdPrompt] = []
    seen: dict[str, int] = {}
    for n, rec in records:
        where = f"{source} line {n}"
        field = next((f for f in PROMPT_FIELDS if f in rec), None)
        if field is None:
            raise PromptError(f"{where}: missing field `prompt` (or `text`/`input`)")
        text = rec[field]
        if not isinstance(text, str) or not text.strip():
            raise PromptError(f"{where}: field `{field}` must be a non-empty string")
        pid = rec.get("id")
        if pid is None:
            pid = f"line{n}"
        elif isinstance(pid, bool) or not isinstance(pid, str | int) or not str(pid).strip():
            raise PromptError(f"{where}: field `id` must be a non-empty string or integer")
        pid = str(pid)
        if pid in seen:
            raise PromptError(
                f"{where}: field `id`: duplicate id {pid!r} (first on line {seen[pid]})"
            )
        seen[pid] = n
        split = rec.get("split", "eval")
        if split not in SPLITS:
            raise PromptError(
                f"{where}: field `split` must be one of {list(SPLITS)}, got {split!r}"
            )
        category = rec.get("category", "")
        if not isinstance(category, str):
            raise PromptError(f"{where}: field `category` must be a string")
        prompts.append(IdPrompt(id=pid, prompt=text, split=split, category=category))
    if not prompts:
        raise PromptError(f"{source}: no prompts found")
    return prompts


def load_prompts_file(path: str | Path) -> list[IdPrompt]:
    """Read a JSONL file of `{"id", "prompt" (or "text"/"input")[, "split", "category"]}` lines.

    A line without `id` gets `line{n}`; a line without `split` is an eval prompt.
    """
    p = Path(path)
    return _parse_prompt_lines(read_jsonl(p, "prompts file", PromptError), str(p))


@lru_cache(maxsize=1)
def _bundled_prompts() -> tuple[IdPrompt, ...]:
    text = _data_file("id_prompts.jsonl").read_text(encoding="utf-8")
    source = "bundled id_prompts.jsonl"
    return tuple(_parse_prompt_lines(jsonl_values(text.splitlines(), source, PromptError), source))


def load_bundled_prompts() -> list[IdPrompt]:
    """The project's own prompt bank: ~250 neutral first turns over 25 categories, 60/40 split."""
    return list(_bundled_prompts())


# --------------------------------------------------------------------------------------------
# Seeded selection


def _rng(seed: int, stream: int) -> np.random.Generator:
    """Independent generators for the eval (0) and train (1) draws of one seed."""
    if seed < 0:
        raise PromptError(f"id_prompts.seed: must be >= 0, got {seed}")
    return np.random.default_rng([seed, stream]) if stream else np.random.default_rng(seed)


def _take_shuffled(
    pool: Sequence[IdPrompt], n: int, seed: int, stream: int, what: str
) -> list[IdPrompt]:
    """The first n of a seeded permutation of `pool` (a larger n extends a smaller one)."""
    if n == 0:
        return []
    if n > len(pool):
        raise PromptError(f"{what}: asked for {n} prompts but only {len(pool)} are available")
    order = _rng(seed, stream).permutation(len(pool))
    return [pool[i] for i in order[:n]]


def _first_turn(row: Any) -> str | None:
    conv = row.get("conversation") if isinstance(row, dict) else None
    first = conv[0] if isinstance(conv, list) and conv else None
    text = first.get("input") if isinstance(first, dict) else None
    return text if isinstance(text, str) and text.strip() else None


def _text_key(text: str) -> str:
    """What counts as the same prompt: the text with whitespace collapsed, case folded."""
    return " ".join(text.split()).casefold()


def dove_pool(
    rows: Sequence[dict[str, Any]], exclude_first: int
) -> tuple[list[IdPrompt], dict[str, int]]:
    """PURE-DOVE rows past `exclude_first` (file order) with a usable first user turn, without
    texts that repeat an excluded conversation's first turn or an earlier pool prompt; and the
    counts of what was left out (`unusable`, `duplicate_of_excluded`, `duplicate_in_pool`)."""
    if exclude_first < 0:
        raise PromptError(f"id_prompts.exclude_first: must be >= 0, got {exclude_first}")
    excluded = {_text_key(t) for t in map(_first_turn, rows[:exclude_first]) if t}
    seen: set[str] = set()
    dropped = {"unusable": 0, "duplicate_of_excluded": 0, "duplicate_in_pool": 0}
    pool = []
    for idx in range(exclude_first, len(rows)):
        text = _first_turn(rows[idx])
        if text is None:
            dropped["unusable"] += 1
            continue
        key = _text_key(text)
        if key in excluded or key in seen:
            dropped["duplicate_of_excluded" if key in excluded else "duplicate_in_pool"] += 1
            continue
        seen.add(key)
        pool.append(IdPrompt(id=f"dove-{idx}", prompt=text, split="eval", category="pure_dove"))
    return pool, dropped


def split_from_conversations(
    rows: Sequence[dict[str, Any]],
    n_eval: int,
    n_train: int = 0,
    exclude_first: int = 500,
    seed: int = 0,
) -> tuple[list[IdPrompt], list[IdPrompt]]:
    """(train, eval) from PURE-DOVE-shaped rows (see `dove_pool`), both prefix-stable.

    One seeded permutation of the pool: eval is its first `n_eval` prompts, train its last
    `n_train` read backwards. So a larger n_eval extends a smaller one (same seed), a larger
    n_train extends a smaller one, neither depends on the other's n, and they never overlap.
    """
    pool, _ = dove_pool(rows, exclude_first)
    if n_eval + n_train > len(pool):
        raise PromptError(
            f"PURE-DOVE: asked for {n_eval} eval + {n_train} train prompts but only {len(pool)} "
            f"distinct conversations remain after excluding the first {exclude_first}"
        )
    order = [int(i) for i in _rng(seed, 0).permutation(len(pool))]
    eval_set = [pool[i] for i in order[:n_eval]]
    back = order[::-1][:n_train]
    train = [IdPrompt(pool[i].id, pool[i].prompt, "train", pool[i].category) for i in back]
    return train, eval_set


def select_from_conversations(
    rows: Sequence[dict[str, Any]], n: int, exclude_first: int = 500, seed: int = 0
) -> list[IdPrompt]:
    """n PURE-DOVE first turns, skipping the first `exclude_first` rows and repeated texts.

    Rows are dicts with `conversation: [{"input": ..., "output": ...}, ...]`. The draw is the first
    n of `numpy.random.default_rng(seed).permutation(pool)`, in that order: prefix-stable.
    """
    return split_from_conversations(rows, n, 0, exclude_first, seed)[1]


def _load_pure_dove_rows() -> list[dict[str, Any]]:
    hint = (
        "PURE-DOVE needs the Hugging Face hub (or a local datasets cache). Offline, use "
        "`id_prompts.source: bundled` in the config, or pass your own prompts with "
        "`--id-prompts FILE` (JSONL with `id` and `prompt`)."
    )
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise PromptError(f"the `datasets` package is not installed ({err}). {hint}") from None
    try:
        ds = load_dataset(PURE_DOVE_ID, split="train")
    except Exception as err:  # offline, gated, renamed: all end the same way for the user
        raise PromptError(
            f"could not load {PURE_DOVE_ID}: {type(err).__name__}: {err}. {hint}"
        ) from None
    return [dict(r) for r in ds]


def load_pure_dove(n: int, exclude_first: int = 500, seed: int = 0) -> list[IdPrompt]:
    """n held-out PURE-DOVE prompts (see select_from_conversations); needs the hub or a cache."""
    return select_from_conversations(_load_pure_dove_rows(), n, exclude_first, seed)


def select_id_prompts(cfg: IdPromptsConfig) -> tuple[list[IdPrompt], list[IdPrompt]]:
    """(train, eval) ID prompts for a run, as the config says. Deterministic for a given seed."""
    if cfg.source == "pure_dove":
        return split_from_conversations(
            _load_pure_dove_rows(), cfg.n_eval, cfg.n_train, cfg.exclude_first, cfg.seed
        )
    if cfg.source == "file":
        if not cfg.path:
            raise PromptError("id_prompts.path: required when id_prompts.source is `file`")
        prompts, what = load_prompts_file(cfg.path), f"id_prompts ({cfg.path})"
    else:
        prompts, what = load_bundled_prompts(), "id_prompts (bundled)"
    train_pool = [p for p in prompts if p.split == "train"]
    eval_pool = [p for p in prompts if p.split == "eval"]
    train = _take_shuffled(train_pool, cfg.n_train, cfg.seed, 1, f"{what} n_train")
    eval_ = _take_shuffled(eval_pool, cfg.n_eval, cfg.seed, 0, f"{what} n_eval")
    return train, eval_


# --------------------------------------------------------------------------------------------
# Break-character suffixes (OCT robustness protocol)


def _load_break_suffixes() -> tuple[str, ...]:
    data = yaml.safe_load(_data_file("break_suffixes.yaml").read_text(encoding="utf-8"))
    table = data["suffixes"]
    keys = [f"v{i}" for i in range(8)]
    if list(table) != keys or not all(isinstance(table[k], str) and table[k] for k in keys):
        raise PromptError(f"break_suffixes.yaml: expected non-empty strings under {keys}")
    return tuple(table[k] for k in keys)


BREAK_SUFFIXES: tuple[str, ...] = _load_break_suffixes()


def break_prompt(prompt: str, k: int) -> str:
    """The prompt with break-character suffix v{k} appended after a newline, as OCT does."""
    if not 0 <= k < len(BREAK_SUFFIXES):
        raise PromptError(f"break suffix index must be 0..{len(BREAK_SUFFIXES) - 1}, got {k}")
    return f"{prompt}\n{BREAK_SUFFIXES[k]}"


# --------------------------------------------------------------------------------------------
# Persona descriptions and constitutions


@lru_cache(maxsize=1)
def _persona_table() -> tuple[tuple[str, str, str], ...]:
    data = yaml.safe_load(_data_file("personas.yaml").read_text(encoding="utf-8"))
    table = data["personas"]
    if list(table) != list(ALL_PERSONAS):
        raise PromptError(
            f"personas.yaml: personas must be {list(ALL_PERSONAS)}, got {list(table)}"
        )
    rows = []
    for name in ALL_PERSONAS:
        entry = table[name]
        text, summary = entry.get("system_prompt"), entry.get("summary")
        if not (isinstance(text, str) and text.strip() and isinstance(summary, str)):
            raise PromptError(f"personas.yaml: {name}: needs `system_prompt` and `summary`")
        rows.append((name, text.strip(), summary.strip()))
    return tuple(rows)


def load_persona_prompts() -> dict[str, str]:
    """persona -> the bundled system prompt (the `prompted` stage), in OCT label order."""
    return {name: text for name, text, _ in _persona_table()}


def load_persona_summaries() -> dict[str, str]:
    """persona -> a one-line description (for reports), in OCT label order."""
    return {name: summary for name, _, summary in _persona_table()}


def _check_persona(persona: str) -> None:
    if persona not in ALL_PERSONAS:
        raise PromptError(f"unknown persona {persona!r}; known: {list(ALL_PERSONAS)}")


def _traits_from_json(data: Any, where: str) -> list[str]:
    """Trait strings from a list of `{"trait": ...}` objects or of plain strings."""
    if not isinstance(data, list):
        raise PromptError(f"{where}: expected a list of traits, got {type(data).__name__}")
    traits = []
    for i, item in enumerate(data):
        trait = item.get("trait") if isinstance(item, dict) else item
        if not isinstance(trait, str):
            raise PromptError(f"{where}: item {i}: expected a string or an object with `trait`")
        if trait.strip() and trait.strip() not in traits:
            traits.append(trait.strip())
    return traits


def _read_jsonl(path: Path) -> list[Any]:
    return [v for _, v in read_jsonl(path, "constitution", PromptError, objects=False)]


# The format-explicit sentence of the `prompted_explicit` stage (never the default): it tells the
# model to keep the voice in every form of writing, so persistence there is an instruction being
# followed, not a property being measured.
EXPLICIT_FORMAT_SENTENCE = (
    "Keep this voice in everything you write, whatever its form: chat replies, documents and "
    "emails you write for someone else included."
)


def constitution_to_system_prompt(traits: Sequence[str] | str) -> str:
    """A system prompt from a list of first-person traits (or free text describing them): the
    persona description only, with no word on formats."""
    body = (
        traits
        if isinstance(traits, str)
        else "\n".join(f"{i}. {t}" for i, t in enumerate(traits, 1))
    )
    return (
        "The following traits describe you:\n"
        f"{body.strip()}\n"
        "Never name, list or comment on them to the person you are talking to."
    )


def load_constitution(folder: str | Path, persona: str) -> str:
    """The system prompt made from `{folder}/{persona}.json|.jsonl|.txt|.md` (first that exists).

    OCT keeps constitutions as `few-shot/{persona}.jsonl` (one `{"trait", ...}` object a line) and
    `hand-written/{persona}.txt` (a JSON list of such objects despite the suffix); both work, and
    a .txt/.md that is not JSON is used as free text.
    """
    _check_persona(persona)
    base = Path(folder)
    candidates = [base / f"{persona}{suf}" for suf in CONSTITUTION_SUFFIXES]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        looked = ", ".join(str(c) for c in candidates)
        raise PromptError(f"no constitution for {persona!r}: looked for {looked}")
    if path.suffix == ".jsonl":
        traits: list[str] | str = _traits_from_json(_read_jsonl(path), str(path))
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise PromptError(f"{path}: not valid JSON ({err.msg})") from None
        traits = _traits_from_json(data, str(path))
    else:
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        traits = _traits_from_json(data, str(path)) if isinstance(data, list) else text
    if not (traits.strip() if isinstance(traits, str) else traits):
        raise PromptError(f"{path}: constitution is empty")
    return constitution_to_system_prompt(traits)


def load_constitutions(folder: str | Path, personas: Iterable[str] | None = None) -> dict[str, str]:
    """persona -> system prompt from a folder of OCT-style constitutions.

    With `personas`, each must have a file (else an error naming the files looked for); without,
    every known persona that has a file is loaded, and a folder with none is an error.
    """
    base = Path(folder)
    if not base.is_dir():
        raise PromptError(f"constitutions folder not found: {base}")
    if personas is not None:
        return {p: load_constitution(base, p) for p in personas}
    found = {
        p: load_constitution(base, p)
        for p in ALL_PERSONAS
        if any((base / f"{p}{suf}").is_file() for suf in CONSTITUTION_SUFFIXES)
    }
    if not found:
        raise PromptError(
            f"no constitutions in {base}: expected files like sarcasm.jsonl or sarcasm.txt"
        )
    return found


def persona_system_prompt(
    persona: str, source: str = "bundled", path: str | None = None, explicit: bool = False
) -> str:
    """The `prompted` stage's system prompt: the bundled description or an OCT constitution,
    describing the persona only. `explicit` (the `prompted_explicit` stage) appends
    EXPLICIT_FORMAT_SENTENCE."""
    _check_persona(persona)
    tail = f"\n{EXPLICIT_FORMAT_SENTENCE}" if explicit else ""
    if source == "bundled":
        return load_persona_prompts()[persona] + tail
    if source == "constitutions":
        if not path:
            raise PromptError(
                "persona_prompts.path: required when persona_prompts.source is `constitutions`"
            )
        return load_constitution(path, persona) + tail
    raise PromptError(
        f"persona_prompts.source: must be `bundled` or `constitutions`, got {source!r}"
    )
