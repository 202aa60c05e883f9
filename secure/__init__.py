"""CKKS packing and filters, DP mechanisms and accounting, the privacy ledger and site policy
enforcement. Land with the secure-aggregation and DP/ledger issues."""
