"""Privacy mode ``none``: plaintext uploads, still signed and ledgered.

What leaves a site: the algorithm's upload sums as plaintext arrays, in a wire whose statement the site signs
(job, round, participant set, digest, ledger head); its ``release`` entry records names, shapes, bytes and the
SHA-256 of the exact bytes. The server reads each upload (and, for per-site algorithms such as FedTGP's
published form, uses them one by one).
"""

from __future__ import annotations

from medsilo.secure.pipeline.base import ServerPipeline, SitePipeline


class Site(SitePipeline):
    mode = "none"


class Server(ServerPipeline):
    mode = "none"
