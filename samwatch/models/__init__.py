"""Model adapters: one module per family, each exposing ``Adapter`` (see ``base``)."""
