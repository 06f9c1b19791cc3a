"""Model adapters: the interface (`ModelAdapter`), the built-in MiniLM and a tiny test model."""

from planner.models.base import Batch, ModelAdapter, ModelFileError, TokenizedSplit
from planner.models.bert import BertAdapter, BertConfig, BertModule
from planner.models.minilm import MINILM_NAME, MiniLMAdapter, load_minilm, minilm_model_dir
from planner.models.registry import BUILTIN_MODELS, load_adapter
from planner.models.tiny import TinyAdapter

__all__ = [
    "BUILTIN_MODELS",
    "MINILM_NAME",
    "Batch",
    "BertAdapter",
    "BertConfig",
    "BertModule",
    "MiniLMAdapter",
    "ModelAdapter",
    "ModelFileError",
    "TinyAdapter",
    "TokenizedSplit",
    "load_adapter",
    "load_minilm",
    "minilm_model_dir",
]
