"""The control side: watch, queue, dispatch, record, report. Imports no torch, model library or codec."""
