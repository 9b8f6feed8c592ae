"""transformers + PEFT backend: one base model, many LoRA adapters, mixed-adapter batches.

Why a hand-written decode loop instead of `model.generate`: every row must sample from its own
random stream (a torch.Generator seeded from `GenRequest.seed`) with its own temperature, top_p,
repetition penalty and token budget, so that a row's text never depends on what it was batched
with. `generate` shares one global generator and one set of settings per call.

The loop: left-pad the batch, prefill once with explicit position ids taken from the attention
mask, then feed one token per row per step through the KV cache. Each step is
"logits -> per-row mask (`_mask_logits`) -> sample -> advance rows". Rows that finish are dropped
from the batch (and from the cache), and the batch ends when no row is left.

Adapters: rows of different adapters share a batch. A batch's rows are ordered by adapter and
each LoRA layer adds its adapters' deltas to contiguous row slices (`lora_batched.py`); models
whose LoRA layers it cannot handle fall back to PEFT's `adapter_names` forward.

KV reuse (`kvreuse.py`): a request with a `session` key reuses the keys and values its session
computed in its previous step (same adapter, longest common token prefix), and prefills only the
rest. A batch then mixes rows with different cached lengths: row i's reused keys/values sit
right-aligned in the cache's first P columns and its new tokens fill the last S columns, where
S is the longest new part in the batch, so every row's real tokens stay one contiguous run that
ends at the last column (a row whose new part is shorter recomputes a few cached tokens instead
of padding): masks, positions and sliding windows work exactly as for a plain left-padded batch.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from charshift.backends.base import (
    AdapterSource,
    AdapterUnavailable,
    Backend,
    BackendInfo,
    report_progress,
)
from charshift.backends.kvreuse import KVEntry, SessionKV, cache_blocker, common_prefix
from charshift.backends.lora_batched import BASE_ADAPTER, LoraRunner
from charshift.backends.settings import HFSettings as Settings
from charshift.constrain import ConstraintError, RowConstraint, row_constraint
from charshift.models import ResolvedModel, file_hash, resolve_model
from charshift.schema import GenRequest, GenResult

if TYPE_CHECKING:
    from charshift.backends.registry import BackendContext

log = logging.getLogger(__name__)

# Default byte budget of the per-session KV store (backend.kv_cache_mb).
DEFAULT_KV_CACHE_MB = 1024
LORA_IMPLS = ("grouped", "peft")
# End-of-turn tokens of common chat templates, used as extra stop tokens when present.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|endoftext|>")
# A module path that belongs to an image encoder or its projector, not to the language model.
_VISION_RE = re.compile(
    r"(^|\.)(vision_tower|vision_model|visual|multi_modal_projector|vision)(\.|$)"
)
_LAYER_RE = re.compile(r"(^|\.)(layers?|h|blocks?)\.\d+\.")


# --------------------------------------------------------------------------------------------
# device, dtype, model loading
# --------------------------------------------------------------------------------------------


def pick_device(device: str = "auto") -> torch.device:
    """The torch device: "auto" = cuda when available, else cpu; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16, from /proc/cpuinfo's
    flags). Without it torch emulates bfloat16, several times slower than float32 (6x measured on
    an AVX2-only EPYC), so "auto" picks float32 there."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    flags = {w for line in cpuinfo.splitlines() if line.startswith("flags") for w in line.split()}
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The torch dtype: "auto" = bfloat16 on cuda (float16 without bf16); on cpu, bfloat16 where
    the CPU has native bf16 (`cpu_has_native_bf16`), else float32."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, {', '.join(names)}")
    return names[dtype]


def load_causal_lm(
    resolved: ResolvedModel, device: torch.device, dtype: torch.dtype
) -> torch.nn.Module:
    """Load a causal LM; multimodal chat checkpoints (Gemma3ForConditionalGeneration) included.

    AutoModelForCausalLM maps gemma3 configs to the multimodal class in current transformers;
    older releases or other multimodal families only register under AutoModelForImageTextToText,
    which is tried second.
    """
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(resolved.load_kwargs, dtype=dtype)
    if device.type == "cuda":
        kwargs["device_map"] = str(device)  # load straight onto the GPU
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved.path, **kwargs)
    except ValueError as err:
        if "Unrecognized configuration class" not in str(err):
            raise
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(resolved.path, **kwargs)
    if device.type != "cuda":
        model.to(device)
    model.eval()
    return model


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


# --------------------------------------------------------------------------------------------
# adapters
# --------------------------------------------------------------------------------------------


@dataclass
class _AdapterPlan:
    """A checked adapter, ready to inject: config and weights renamed to this model's modules."""

    config: Any
    weights: dict[str, torch.Tensor]
    provenance: dict[str, Any] = field(default_factory=dict)


def _hub_message(err: Exception, src: AdapterSource) -> str:
    where = f"{src.repo}" + (f" (subfolder {src.subfolder!r})" if src.subfolder else "")
    kind = type(err).__name__
    if kind == "GatedRepoError":
        return (
            f"adapter repo {where} is gated: accept its terms on https://huggingface.co/{src.repo} "
            f"and log in (HF_TOKEN) to use it"
        )
    if kind == "RepositoryNotFoundError":
        return f"adapter repo {src.repo} not found (or private and no token given)"
    if kind == "RevisionNotFoundError":
        return f"adapter repo {src.repo} has no revision {src.revision!r}"
    if any(s in kind for s in ("LocalEntryNotFound", "Offline", "Connect", "Timeout")):
        return f"could not fetch adapter {where} from the hub (offline or unreachable): {err}"
    return f"could not fetch adapter {where}: {kind}: {err}"


def fetch_adapter(src: AdapterSource) -> tuple[Path, dict[str, Any]]:
    """The local folder of an adapter (downloading only its subfolder from the hub if needed).

    Raises AdapterUnavailable with a message a person can act on: missing folder, missing
    subfolder in a repo (the -personas repos lack `misalignment`), gated or unknown repo, offline.
    """
    if src.path:
        base = Path(src.path).expanduser()
        candidates = [base / src.subfolder, base] if src.subfolder else [base]
        for folder in candidates:
            if (folder / "adapter_config.json").is_file():
                return folder, {"source": "local", "path": str(folder.resolve())}
        if not base.exists():
            raise AdapterUnavailable(f"adapter folder {base} does not exist")
        raise AdapterUnavailable(
            f"no adapter_config.json in {' or '.join(str(c) for c in candidates)}"
        )
    if not src.repo:
        raise AdapterUnavailable(f"adapter {src.name!r} has neither a path nor a repo")
    try:
        from huggingface_hub import snapshot_download

        patterns = [f"{src.subfolder.strip('/')}/*"] if src.subfolder else None
        root = Path(snapshot_download(src.repo, revision=src.revision, allow_patterns=patterns))
    except Exception as err:  # noqa: BLE001 - every hub failure becomes a skipped cell
        raise AdapterUnavailable(_hub_message(err, src)) from err
    folder = root / src.subfolder if src.subfolder else root
    if not (folder / "adapter_config.json").is_file():
        raise AdapterUnavailable(
            f"adapter repo {src.repo} has no adapter at {src.subfolder or '(root)'!r}"
            f" (revision {src.revision or 'main'})"
        )
    prov = {
        "source": "hub",
        "repo": src.repo,
        "subfolder": src.subfolder,
        "revision": src.revision,
        "commit": root.name,  # snapshot folders are named by commit hash
    }
    return folder, prov


def _module_key(name: str) -> tuple[bool, str]:
    """A layout-independent key for a module path: (is vision, path from the layer index on).

    `model.language_model.layers.3.self_attn.q_proj` (transformers >= 4.52 Gemma3),
    `language_model.model.layers.3.self_attn.q_proj` (older) and `model.layers.3.self_attn.q_proj`
    (text-only class) all become (False, "layers.3.self_attn.q_proj").
    """
    vision = bool(_VISION_RE.search(name))
    m = _LAYER_RE.search(name)
    tail = name[m.start() + len(m.group(1)) :] if m else name.rsplit(".", 1)[-1]
    return vision, tail


class _ModuleIndex:
    """The base model's LoRA-targetable modules (Linear, Embedding), by path and by layout key."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.shapes: dict[str, tuple[int, int]] = {}
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear):
                self.shapes[name] = (mod.in_features, mod.out_features)
            elif isinstance(mod, torch.nn.Embedding):
                self.shapes[name] = (mod.num_embeddings, mod.embedding_dim)
        by_key: dict[tuple[bool, str], list[str]] = {}
        for name in self.shapes:
            by_key.setdefault(_module_key(name), []).append(name)
        self.by_key = {k: v[0] for k, v in by_key.items() if len(v) == 1}

    def locate(self, adapter_module: str) -> str | None:
        if adapter_module in self.shapes:
            return adapter_module
        return self.by_key.get(_module_key(adapter_module))


_LORA_PARAM_RE = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<param>lora_[A-Za-z_]+)(?P<rest>(\.weight|\.bias)?)$"
)


def plan_adapter(folder: Path, index: _ModuleIndex) -> _AdapterPlan:
    """Read an adapter and fit it to the base model without touching the model.

    Weight names are matched to this model's modules layout-independently (see `_module_key`),
    so adapters saved from another transformers version's Gemma3 layout still land on the right
    layers. LoRA on the vision tower is dropped: text-only generation never runs it (vLLM does
    the same). Shapes are checked here, so an adapter for another base fails with a clear message
    before any module is injected.
    """
    from peft import LoraConfig, PeftConfig
    from peft.utils import load_peft_weights

    try:
        cfg = PeftConfig.from_pretrained(str(folder))
    except Exception as err:  # noqa: BLE001
        raise AdapterUnavailable(f"unreadable adapter_config.json in {folder}: {err}") from err
    if not isinstance(cfg, LoraConfig):
        raise AdapterUnavailable(f"{folder} is a {cfg.peft_type} adapter; only LoRA is supported")
    try:
        raw = load_peft_weights(str(folder), device="cpu")
    except Exception as err:  # noqa: BLE001
        raise AdapterUnavailable(f"cannot read adapter weights in {folder}: {err}") from err

    weights: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    dropped_vision, unmatched, remapped = 0, [], 0
    for key, tensor in raw.items():
        m = _LORA_PARAM_RE.match(key)
        if not m:
            raise AdapterUnavailable(
                f"adapter {folder} carries non-LoRA weights ({key}); only plain LoRA is supported"
            )
        module, param = m.group("module"), m.group("param")
        if _VISION_RE.search(module):
            dropped_vision += 1
            continue
        target = index.locate(module)
        if target is None:
            unmatched.append(module)
            continue
        remapped += target != module
        in_f, out_f = index.shapes[target]
        if param in ("lora_A", "lora_embedding_A") and tensor.dim() == 2:
            ok = tensor.shape[1] == in_f
            ranks[target] = tensor.shape[0]
        elif param in ("lora_B", "lora_embedding_B") and tensor.dim() == 2:
            ok = tensor.shape[0] == out_f
        else:
            ok = True
        if not ok:
            raise AdapterUnavailable(
                f"adapter {folder} does not fit this base model: {module}.{param} has shape "
                f"{tuple(tensor.shape)}, the model's {target} is {in_f}->{out_f}"
            )
        weights[f"base_model.model.{target}.{param}{m.group('rest')}"] = tensor
    if unmatched:
        sample = ", ".join(sorted(set(unmatched))[:3])
        raise AdapterUnavailable(
            f"adapter {folder} targets modules this base model lacks (e.g. {sample}); "
            f"is it for another base model?"
        )
    if not weights:
        raise AdapterUnavailable(f"adapter {folder} has no LoRA weights for the language model")

    # Inject exactly the modules the weights cover: the saved target_modules may be a regex
    # written against another module layout, and injecting a module without weights would add
    # untrained LoRA to it.
    cfg.target_modules = sorted(ranks)
    cfg.exclude_modules = None
    cfg.layers_to_transform = None
    cfg.layers_pattern = None
    cfg.inference_mode = True
    cfg.rank_pattern = {re.escape(t): r for t, r in ranks.items() if r != cfg.r}
    prov = {
        "sha256": file_hash(folder),
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "base_model_name_or_path": cfg.base_model_name_or_path,
        "n_modules": len(ranks),
        "dropped_vision_tensors": dropped_vision,
        "renamed_tensors": remapped,
    }
    return _AdapterPlan(cfg, weights, prov)


# --------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------


@dataclass
class _Row:
    """One request in flight."""

    index: int  # position in the caller's request list
    prompt: list[int]
    adapter: str
    temperature: float
    top_p: float
    repetition_penalty: float
    max_new: int
    generator: torch.Generator
    session: str | None = None  # GenRequest.session: whose stored keys/values may be reused
    out: list[int] = field(default_factory=list)
    finish: str | None = None  # "stop", "length", or "error" (then `error` says why)
    error: str | None = None
    constraint: RowConstraint | None = None  # grammar of `GenRequest.json_schema`, if any
    reuse: KVEntry | None = None  # the session's entry, taken from the store for this batch
    reuse_len: int = 0  # prompt tokens it covers (the common token prefix, < len(prompt))


def _uniforms(rows: list[_Row]) -> torch.Tensor:
    """[rows, longest budget]: row i's uniforms for its steps, drawn up front from its own
    generator (one call per row per batch instead of one per row per step); greedy rows draw
    nothing."""
    width = max(r.max_new for r in rows)
    out = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, r in enumerate(rows):
        if r.temperature > 0:
            out[i, : r.max_new] = torch.rand(r.max_new, generator=r.generator)
    return out


@dataclass
class _Batch:
    """Per-row state of one batch in flight; every tensor's first dimension follows `active`."""

    active: list[_Row]
    mask: torch.Tensor  # [rows, width + longest budget]: 1 where a row has a real token
    width: int  # columns of the cache so far
    starts: list[int]  # each row's first real column (where its keys/values start)
    next_pos: torch.Tensor  # [rows, 1]: the position of the token fed next
    temp: torch.Tensor
    top_p: torch.Tensor
    penalty: torch.Tensor
    uniforms: torch.Tensor  # [rows, longest budget]
    seen: torch.Tensor | None  # [rows, vocab] tokens in prompt and output; None: no penalties
    sampling: bool  # whether any row samples (all greedy: argmax only)
    step: int = 0

    @classmethod
    def start(cls, backend: HFBackend, rows: list[_Row], width: int) -> _Batch:
        dev = backend.device
        budget = max(r.max_new for r in rows)
        mask = torch.ones((len(rows), width + budget), dtype=torch.long)
        starts = [width - len(r.prompt) for r in rows]
        for i, s in enumerate(starts):
            mask[i, :s] = 0
        seen = None
        if any(r.repetition_penalty != 1.0 for r in rows):
            n_logits = backend._peek_vocab()
            seen = torch.zeros((len(rows), n_logits), dtype=torch.bool)
            for i, r in enumerate(rows):
                if r.repetition_penalty != 1.0:
                    ids = torch.tensor([t for t in r.prompt if t < n_logits], dtype=torch.long)
                    seen[i, ids] = True
            seen = seen.to(dev)

        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=dev)

        return cls(
            active=list(rows),
            mask=mask.to(dev),
            width=width,
            starts=starts,
            next_pos=torch.tensor([[len(r.prompt)] for r in rows], device=dev),
            temp=column([r.temperature for r in rows]),
            top_p=column([r.top_p for r in rows]),
            penalty=column([r.repetition_penalty for r in rows]),
            uniforms=_uniforms(rows).to(dev),
            seen=seen,
            sampling=any(r.temperature > 0 for r in rows),
        )

    def select(self, keep: list[int], sel: torch.Tensor) -> None:
        """Keep only the rows at `keep` (`sel`: the same indices as a tensor on the device)."""
        self.active = [self.active[i] for i in keep]
        self.starts = [self.starts[i] for i in keep]
        self.mask, self.next_pos, self.uniforms = (
            self.mask[sel],
            self.next_pos[sel],
            self.uniforms[sel],
        )
        self.temp, self.top_p, self.penalty = self.temp[sel], self.top_p[sel], self.penalty[sel]
        if self.seen is not None:
            self.seen = self.seen[sel]
        self.sampling = any(r.temperature > 0 for r in self.active)

    def advance(self) -> None:
        """One token was fed to every row."""
        self.width += 1
        self.next_pos = self.next_pos + 1
        self.step += 1


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """HF-style repetition penalty: seen tokens' logits divided (if > 0) or multiplied by it.

    `seen` marks tokens in each row's own prompt and output (never padding); a penalty of 1.0
    leaves a row bit-for-bit unchanged.
    """
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def nonfinite_rows(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """[rows] bool: rows whose next-token distribution is undefined. A row's logits, divided by
    its temperature where it samples, hold a NaN or +inf, or every token is -inf: a model whose
    weights went non-finite, or a temperature or repetition penalty (see `penalize`) that scales
    logits past float32's range. Such a row cannot be sampled; it is ended, the others go on."""
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    scaled = logits / t[:, None]
    return (
        torch.isnan(scaled).any(-1)
        | torch.isposinf(scaled).any(-1)
        | torch.isneginf(scaled).all(-1)
    )


# Nucleus sampling first looks at this many most likely tokens; only rows whose nucleus is wider
# pay for a sort of the whole vocabulary (a large share of a step's time on CPU).
NUCLEUS_WINDOW = 256


def _pick_in_sorted(
    sorted_p: torch.Tensor, order: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor
) -> torch.Tensor:
    """Inverse-CDF pick from probabilities sorted in descending order (or a prefix of them)."""
    cum = sorted_p.cumsum(dim=-1)
    # keep the smallest prefix whose mass reaches top_p (always at least one token)
    keep = (cum - sorted_p) < top_p[:, None]
    kept_cum = torch.where(keep, sorted_p, torch.zeros_like(sorted_p)).cumsum(dim=-1)
    target = uniforms * kept_cum[:, -1]
    pos = torch.searchsorted(kept_cum, target[:, None].contiguous(), right=True)
    # a position past the nucleus can only come from rounding at the very top: step back into it
    pos = torch.minimum(pos, keep.sum(dim=-1, keepdim=True) - 1)
    return order.gather(-1, pos).squeeze(-1)


def sample_next(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    uniforms: torch.Tensor,
    any_sampling: bool | None = None,
) -> torch.Tensor:
    """Pick one token per row: argmax where temperature is 0, else nucleus sampling.

    Sampling is by inverse CDF over the probability-sorted nucleus with one uniform per row,
    drawn from the row's own generator, so the choice depends only on that row's logits and seed.
    Whether a row takes the top-k shortcut also depends only on that row. `any_sampling`, when
    the caller knows it, saves a device-to-host sync per step for all-greedy batches.
    """
    greedy = logits.argmax(dim=-1)
    if any_sampling is False:
        return greedy
    sampling = temperature > 0
    if any_sampling is None and not bool(sampling.any()):
        return greedy
    t = torch.where(sampling, temperature, torch.ones_like(temperature))
    probs = torch.softmax(logits / t[:, None], dim=-1)
    window = min(NUCLEUS_WINDOW, probs.shape[-1])
    top_vals, top_idx = probs.topk(window, dim=-1, sorted=True)
    # the nucleus lies inside the window when the window's mass already reaches top_p
    covered = top_vals.cumsum(dim=-1)[:, -1] >= top_p
    picked = torch.where(covered, _pick_in_sorted(top_vals, top_idx, top_p, uniforms), greedy)
    wide = (sampling & ~covered).nonzero().squeeze(-1)
    if wide.numel():
        sorted_p, order = torch.sort(probs[wide], dim=-1, descending=True, stable=True)
        picked[wide] = _pick_in_sorted(sorted_p, order, top_p[wide], uniforms[wide])
    return torch.where(sampling, picked, greedy)


ProgressLike = Callable[[int], Any] | Any


# --------------------------------------------------------------------------------------------
# the backend
# --------------------------------------------------------------------------------------------


class HFBackend(Backend):
    """Generate with transformers + PEFT on one device; see the module docstring."""

    kind = "hf"

    def __init__(
        self,
        model: str,
        *,
        revision: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 16,
        cache_dir: Path | None = None,
        max_batch_tokens: int = 16384,
        kv_cache_mb: float = DEFAULT_KV_CACHE_MB,
        lora_impl: str = "grouped",
    ) -> None:
        """`kv_cache_mb`: byte budget of the per-session KV store (0 turns reuse off).
        `lora_impl`: "grouped" (rows grouped by adapter, see lora_batched.py) or "peft"
        (PEFT's own `adapter_names` forward; kept for comparison and as the fallback)."""
        from transformers import AutoTokenizer

        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if kv_cache_mb < 0:
            raise ValueError("kv_cache_mb must be >= 0")
        if lora_impl not in LORA_IMPLS:
            raise ValueError(f"lora_impl must be one of {LORA_IMPLS}, not {lora_impl!r}")
        self.lora_impl = lora_impl
        self.spec = model
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.resolved = resolve_model(model, cache_dir=cache_dir, revision=revision)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(
            self.resolved.path, **self.resolved.load_kwargs
        )
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{model}: the tokenizer has no chat template")
        self.model = load_causal_lm(self.resolved, self.device, self.dtype)
        self._index = _ModuleIndex(self.model)
        self._peft: Any = None  # the PeftModel, once the first adapter is in
        self._adapters: dict[str, dict[str, Any]] = {}
        self._adapter_errors: dict[str, str] = {}
        self._stop_ids = self._find_stop_ids()
        self._pad_id = self._find_pad_id()
        self._vocab = len(self.tokenizer)
        self._n_embed = int(self.model.get_input_embeddings().num_embeddings)
        self._ctx = self._find_context_length()
        params = inspect.signature(self.model.forward).parameters
        self._accepts_logits_to_keep = "logits_to_keep" in params
        # transformers 5.2x renamed `past_key_values` to `cache`; older releases know only the former.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._lora: LoraRunner | None = None  # built on first use after the adapters change
        self._running: LoraRunner | None = None  # the runner installed for the current call
        self._kv = SessionKV(int(kv_cache_mb * 2**20))
        self._cache_blocker = cache_blocker(_text_config(self.model.config))
        self._kv_why_not = self._cache_blocker or (
            "kv_cache_mb is 0" if self._kv.budget == 0 else None
        )

    # ---- setup helpers -------------------------------------------------------------------

    def _find_stop_ids(self) -> set[int]:
        ids: set[int] = set()
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for value in (gen_eos, self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(v for v in value if isinstance(v, int))
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
        if not ids:
            raise ValueError(f"{self.spec}: no end-of-sequence token found")
        return ids

    def _find_pad_id(self) -> int:
        if self.tokenizer.pad_token_id is not None:
            return int(self.tokenizer.pad_token_id)
        return min(self._stop_ids)  # any id works: padded positions are masked out

    def _find_context_length(self) -> int:
        cfg = _text_config(self.model.config)
        n = getattr(cfg, "max_position_embeddings", None) or 8192
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and 0 < tok_max < 10**7:
            n = min(n, tok_max)
        return int(n)

    # ---- Backend interface ---------------------------------------------------------------

    def context_length(self) -> int:
        return self._ctx

    def load_adapters(self, adapters: list[AdapterSource]) -> dict[str, str]:
        """Load each adapter once; {name: message} for those that could not be loaded."""
        errors: dict[str, str] = {}
        self._lora = None  # the grouped-LoRA tables are rebuilt for the new set of adapters
        for src in adapters:
            if src.name in self._adapters:
                continue
            try:
                self._load_one(src)
                self._adapter_errors.pop(src.name, None)
            except AdapterUnavailable as err:
                errors[src.name] = str(err)
            except Exception as err:  # noqa: BLE001 - one bad adapter must not end the run
                errors[src.name] = (
                    f"could not load adapter {src.name!r}: {type(err).__name__}: {err}"
                )
            if src.name in errors:
                self._adapter_errors[src.name] = errors[src.name]
                log.warning("adapter %s skipped: %s", src.name, errors[src.name])
        return errors

    def _load_one(self, src: AdapterSource) -> None:
        from peft import PeftModel, set_peft_model_state_dict

        if src.name == BASE_ADAPTER:
            raise AdapterUnavailable(f"{BASE_ADAPTER!r} is reserved for the bare model")
        folder, where = fetch_adapter(src)
        plan = plan_adapter(folder, self._index)
        first = self._peft is None
        if first:
            self._peft = PeftModel(self.model, plan.config, adapter_name=src.name)
        else:
            self._peft.add_adapter(src.name, plan.config)
        try:
            result = set_peft_model_state_dict(self._peft, plan.weights, adapter_name=src.name)
            unexpected = [k for k in result.unexpected_keys if "lora_" in k]
            missing = [k for k in result.missing_keys if f".{src.name}." in k and "lora_" in k]
            if unexpected or missing:
                raise AdapterUnavailable(
                    f"adapter {src.name!r} did not load cleanly: {len(unexpected)} unexpected and "
                    f"{len(missing)} missing LoRA tensors (e.g. {(unexpected + missing)[0]})"
                )
        except Exception:
            self._remove_adapter(src.name, first)
            raise
        self._peft.eval()
        self._adapters[src.name] = {**where, **plan.provenance}

    def _remove_adapter(self, name: str, was_first: bool) -> None:
        if was_first:  # the PeftModel holds only this adapter: take the base model back out
            self.model = self._peft.unload()
            self._peft = None
        else:
            self._peft.delete_adapter(name)

    def reproducibility(self) -> dict[str, Any]:
        """Batch-invariant only with `batch_size: 1`: CPU and GPU matmuls round differently for
        different batch shapes (on CPU one row, two or three, and four or more take different
        kernels), and padded attention sums a row's keys in other groups, so a sampled row whose
        nucleus holds two nearly tied tokens can come out differently in another batch (a
        resumed run regenerates its lost rows in other batches)."""
        if self.batch_size == 1:
            return {
                "guarantee": "batch_invariant",
                "detail": "batch_size 1: one forward per row, never batched with another",
            }
        return {
            "guarantee": "seeded",
            "detail": f"batches of up to {self.batch_size} rows (batch_size: 1 for one "
            "forward per row, so a rerun or resume reproduces every text)",
        }

    def info(self) -> BackendInfo:
        import peft
        import transformers

        prov = dict(self.resolved.provenance)
        commit = getattr(self.model.config, "_commit_hash", None)
        return BackendInfo(
            kind=self.kind,
            model=self.spec,
            model_revision=commit or prov.get("revision"),  # the exact commit where known
            adapters={k: dict(v) for k, v in self._adapters.items()},
            extra={
                "display": self.resolved.display,
                "path": self.resolved.path,
                "provenance": prov,
                "commit": commit,
                "model_class": type(self.model).__name__,
                "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."),
                "batch_size": self.batch_size,
                "context_length": self._ctx,
                "adapter_errors": dict(self._adapter_errors),
                "lora_impl": self._lora_impl_used(),
                "kv_reuse": self.kv_stats(),
                "versions": {
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "peft": peft.__version__,
                },
            },
        )

    def kv_stats(self) -> dict[str, Any]:
        """KV reuse: whether it is on (and why not), its budget, and counters since the start:
        prompt tokens prefilled and reused, hits, misses, entries stored and evicted."""
        return {
            "enabled": self._kv_why_not is None,
            "why_not": self._kv_why_not,
            "budget_mb": round(self._kv.budget / 2**20, 3),
            "sessions": len(self._kv),
            "stored_mb": round(self._kv.bytes / 2**20, 3),
            **self._kv.stats.to_dict(),
        }

    def end_session(self, session: str) -> None:
        """Forget a session's stored keys/values (its episode ended)."""
        self._kv.drop(session)

    def clear_sessions(self) -> None:
        """Forget every session's stored keys/values."""
        self._kv.clear()

    def _lora_impl_used(self) -> str:
        if self._peft is None:
            return "none (no adapter loaded)"
        runner = self._lora_runner()
        if runner is not None:
            return "grouped"
        why = (
            "asked for" if self.lora_impl == "peft" else (self._lora.why_not if self._lora else "")
        )
        return f"peft ({why})"

    def close(self) -> None:
        self._kv.clear()
        self._lora = None
        self._peft = None
        self.model = None  # type: ignore[assignment]
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---- generation ------------------------------------------------------------------------

    def render(self, request: GenRequest) -> str:
        """The exact prompt text the model sees for a request (chat template, generation prompt)."""
        kwargs: dict[str, Any] = {"add_generation_prompt": True, "tokenize": False}
        if request.tools:
            kwargs["tools"] = request.tools
        return self.tokenizer.apply_chat_template(request.messages, **kwargs)

    def _prepare(self, index: int, request: GenRequest) -> _Row | GenResult:
        adapter = request.adapter or BASE_ADAPTER
        if request.adapter is not None and request.adapter not in self._adapters:
            why = self._adapter_errors.get(request.adapter, "it was never loaded")
            return GenResult("", "error", error=f"adapter {request.adapter!r} unavailable: {why}")
        try:
            text = self.render(request)
        except Exception as err:  # noqa: BLE001 - a template that rejects a conversation
            return GenResult(
                "", "error", error=f"chat template failed: {type(err).__name__}: {err}"
            )
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids and max(ids) >= self._n_embed:
            return GenResult(
                "", "error", error="prompt has token ids outside the model's vocabulary"
            )
        room = self._ctx - len(ids)
        if room < 1:
            return GenResult("", "context_overflow", prompt_tokens=len(ids))
        s = request.sampling
        if s.max_tokens < 1:
            return GenResult("", "length", prompt_tokens=len(ids))
        try:
            constraint = self._constraint(request)
        except ConstraintError as err:
            return GenResult("", "error", prompt_tokens=len(ids), error=str(err))
        return _Row(
            index=index,
            prompt=list(ids),
            adapter=adapter,
            temperature=float(s.temperature),
            top_p=float(s.top_p),
            repetition_penalty=float(s.repetition_penalty),
            max_new=min(int(s.max_tokens), room),
            generator=torch.Generator().manual_seed(int(request.seed)),
            constraint=constraint,
            session=request.session if self._kv_why_not is None else None,
        )

    def _constraint(self, request: GenRequest) -> RowConstraint | None:
        if request.json_schema is None:
            return None
        return row_constraint(self.tokenizer, request.json_schema, self._stop_ids)

    @torch.inference_mode()
    def generate(self, requests: list[GenRequest], progress: Any = None) -> list[GenResult]:
        """Generate every request; results in request order.

        `progress`: a tqdm-like object (its `update(n)` is called) or a callable; either gets
        the number of requests that just finished (an increment, not a running total).
        """
        results: list[GenResult | None] = [None] * len(requests)
        rows: list[_Row] = []
        for i, req in enumerate(requests):
            prepared = self._prepare(i, req)
            if isinstance(prepared, GenResult):
                results[i] = prepared
                report_progress(progress, 1)
            else:
                rows.append(prepared)
        rows.sort(key=lambda r: (len(r.prompt), r.index))  # similar lengths -> little padding
        self._kv.wanted = {r.session for r in rows if r.session is not None}
        with self._lora_applied():
            for batch in self._batches(rows):
                for row in self._decode(batch, progress):
                    results[row.index] = self._result(row)
        return [r if r is not None else GenResult("", "error", error="not run") for r in results]

    def _batches(self, rows: list[_Row]) -> Iterator[list[_Row]]:
        """Length-sorted rows in batches of at most `batch_size` rows and about
        `max_batch_tokens` padded prompt tokens (long prompts -> fewer rows per prefill)."""
        batch: list[_Row] = []
        for row in rows:
            width = len(row.prompt)  # rows ascend in length: this row sets the padded width
            if batch and (
                len(batch) >= self.batch_size or (len(batch) + 1) * width > self.max_batch_tokens
            ):
                yield batch
                batch = []
            batch.append(row)
        if batch:
            yield batch

    def _result(self, row: _Row) -> GenResult:
        # a row ends on a stop token, or (constrained) right after the grammar's last token
        out = row.out[:-1] if row.out and row.out[-1] in self._stop_ids else row.out
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        problem = row.error or (row.constraint.error if row.constraint is not None else None)
        return GenResult(
            text=text,
            finish_reason="error" if problem else "stop" if row.finish == "stop" else "length",
            prompt_tokens=len(row.prompt),
            completion_tokens=len(row.out),
            error=problem,
        )

    @torch.inference_mode()
    def next_token_logits(self, requests: list[GenRequest]) -> list[Any]:
        """The first generated token's logits of each request (numpy, float32), one forward per
        request: the same shape for base and adapter rows, so no batching noise enters a
        comparison between them (the adapter probe compares these)."""
        out = []
        with self._lora_applied():
            for req in requests:
                ids = self.tokenizer(self.render(req), add_special_tokens=False)["input_ids"]
                input_ids = torch.tensor([ids], device=self.device)
                row = _Row(
                    index=0,
                    prompt=ids,
                    adapter=req.adapter or BASE_ADAPTER,
                    temperature=0.0,
                    top_p=1.0,
                    repetition_penalty=1.0,
                    max_new=1,
                    generator=torch.Generator(),
                )
                result = self._forward(
                    [row], input_ids=input_ids, attention_mask=torch.ones_like(input_ids)
                )
                out.append(result.logits[0, -1].float().cpu().numpy())
        return out

    # ---- one batch: prefill (reusing sessions' keys/values), then decode --------------------

    def _lora_runner(self) -> LoraRunner | None:
        """The grouped-LoRA runner, or None where PEFT's own forward runs the adapters."""
        if self._peft is None or self.lora_impl != "grouped":
            return None
        if self._lora is None:
            self._lora = LoraRunner(self.model, self.dtype)
            if self._lora.why_not:
                log.info("LoRA via PEFT's mixed forward: %s", self._lora.why_not)
        return self._lora if self._lora.usable else None

    @contextlib.contextmanager
    def _lora_applied(self) -> Iterator[None]:
        """For one generate call: the grouped-LoRA forwards installed, where they are used."""
        runner = self._lora_runner()
        if runner is None:
            yield
            return
        with runner.applied():
            self._running = runner
            try:
                yield
            finally:
                self._running = None

    def _forward(self, rows: list[_Row], **inputs: Any) -> Any:
        """One forward of the batch's rows, each under its own adapter."""
        return self._forward_as([r.adapter for r in rows], **inputs)

    def _forward_as(self, adapters: list[str], **inputs: Any) -> Any:
        """One forward of a batch whose row i runs under `adapters[i]` (grouped by adapter)."""
        if self._peft is None:
            return self.model(**inputs)
        if self._running is not None:
            self._running.set_rows(adapters)
            return self.model(**inputs)
        return self._peft(adapter_names=adapters, **inputs)

    @torch.inference_mode()
    def hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, adapter: str | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Every layer's hidden states for one batch of token ids (the embeddings' output first,
        then each block's: transformers' `output_hidden_states`), every row under `adapter`
        (None: the bare model). No sampling and no cache: for reading activations (the
        persona-vector scorer). Right padding keeps each row's positions as a lone row's."""
        if adapter is not None and adapter not in self._adapters:
            why = self._adapter_errors.get(adapter, "it was never loaded")
            raise ValueError(f"adapter {adapter!r} unavailable: {why}")
        adapters = [adapter or BASE_ADAPTER] * int(input_ids.shape[0])
        with self._lora_applied():
            out = self._forward_as(
                adapters,
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                output_hidden_states=True,
                use_cache=False,
            )
        return tuple(out.hidden_states)

    def _attach_sessions(self, batch: list[_Row]) -> None:
        """Take each row's session entry out of the store and find how much of it is reusable."""
        for row in batch:
            if row.session is None:
                continue
            entry = self._kv.take(row.session, row.adapter)
            # always leave at least one prompt token to run: its logits give the first token
            n = common_prefix(entry.ids, row.prompt[:-1]) if entry is not None else 0
            row.reuse, row.reuse_len = (entry, n) if n > 0 else (None, 0)
            if n > 0:
                self._kv.stats.hits += 1
            else:
                self._kv.stats.misses += 1

    def _past(self, batch: list[_Row], cached: list[int], width: int) -> Any:
        """A cache with each row's first `cached[i]` keys/values right-aligned in `width`
        columns (zeros, masked out, in front); an empty one when nothing is reused."""
        from transformers import DynamicCache

        if self._cache_blocker is not None:
            return None  # the model makes its own cache
        if width == 0:
            return DynamicCache()  # no config: full layers only, so rows can be cut out later
        ref = next(r.reuse for r, c in zip(batch, cached, strict=True) if c and r.reuse)
        layers = []
        for layer, (k0, v0) in enumerate(ref.layers):
            keys = k0.new_zeros((len(batch), k0.shape[0], width, k0.shape[2]))
            values = v0.new_zeros((len(batch), v0.shape[0], width, v0.shape[2]))
            for i, (row, c) in enumerate(zip(batch, cached, strict=True)):
                if c and row.reuse is not None:
                    k, v = row.reuse.layers[layer]
                    keys[i, :, width - c :] = k[:, :c]
                    values[i, :, width - c :] = v[:, :c]
            layers.append((keys, values))
        return DynamicCache(layers)

    def _prefill(self, batch: list[_Row]) -> tuple[_Batch, Any, Any]:
        """Run the new part of every row's prompt; the batch state, the output and the cache.

        Layout (see the module docstring): S = the longest new part, row i takes
        c_i = max(0, L_i - S) tokens from its entry (never more than it can reuse), the past
        is P = max(c_i) columns wide, and every row ends at column P + S."""
        self._attach_sessions(batch)
        lens = [len(r.prompt) for r in batch]
        new = max(n - r.reuse_len for n, r in zip(lens, batch, strict=True))
        cached = [max(0, n - new) for n in lens]
        past_w = max(cached)
        cache = self._past(batch, cached, past_w)
        for r in batch:
            r.reuse = None  # copied into the batch cache (or unused): let it go
        state = _Batch.start(self, batch, past_w + new)
        ids = torch.full((len(batch), new), self._pad_id, dtype=torch.long)
        for i, (r, c) in enumerate(zip(batch, cached, strict=True)):
            ids[i, new - (lens[i] - c) :] = torch.tensor(r.prompt[c:])
        self._kv.stats.prefill_tokens += sum(lens) - sum(cached)
        self._kv.stats.reused_tokens += sum(cached)
        positions = (state.mask[:, : state.width].cumsum(-1) - 1).clamp(min=0)[:, past_w:]
        extra = {"logits_to_keep": 1} if self._accepts_logits_to_keep else {}
        if cache is not None:
            extra[self._cache_kw] = cache
        out = self._forward(
            batch,
            input_ids=ids.to(self.device),
            attention_mask=state.mask[:, : state.width],
            position_ids=positions,
            use_cache=True,
            **extra,
        )
        return state, out, self._cache_of(out)

    def _next_logits(self, out: Any, state: _Batch) -> torch.Tensor:
        """The last position's logits as float32, padded vocabulary rows off, penalties applied."""
        logits = out.logits[:, -1, :].float()
        if logits.shape[-1] > self._vocab:  # padded embedding rows are not real tokens
            logits[:, self._vocab :] = float("-inf")
        if state.seen is not None:
            logits = penalize(logits, state.seen, state.penalty[:, None])
        return logits

    def _mask_logits(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        """Per-row logits-masking hook, called every step between the logits and sampling.

        Constrained decoding (a grammar per row, `GenRequest.json_schema`) sets the logits of
        tokens a row may not emit to -inf here and advances its matcher in `_advance_rows`.
        Unconstrained rows are unchanged."""
        for i, r in enumerate(rows):
            if r.constraint is not None:
                r.constraint.mask_(logits[i])
        return logits

    def _advance_rows(self, state: _Batch, tokens: torch.Tensor) -> tuple[list[int], list[int]]:
        """Append each row's token; (indices of rows that finished, indices that go on). A token
        of -1 marks a row whose logits were not finite (`nonfinite_rows`): it ends with an error
        naming the step and its settings, and nothing is appended."""
        if state.seen is not None:
            state.seen.scatter_(1, tokens.clamp(min=0)[:, None], True)
        done: list[int] = []
        keep: list[int] = []
        for i, (row, tok) in enumerate(zip(state.active, tokens.tolist(), strict=True)):
            if tok < 0:
                row.finish, row.error = (
                    "error",
                    (
                        f"non-finite logits at generated token {len(row.out) + 1} (temperature "
                        f"{row.temperature:g}, top_p {row.top_p:g}, repetition penalty "
                        f"{row.repetition_penalty:g}): the row was ended there"
                    ),
                )
                done.append(i)
                continue
            row.out.append(tok)
            if row.constraint is not None:
                row.constraint.accept(tok)
            if tok in self._stop_ids or (row.constraint is not None and row.constraint.done):
                row.finish = "stop"
            elif len(row.out) >= row.max_new:
                row.finish = "length"
            else:
                keep.append(i)
                continue
            done.append(i)
        return done, keep

    def _store_session(self, state: _Batch, i: int, cache: Any) -> None:
        """Keep a finished row's keys/values (prompt and reply but its last token) for its
        session's next step."""
        row = state.active[i]
        if row.session is None or self._kv_why_not is not None or row.finish == "error":
            return
        start = state.starts[i]
        ids = row.prompt + row.out[:-1]  # the last token was sampled, never fed
        layers = [
            (layer.keys[i, :, start:].clone(), layer.values[i, :, start:].clone())
            for layer in cache.layers
        ]
        if any(k.shape[1] != len(ids) for k, _ in layers):  # a cache this code does not know
            self._kv_why_not = f"unexpected cache layout ({type(cache).__name__}); reuse off"
            self._kv.clear()
            log.warning("KV reuse switched off: %s", self._kv_why_not)
            return
        self._kv.put(row.session, KVEntry(row.adapter, ids, layers))

    def _decode(self, batch: list[_Row], progress: Any) -> Iterator[_Row]:
        """Run one batch to completion, yielding rows as they finish."""
        batch = sorted(batch, key=lambda r: r.adapter)  # each adapter's rows contiguous
        state, out, cache = self._prefill(batch)
        while True:
            logits = self._next_logits(out, state)
            logits = self._mask_logits(state.active, logits)
            bad = nonfinite_rows(logits, state.temp)
            logits = torch.where(bad[:, None], torch.zeros_like(logits), logits)  # safe to sample
            tokens = sample_next(
                logits, state.temp, state.top_p, state.uniforms[:, state.step], state.sampling
            )
            tokens = torch.where(bad, torch.full_like(tokens, -1), tokens)
            done, keep = self._advance_rows(state, tokens)
            for i in done:
                self._store_session(state, i, cache)
                report_progress(progress, 1)
                yield state.active[i]
            if not keep:
                return
            if len(keep) < len(state.active):  # drop finished rows from every per-row tensor
                sel = torch.tensor(keep, dtype=torch.long, device=self.device)
                cache.batch_select_indices(sel)
                state.select(keep, sel)
                tokens = tokens[sel]
            out = self._forward(
                state.active,
                input_ids=tokens[:, None],
                attention_mask=state.mask[:, : state.width + 1],
                position_ids=state.next_pos,
                use_cache=True,
                **{self._cache_kw: cache},
            )
            cache = self._cache_of(out)
            state.advance()

    def _cache_of(self, out: Any) -> Any:
        return out.get("cache") if self._cache_kw == "cache" else out.past_key_values

    def _peek_vocab(self) -> int:
        emb = self.model.get_output_embeddings()
        if emb is not None and hasattr(emb, "weight"):
            return int(emb.weight.shape[0])
        return int(_text_config(self.model.config).vocab_size)


def from_config(settings: Settings, context: BackendContext) -> HFBackend:
    """The backend of `backend: {kind: hf, ...}` for one base of a run (backends/registry.py)."""
    return HFBackend(
        context.model,
        revision=context.revision,
        device=settings.device,
        dtype=settings.dtype,
        batch_size=settings.batch_size,
        cache_dir=context.cache_dir,
        max_batch_tokens=settings.max_batch_tokens,
        kv_cache_mb=settings.kv_cache_mb,
    )


@contextlib.contextmanager
def hf_backend(model: str, **kwargs: Any) -> Iterator[HFBackend]:
    """`with hf_backend(spec) as b:` - an HFBackend that frees its model on exit."""
    backend = HFBackend(model, **kwargs)
    try:
        yield backend
    finally:
        backend.close()


__all__ = [
    "HFBackend",
    "Settings",
    "from_config",
    "fetch_adapter",
    "hf_backend",
    "nonfinite_rows",
    "penalize",
    "pick_device",
    "cpu_has_native_bf16",
    "pick_dtype",
    "plan_adapter",
    "sample_next",
]
