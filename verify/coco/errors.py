"""The typed errors of :mod:`verify.coco`; the CLI turns them into one-line messages."""


class CocoEvalError(Exception):
    """Base class of the errors this package raises for bad inputs."""


class AnnotationsError(CocoEvalError):
    """The annotation file is missing, unreadable, or not COCO instances JSON."""


class ImageError(CocoEvalError):
    """The image directory or an image listed in the annotations cannot be read."""


class ResultsError(CocoEvalError):
    """A results file/list is not in COCO results format or does not fit the annotations."""


class ResumeError(CocoEvalError):
    """A partial results file exists but belongs to another run or is corrupt."""


class PredictionError(CocoEvalError):
    """``predict_fn`` returned something that does not have the Detections layout."""


class ModelLoadError(CocoEvalError):
    """The weights cannot be loaded into the PyTorch EfficientDet."""
