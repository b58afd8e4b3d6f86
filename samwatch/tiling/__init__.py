"""Segmenting images larger than the model's input: whole slides, mosaics, regions of them.

``plan`` places windows (tiles over a region; windows around prompts), ``tile`` runs one window
through a model (a pure unit an executor may run anywhere), ``stitch`` joins tiles' masks into
objects, ``cache`` keeps tile embeddings on disk, and ``segment`` drives a job through them.
"""
