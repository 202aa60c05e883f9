"""Privacy and security at the site: policy enforcement (:mod:`.policy`), CKKS packing (:mod:`.ckks`),
the NVFlare encrypt/decrypt filters (:mod:`.filters`), signed aggregate release (:mod:`.release`), where
each party's keys live (:mod:`.keys`), differential-privacy mechanisms and accounting (:mod:`.dp`), the
signed hash-chained privacy ledger (:mod:`.ledger`), the site's guard that checks budgets and writes the
ledger (:mod:`.guard`) and the local PKI for simulation (:mod:`.pki`). The threat model is in
``docs/threat-model.md``."""
