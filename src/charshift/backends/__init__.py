"""Generation backends: HF transformers + PEFT, vLLM, any OpenAI-compatible server."""

from charshift.backends.base import AdapterSource, AdapterUnavailable, Backend, BackendInfo

__all__ = ["AdapterSource", "AdapterUnavailable", "Backend", "BackendInfo"]
