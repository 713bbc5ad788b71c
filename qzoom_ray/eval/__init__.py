"""Evaluation: metrics, accuracy-vs-throughput runs, reports and the RoI gallery."""
