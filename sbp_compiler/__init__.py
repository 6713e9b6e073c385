"""streambp: exact, sequence-chunked backpropagation for causal language models, as a
``torch.compile`` backend (``torch.compile(model, backend="streambp")``)."""
from .config import StreamBPConfig
from .report import GraphReport, LayerDecision, last_report, reports
from .backend import streambp

__all__ = ["StreamBPConfig", "GraphReport", "LayerDecision", "last_report", "reports", "streambp"]
