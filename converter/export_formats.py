"""Names of ``convert --to`` formats and graph outputs, without torch (``convert --help`` reads
them; ``converter.export`` holds the exporters, keyed by the same names)."""

#: Every ``--to`` format, in the order ``--help`` lists them.
FORMAT_NAMES = ("tf-ckpt", "effdet", "onnx", "torchscript", "torch-export")
#: The formats that take the graph options (outputs, dynamic_batch, image_size).
GRAPH_FORMATS = ("onnx", "torchscript", "torch-export")
#: ``--out`` suffix -> format, for ``convert --out F`` without ``--to``.
EXPORT_SUFFIXES: dict[str, str] = {".onnx": "onnx", ".ts": "torchscript", ".pt2": "torch-export"}
#: What a graph returns (see ``converter.export``).
OUTPUT_KINDS = ("raw", "levels", "decoded", "nms")
