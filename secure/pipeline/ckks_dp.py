"""Privacy mode ``ckks+dp``: noised uploads (charged as in :mod:`.dp`), then encrypted (as in :mod:`.ckks`).

The noise is added at the site before encryption, so even a decrypting site — or a releasing one — sees only
noised uploads and sums; aggregate releases are post-processing of already charged releases and cost nothing.
"""

from __future__ import annotations

from medsilo.secure.pipeline import ckks


class Site(ckks.Site):
    mode = "ckks+dp"
    noised = True


class Server(ckks.Server):
    mode = "ckks+dp"
