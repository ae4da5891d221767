"""Data curation: embed an image pool, deduplicate, decontaminate, retrieve, balance, write shards.

Layer 3 (the science): functions take plain values, a :class:`~dinoflow.storage.Storage` and URIs,
and return results; only the CLI and components read the outside world. The steps follow the
DINOv2 recipe (LVD-142M: copy-detection dedup, eval-set decontamination, sample- and cluster-based
retrieval with faiss) and Vo et al. 2024 (hierarchical k-means with resampling, balanced sampling).
"""
