"""What NVFlare runs: the round controller (server), the site executor (client) and one module per FL
algorithm in ``algorithms/``. Lands with the round-engine issue."""
