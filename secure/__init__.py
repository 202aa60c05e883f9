"""Privacy and security at the site: policy enforcement (:mod:`.policy`), CKKS packing (:mod:`.ckks`),
the NVFlare encrypt/decrypt filters (:mod:`.filters`), signed aggregate release (:mod:`.release`) and
where each party's keys live (:mod:`.keys`). DP mechanisms and accounting, and the privacy ledger, land
with their issue. The threat model is in ``docs/threat-model.md``."""
