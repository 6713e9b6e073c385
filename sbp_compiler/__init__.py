"""streambp: exact, sequence-chunked backpropagation for causal language models, as a
``torch.compile`` backend (``torch.compile(model, backend="streambp")``)."""
from .config import StreamBPConfig
from .report import GraphReport, HeadDecision, LayerDecision, last_report, reports
from .backend import streambp

__all__ = ["StreamBPConfig", "GraphReport", "HeadDecision", "LayerDecision", "last_report", "reports", "streambp"]
