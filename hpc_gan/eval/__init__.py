"""Evaluation: features, FID, PRD, precision/recall, segmentation metrics, TSTR, reports."""
