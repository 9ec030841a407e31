"""tokenmill: an LLM inference engine (paged KV cache, continuous batching, OpenAI-compatible serving)."""

from tokenmill.logger import init_logging

init_logging()

from tokenmill.entrypoints.llm import LLM  # noqa: E402
from tokenmill.outputs import CompletionOutput, Logprob, RequestOutput  # noqa: E402
from tokenmill.sampling_params import SamplingParams  # noqa: E402

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]
