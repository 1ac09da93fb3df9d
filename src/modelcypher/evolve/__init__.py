"""Evolutionary merge search: the values of a merge method's parameters (per layer group and tensor
filter) searched by CMA-ES, each candidate merged in memory and scored on Ray actors; the best recipe
is a merge config ``modelcypher merge`` runs as it is."""
