"""Load prediction: output-length predictors (kvflow/predict/base.py has the interface)."""
