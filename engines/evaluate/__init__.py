"""Recognition accuracy as a measured number: labelled faces from files (``labelled``), the
verification metrics (``metrics``: 10-fold accuracy, TAR at FAR, ROC AUC, EER, bootstrap
deltas) and the run over one or more backends and precisions (``run``), for ``arcface evaluate``."""
