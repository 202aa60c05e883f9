"""Privacy and security at the site: policy enforcement (:mod:`.policy`). CKKS packing and filters,
DP mechanisms and accounting, and the privacy ledger land with their issues."""
