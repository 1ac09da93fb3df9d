"""Moving adapters across model families: maps between two models' spaces fitted on shared anchors."""
