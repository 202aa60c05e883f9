"""Privacy and security at the site and the server.

* :mod:`.pipeline` — one privacy pipeline per mode (``none``, ``dp``, ``ckks``, ``ckks+dp``): the only path by
  which an upload leaves a site (charge, seal, sign, ledger) and by which the server accepts and combines it;
* :mod:`.upload` — the signed wire every upload and released aggregate travels in;
* :mod:`.release` — the aggregate release check (exact announced participant set, once per round);
* :mod:`.filters` — the site-scope NVFlare filter that lets out only protected uploads;
* :mod:`.policy` — a site's policy against a job; :mod:`.keys` — where each party's keys, contexts and
  ledger live; :mod:`.pki` — certificates, signatures, key files;
* :mod:`.ckks` — CKKS contexts, wire format and operations; :mod:`.keywrap` — a secret wrapped for one
  peer site; :mod:`.dp` — DP mechanisms; :mod:`.accounting` — DP accounting; :mod:`.budget` — a site's budget
  from its ledger, charged atomically;
* :mod:`.ledger` — the signed hash-chained privacy ledger (write, verify); :mod:`.anchors` — checks across
  ledgers; :mod:`.audit` — what an auditor's verify and report compute (no torch, no TenSEAL).

The threat model, and a table of the attacks the tests play, is ``docs/threat-model.md``.
"""
