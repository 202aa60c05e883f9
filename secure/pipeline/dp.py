"""Privacy mode ``dp``: plaintext uploads with differential-privacy noise, charged before they leave.

What leaves a site: the algorithm's *noised* upload (its DP form: clipped per-class sums, or a clipped weight
update), as plaintext arrays in a signed wire. Every upload's mechanism events (the algorithm's
``dp_events``) are charged to the site's budget under the ledger lock, in the same step that writes the
``release`` entry with the ε it added and the cumulative ε of its scope; an upload that would exceed the cap is
refused (``refusal`` entry) and nothing leaves. The server reads the noised sums only.
"""

from __future__ import annotations

from medsilo.secure.pipeline.base import ServerPipeline, SitePipeline


class Site(SitePipeline):
    mode = "dp"
    noised = True


class Server(ServerPipeline):
    mode = "dp"
