"""User interfaces over the client: the terminal (``trio-chat chat``), Trio inside a
Jupyter kernel (:class:`~trio_chat.TrioInJupyter`), notebook chat widgets
(:mod:`trio_chat.ui.widgets`) and the research plots (:mod:`trio_chat.ui.plots`)."""
