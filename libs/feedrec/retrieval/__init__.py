"""faiss index of the item tower: build, save, load, search."""

from feedrec.retrieval.post_index import PostIndex

__all__ = ["PostIndex"]
