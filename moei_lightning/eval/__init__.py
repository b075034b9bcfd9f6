"""Evaluation: benchmark loaders and scorers, and the paper's evaluation at ``test``.

``eval.callback.PaperEvaluation`` runs it; docs/evaluation.md describes the suites and the report.
"""
