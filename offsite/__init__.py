"""Off-host copies in S3-compatible storage: push, pull, verify, cleanup, sealing (encryption)."""
