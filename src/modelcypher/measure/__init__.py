"""Measuring models: the loss barrier between two models (``barrier``, raw and after alignment), the
interference of task vectors (``interference``, ``diagnose``), next-token loss (``loss``), figures
(``plot``). Measuring uses alignment (``align``), never the reverse."""
