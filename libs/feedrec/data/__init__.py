"""Log layout, Ray Data preprocessing, splits and training examples."""

from feedrec.data.preprocess import PreprocessConfig, PreprocessLayout, run_preprocess

__all__ = ["PreprocessConfig", "PreprocessLayout", "run_preprocess"]
