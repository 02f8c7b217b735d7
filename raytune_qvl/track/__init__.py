"""Tracking: the one MLflow writer and what people look at instead of logs.

tracker.py   the Tracker (MLflow client), tag names, a run's end state from how it ended
runs.py      a run's params, config files, data audit and predictions
trials.py    a sweep's child run per trial, from the Tune driver
plots.py     the sweep's pictures        views.py   HTML pages (label mask, predictions)
ui.py        the MLflow UI on 127.0.0.1
"""
