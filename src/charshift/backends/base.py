"""The one interface every generation backend implements (`Backend`), and the two ways a run
drives one: through futures (`Backend.submit`, servers) or by engine steps (`SteppedBackend`,
vLLM's offline engine)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

from charshift.schema import GenRequest, GenResult, Sampling


@dataclass
class AdapterSource:
    """Where one adapter comes from: a local folder, or an HF repo with an optional subfolder."""

    name: str  # the key GenRequest.adapter refers to, e.g. "full/sarcasm"
    path: str | None = None
    repo: str | None = None
    subfolder: str | None = None
    revision: str | None = None


def report_progress(progress: Any, n: int = 1) -> None:
    """Tell a progress sink that `n` more requests finished: a tqdm-like object (`update(n)`) or a
    plain callable taking the increment. None is allowed and ignored."""
    if progress is None or n <= 0:
        return
    update = getattr(progress, "update", None)
    (update if callable(update) else progress)(n)


class BackendDead(RuntimeError):
    """The engine behind a backend is gone (a dead vLLM engine core, a server process that
    exited). Raised instead of returning error results, so the run stops: the rows written so
    far are kept and a rerun resumes, rather than every remaining row being stored as an error."""


class AdapterUnavailable(RuntimeError):
    """An adapter is missing or gated: its cells are skipped with this message, the run goes on."""


@dataclass
class BackendInfo:
    """Provenance of a backend: model identity, revision or file hash, adapters' hashes."""

    kind: str
    model: str
    model_revision: str | None = None
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class Backend(ABC):
    """Generate a batch of chat requests; each request has its own adapter, sampling and seed.

    Contract (tests/test_backend_contract.py runs it against every backend that can run here):
      - results come back in request order, one per request;
      - the same request with the same seed gives the same text when re-run;
      - a request whose prompt does not fit the context gets finish_reason="context_overflow"
        and empty text instead of an exception;
      - requests for different adapters may share one call.
    """

    kind: str = "abstract"
    # True when `submit` really runs requests concurrently (a server): the pipeline then drives
    # episodes with `RolloutEngine.run_streaming` instead of the lockstep `run`.
    async_capable: bool = False

    @abstractmethod
    def load_adapters(self, adapters: list[AdapterSource]) -> dict[str, str]:
        """Load each adapter once. Returns {name: error message} for those that could not load."""

    @abstractmethod
    def generate(self, requests: list[GenRequest], progress: Any = None) -> list[GenResult]:
        """Run all requests (batched as the backend sees fit) and return results in order."""

    @abstractmethod
    def info(self) -> BackendInfo:
        """Provenance for the run manifest."""

    def submit(self, request: GenRequest) -> Future[GenResult]:
        """Start one request and return a future of its result (the streaming rollout's seam).

        This default runs the request at once through `generate` and returns a finished future;
        server backends override it to send the request and return while it is in flight.
        """
        fut: Future[GenResult] = Future()
        try:
            fut.set_result(self.generate([request])[0])
        except Exception as exc:  # noqa: BLE001 - the caller sees it through the future
            fut.set_exception(exc)
        return fut

    def next_token_logits(self, requests: list[GenRequest]) -> list[Any] | None:
        """The logits of the first generated token of each request, where the backend can show
        them (one array-like over the vocabulary per request; the adapter probe compares them, more
        sensitive than greedy text). None: not exposed.
        """
        return None

    def next_token_logprobs(self, requests: list[GenRequest], k: int) -> list[Any] | None:
        """The `k` most likely first tokens of each request with their log-probabilities
        (`{token: logprob}` per request, the token as the engine names it), where the backend
        can show them (vLLM offline, OpenAI-compatible servers). None: not exposed."""
        return None

    def reproducibility(self) -> dict[str, Any]:
        """Which reproducibility guarantee this backend gives a run (`REPRODUCIBILITY`), and why:
        recorded in the manifest per base."""
        return {"guarantee": "unknown", "detail": "the backend does not say"}

    def context_length(self) -> int:
        return 8192

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the model."""


# What a rerun of the same row gives (`Backend.reproducibility`):
REPRODUCIBILITY = {
    "batch_invariant": "the same text whatever the row was batched with (batch-invariant kernels "
    "or one float32 forward per row), so a rerun gives the same text",
    "seeded": "each row samples with its own seed, but the rounding of a batched kernel may "
    "depend on what the row was batched with, so a rerun can differ",
    "unknown": "the engine does not say what a seed guarantees",
}


class SteppedBackend(Backend):
    """A backend driven by engine steps, as vLLM's offline engine is (`add` a request, `step` the
    engine, see which requests finished). `RolloutEngine.run_stepped` queues an episode's next
    request as soon as its reply comes out of a step, with no barrier between episodes; the
    lockstep `generate` is the same loop over one batch.
    """

    @abstractmethod
    def add(self, request: GenRequest) -> str | GenResult:
        """Queue one request; its id, or its result at once when it is not sent (a prompt that
        does not fit, an adapter not loaded, a request the engine refused)."""

    @abstractmethod
    def step(self) -> list[tuple[str, GenResult]]:
        """Run one engine step; the requests that finished in it, with their results."""

    @abstractmethod
    def abort(self, request_ids: list[str]) -> None:
        """Drop queued requests (a rollout that stops early)."""

    def generate(self, requests: list[GenRequest], progress: Any = None) -> list[GenResult]:
        """Queue every request, step until all have finished; results in request order."""
        results: list[GenResult | None] = [None] * len(requests)
        queued: dict[str, int] = {}
        try:  # a request that raises (a dead engine) drops the ones queued before it
            for i, req in enumerate(requests):
                added = self.add(req)
                if isinstance(added, GenResult):
                    results[i] = added
                    report_progress(progress)
                else:
                    queued[added] = i
            while queued:
                for rid, res in self.step():
                    if rid in queued:
                        results[queued.pop(rid)] = res
                        report_progress(progress)
        finally:
            if queued:
                self.abort(list(queued))
        return [r if r is not None else GenResult("", "error", error="no result") for r in results]


def first_token_request(req: GenRequest) -> GenRequest:
    """`req` asking for one greedy token and nothing else (what `next_token_logprobs` sends)."""
    greedy = Sampling(temperature=0.0, top_p=1.0, max_tokens=1, repetition_penalty=1.0)
    return replace(req, sampling=greedy, json_schema=None)
