"""Data layer: ingest into a packed store, input policy, patient splits, controlled imbalance,
batched loading, Macenko stain normalisation, device-side augmentation, synthetic datasets.

Modules (import them directly; this package imports nothing heavy):
``store`` (PatchStore), ``ingest``, ``datasets`` (IDC, BreakHis, Folder), ``validation``,
``splits``, ``sampling``, ``loader`` (BatchLoader), ``stain``, ``augment``, ``transforms``
(GPUPreprocess), ``synthetic``.
"""
