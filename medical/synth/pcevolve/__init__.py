"""PCEvolve: differentially private synthetic images that augment a scarce site.

:mod:`.evolve` holds the loop and its ε-DP selection; :mod:`.generators` the candidate sources
(offline procedural, a generic HTTP image API, a site-supplied TorchScript model). ``medsilo pcevolve``
(:mod:`medsilo.cli.pcevolve`) runs it at a site; a job's ``augmentation.pcevolve`` runs it before
federated training (:class:`medsilo.components.executor.SiteExecutor`).
"""
