"""What NVFlare runs: the round controller (server, :mod:`.controller`), the site executor (client,
:mod:`.executor`), results assembly (:mod:`.results`), the shared training loop (:mod:`.training`) and
one module per FL algorithm in :mod:`.algorithms`."""
