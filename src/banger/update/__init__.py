"""Signed releases and `banger update`: the manifest, signature checks, staging, the swap and rollback."""
