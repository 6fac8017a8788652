"""Classifier heads on saved features: the head and its file (model.py), training (train.py),
applying it (apply.py: predict, evaluate), which layer to use (probe.py), rows within a memory
budget (rows.py) and reports (reports.py, confusion_png.py)."""
