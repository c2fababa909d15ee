"""Reports: model sizes, per-layer quantization error, and plain-text / markdown tables."""
from lowbit.report.size import float_size_bytes, huffman_size_bytes, quantized_size_bytes
from lowbit.report.stats import layer_stats
from lowbit.report.table import format_table, markdown_table

__all__ = ["float_size_bytes", "huffman_size_bytes", "quantized_size_bytes", "layer_stats", "format_table",
           "markdown_table"]
