"""Evaluation, without Lightning: the suites (:mod:`~moei_lightning.eval.registry`), the harness through which
they ask the model, the one scorer and the report.

``moei_lightning.callbacks.PaperEvaluation`` runs it at ``test``; docs/evaluation.md describes the suites and
the report.
"""
